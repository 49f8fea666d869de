"""The ``train_hific`` and ``iframes`` stage CLIs on the built-in sample: Ray Train runs with 2
CPU workers, exported weights, I-frames aligned with the shards, metrics and MLflow runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import load_params
from pipeline.data.clips import decode_png_rgb
from plvc.errors import WeightsError
from plvc.hific import HiFiC, HiFiCConfig, load_hific, save_hific
from plvc.intra import get_intra_codec
from stages import iframes as iframes_stage
from stages import train_hific as train_hific_stage

TINY_RUN = {
    "hific.warmup_steps": 4,
    "hific.gan_steps": 2,
    "hific.crop": 64,
    "hific.batch_size": 2,
    "runner.checkpoint_every": 2,
    "runner.log_every": 2,
    "runner.image_every": 2,
    "iframes.batch_size": 4,
    "iframes.num_actors": 2,
    "tracking.max_logged_images": 2,
}


@pytest.mark.ray
def test_train_hific_then_iframes_on_the_sample(
    ray_local: None,
    write_params,
    sample_shards: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PLVC_PIPELINE_ID", "hific-stages")
    params_file = write_params(
        **TINY_RUN, **sample_shards, **{"runner.storage_path": str(tmp_path / "ray")}
    )
    params = load_params(params_file)
    argv = ["--params", str(params_file), "--quality", "low"]

    # --- train_hific: warm-up, then GAN from the warm-up's export
    train_hific_stage.main(argv)
    final = params.paths.models / "low" / "hific"
    assert sorted(p.name for p in final.iterdir()) == [
        "discriminator.pt",
        "hific.pt",
        "result.json",
    ]
    model, meta = load_hific(final / "hific.pt")
    assert model.config == HiFiCConfig.tiny() and meta["phase"] == "hific_gan"
    result = json.loads((final / "result.json").read_text())
    assert result["steps"] == 2 and result["world_size"] == 2
    # Ray run names carry the settings' fingerprint (MLflow's phase runs keep short names)
    assert re.fullmatch(r"train_hific-low-gan-[0-9a-f]{10}", result["run_name"])
    warm = json.loads((params.paths.models / "low/hific_warmup/result.json").read_text())
    assert warm["steps"] == 4 and warm["phase"] == "hific_warmup"
    metrics = json.loads((params.paths.metrics / "low/train_hific.json").read_text())
    assert metrics["warmup"]["steps"] == 4 and metrics["gan"]["steps"] == 2
    assert {"bpp", "mse", "psnr", "d_loss", "d_real_prob", "d_fake_prob"} <= set(metrics["gan"])
    assert all(np.isfinite(v) for v in metrics["gan"].values())

    client = MlflowClient(params.tracking.uri)
    experiment = client.get_experiment_by_name("plvc").experiment_id
    stage_run = client.search_runs([experiment], "attributes.run_name = 'train_hific@low'")[0]
    phases = client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{stage_run.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in phases) == [
        "train_hific-low-gan",
        "train_hific-low-warmup",
    ]
    for run in phases:
        assert run.data.tags["plvc.pipeline_id"] == "hific-stages"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/bpp")]
        assert steps == ([2, 4] if run.info.run_name.endswith("warmup") else [2])
    assert stage_run.data.metrics["gan/steps"] == 2
    runs = sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert [name.rsplit("-", 1)[0] for name in runs] == [
        "train_hific-low-gan",
        "train_hific-low-warmup",
    ]
    # a plain re-run finds both runs finished: it re-exports, trains nothing, starts no run
    stamp = (final / "hific.pt").read_bytes()
    train_hific_stage.main(argv)
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == runs
    assert (final / "hific.pt").read_bytes() == stamp

    # --- iframes: one row per clip, aligned with the shards, pixels = decode(bitstream)
    iframes_stage.main(argv)
    out = params.paths.iframes / "low"
    codec = get_intra_codec("hific", weights=final / "hific.pt")
    for split in ("train", "test"):
        shard_files = sorted((params.paths.shards / split).glob("part-*.parquet"))
        iframe_files = sorted((out / split).glob("part-*.parquet"))
        assert [f.name for f in iframe_files] == [f.name for f in shard_files]
        for shard, iframe in zip(shard_files, iframe_files, strict=True):
            rows = pq.read_table(iframe).to_pydict()
            assert (
                rows["clip_id"] == pq.read_table(shard, columns=["clip_id"])["clip_id"].to_pylist()
            )
            for i, stream in enumerate(rows["bitstream"]):
                assert rows["bits"][i] == 8 * len(stream)
                decoded = codec.decode(stream).mul(255).round().to(torch.uint8)
                np.testing.assert_array_equal(
                    decode_png_rgb(rows["iframe_png"][i]), decoded.permute(1, 2, 0).numpy()
                )
    shard_manifest = json.loads((params.paths.shards / "manifest.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    for split in ("train", "test"):
        assert manifest["splits"][split]["clips"] == shard_manifest["splits"][split]["clips"]
    iframe_metrics = json.loads((params.paths.metrics / "low/iframes.json").read_text())
    assert iframe_metrics["test"]["clips"] == shard_manifest["splits"]["test"]["clips"]
    assert iframe_metrics["train"]["bpp_mean"] > 0 and iframe_metrics["train"]["psnr_mean"] > 0
    run = client.search_runs([experiment], "attributes.run_name = 'iframes@low'")[0]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"bpp_histogram.png", "side_by_side_test.png", "manifest.json"} <= artifacts
    assert run.data.metrics["train/bpp_median"] == iframe_metrics["train"]["bpp_median"]

    # a re-run keeps every complete file
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")}
    iframes_stage.main(argv)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")} == stamps
    reruns = client.search_runs([experiment], "attributes.run_name = 'iframes@low'")
    assert sorted(r.data.metrics["files_kept"] for r in reruns) == [0, len(stamps)]


def test_pretrained_checkpoint_is_exported_without_training(write_params, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = save_hific(tmp_path / "mine.pt", HiFiC(HiFiCConfig.tiny()), {"note": "user's"})
    params_file = write_params(
        **{
            "hific.pretrained": {"medium": str(source)},
            "runner.storage_path": str(tmp_path / "ray"),
        }
    )
    params = load_params(params_file)
    train_hific_stage.main(["--params", str(params_file), "--quality", "medium"])
    out = params.paths.models / "medium" / "hific"
    assert (out / "hific.pt").read_bytes() == source.read_bytes()
    result = json.loads((out / "result.json").read_text())
    assert result["source"] == "pretrained" and result["checkpoint_meta"] == {"note": "user's"}
    metrics = json.loads((params.paths.metrics / "medium/train_hific.json").read_text())
    assert metrics["source"] == "pretrained"
    assert not (tmp_path / "ray").exists()  # no Ray Train run

    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    broken = write_params(**{"hific.pretrained": {"medium": str(tmp_path / "broken.pt")}})
    with pytest.raises(WeightsError, match=r"hific\.pretrained\.medium: .*broken\.pt"):
        train_hific_stage.main(["--params", str(broken), "--quality", "medium"])
    assert (out / "hific.pt").read_bytes() == source.read_bytes()  # the good export stays


def test_lpips_without_backbone_fails_before_ray(write_params, tmp_path: Path) -> None:
    params_file = write_params(
        **{
            "hific.operating_points.high.k_p": 1.0,
            "runner.storage_path": str(tmp_path / "ray"),
        }
    )
    with pytest.raises(WeightsError, match=r"hific\.lpips_backbone is not set"):
        train_hific_stage.main(["--params", str(params_file), "--quality", "high"])
    assert not (tmp_path / "ray").exists() and not (tmp_path / "models").exists()


def test_iframes_without_weights_names_the_file(write_params, tmp_path: Path) -> None:
    params_file = write_params()
    with pytest.raises(WeightsError, match=r"models/low/hific/hific\.pt does not exist"):
        iframes_stage.main(["--params", str(params_file), "--quality", "low"])


def test_iframes_without_shards_is_a_one_line_error(
    write_params, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import run_stage
    from stages.iframes import main

    params_file = write_params()
    params = load_params(params_file)
    torch.manual_seed(0)
    save_hific(params.paths.models / "low/hific/hific.pt", HiFiC(HiFiCConfig.tiny()), {})
    with pytest.raises(SystemExit) as exit_info:
        run_stage(main, ["--params", str(params_file), "--quality", "low"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("error: no shard files in ") and "run the shard stage first" in last
    assert "Traceback" not in err and "Started a local Ray" not in err  # fails before Ray
    assert not (params.paths.iframes / "low").exists()
