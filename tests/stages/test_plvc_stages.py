"""The PLVC training stage CLIs (``train_single_p``, ``train_multi_p``, ``train_gan``): one
real stage run on the sample (shards and HiFiC I-frames made here) with 2 Ray workers,
the files DVC tracks, the MLflow run, and the errors a user meets first."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import load_params
from pipeline.train.phase import RunnerError
from pipeline.train.phases.plvc import MultiPPhase, SinglePPhase
from pipeline.train.phases.plvc_models import model_config
from pipeline.train.stage import loss_curves, plots_dir, ray_run_name
from plvc.weights import load_weights
from stages import train_gan, train_multi_p

TRAIN_STEPS = 3


@pytest.fixture
def own_mlflow_store() -> Any:
    """stage_run points MLflow (and MLFLOW_TRACKING_URI, which mlflow sets) at the test's
    store; later tests must not inherit it."""
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture
def sample_with_iframes(
    write_params,
    sample_shards: dict[str, str],
    tmp_path: Path,
    monkeypatch,
    ray_local: None,
    own_mlflow_store: None,
) -> Path:
    """The sample's shards and ``iframes/low`` coded with a tiny (untrained) HiFiC."""
    from pipeline.data.iframes import code_iframes
    from plvc.hific import HiFiC, HiFiCConfig, save_hific

    monkeypatch.setenv("PLVC_PIPELINE_ID", "plvc-stage-test")
    params_file = write_params(
        **sample_shards,
        **{
            "runner.storage_path": str(tmp_path / "ray_results"),
            "runner.checkpoint_every": 2,
            "runner.log_every": 1,
            "runner.image_every": 2,
            "train.multi_p": {
                "steps": TRAIN_STEPS,
                "lr": 1e-3,
                "aux_lr": 1e-3,
                "batch_size": 2,
                "crop": 64,
                "lr_milestones": [2],
                "lr_gamma": 0.5,
                "num_pframes": 2,
            },
            "evaluate.max_clips": 2,
            "train.heldout_clips": 2,
        },
    )
    params = load_params(params_file)
    torch.manual_seed(0)
    weights = save_hific(tmp_path / "hific.pt", HiFiC(HiFiCConfig.tiny()))
    code_iframes(
        params.paths.shards,
        params.paths.iframes / "low",
        weights,
        quality="low",
        batch_size=8,
        num_actors=1,
        use_gpu=False,
        progress=False,
    )
    return params_file


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.ray
def test_train_multi_p_stage_trains_exports_and_reports(sample_with_iframes: Path) -> None:
    params = load_params(sample_with_iframes)
    models = params.paths.models / "low"

    # the previous phase's export is required, and named when missing
    with pytest.raises(
        RunnerError,
        match=r"single_p/generator.pt does not exist: run "
        r"train_single_p@low first",
    ):
        train_multi_p.main(["--params", str(sample_with_iframes), "--quality", "low"])

    # a single-P export (eq. 4's weights) to start from, written as the phase writes it
    single = SinglePPhase(crop=64, model=model_config("tiny").to_dict())
    (models / "single_p").mkdir(parents=True)
    torch.manual_seed(0)
    single.export(single.build_models(), models / "single_p")

    train_multi_p.main(["--params", str(sample_with_iframes), "--quality", "low"])

    _, meta = load_weights(models / "multi_p" / "generator.pt")
    assert meta.quality == "low" and meta.intra_name == "hific"
    # a codec bundle: the I-frames' codec embedded, byte for byte, and no path
    manifest = json.loads((params.paths.iframes / "low" / "manifest.json").read_text())
    assert "weights" not in meta.intra_config and meta.intra_weights is not None
    digest = hashlib.sha256(meta.intra_weights).hexdigest()
    assert digest == meta.intra_config["weights_sha256"] == manifest["codec"]["weights_sha256"]
    assert meta.extra["num_pframes"] == 2 and meta.extra["lmbda"] == 256.0
    result = json.loads((models / "multi_p" / "result.json").read_text())
    assert result["steps"] == TRAIN_STEPS and result["world_size"] == 2

    metrics = json.loads((params.paths.metrics / "low" / "train_multi_p.json").read_text())
    assert metrics["steps"] == TRAIN_STEPS and metrics["world_size"] == 2
    assert {"loss", "rate_bpp", "mse", "psnr", "aux_loss"} <= set(metrics["train"])
    assert not any("/p" in k for k in metrics["train"])
    heldout = metrics["heldout"]
    assert heldout["clips"] == 2 and set(heldout["bpp_per_frame"]) == {f"p{i}" for i in range(1, 7)}
    assert heldout["bpp"] > 0 and 0 < heldout["psnr"] < 100

    rows = _csv(plots_dir(params) / "low" / "train_multi_p.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, TRAIN_STEPS + 1))
    assert {"loss", "rate_bpp", "psnr", "lr/generator"} <= set(rows[0])
    assert float(rows[-1]["lr/generator"]) == pytest.approx(5e-4)  # milestone at step 2

    client = MlflowClient(params.tracking.uri)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id], "tags.`plvc.dvc_stage` = 'train_multi_p'")
    assert run.info.run_name == "train_multi_p-low" and run.info.status == "FINISHED"
    ray_run = Path(run.data.tags["plvc.ray_run_path"])
    assert ray_run.parent == Path(params.runner.storage_path)
    assert ray_run.name.startswith("train_multi_p-low-") and ray_run.is_dir()
    assert result["ray_run_path"] == str(ray_run)
    assert run.data.tags["plvc.started_from_step"] == "0"
    assert run.data.params["train.multi_p.num_pframes"] == "2"
    logged = set(run.data.metrics)
    assert {"train/rate_bpp/p2", "train/mse/p1", "train/psnr/p2", "heldout/bpp/p6"} <= logged
    images = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert any("temporal_profile" in p for p in images)


def test_stage_without_iframes_names_the_missing_stage(
    write_params, own_mlflow_store: None
) -> None:
    params_file = write_params()
    with pytest.raises(
        RunnerError,
        match=r"iframes/medium/manifest.json does not exist: run "
        r"the iframes stage",
    ):
        train_gan.main(["--params", str(params_file), "--quality", "medium"])


def test_official_gan_loss_without_backbone_fails_before_training(
    write_params, tmp_path: Path, own_mlflow_store: None
) -> None:
    params_file = write_params(**{"train.gan.loss": "official"})
    iframes = tmp_path / "data" / "iframes" / "low"
    iframes.mkdir(parents=True)
    (iframes / "manifest.json").write_text(json.dumps({"codec": {"name": "hific"}}))
    with pytest.raises(RunnerError, match=r"set train\.gan\.lpips_backbone"):
        train_gan.main(["--params", str(params_file), "--quality", "low"])


def test_loss_curves_stitch_the_mlflow_runs_of_one_ray_run(tmp_path: Path) -> None:
    """A killed stage (no end tag) and its resumed re-run make one curve; a run of an older
    Ray run under the same path (before a fresh start) is left out."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("curves")
    path = "/shared/ray_results/train_gan-low"

    def run(steps: range, value: float, started_from: str | None, t: int) -> None:
        tags: dict[str, Any] = {"plvc.ray_run_path": path}
        if started_from is not None:
            tags["plvc.started_from_step"] = started_from
        r = client.create_run(exp, start_time=t, tags=tags)
        for s in steps:
            client.log_metric(r.info.run_id, "train/loss", value + s, step=s)
            client.log_metric(r.info.run_id, "train/loss/p1", 0.0, step=s)
            client.log_metric(r.info.run_id, "perf/clips_per_s", 1.0, step=s)

    run(range(1, 9), 1000.0, "0", t=1)  # an older, finished run (then the folder was reset)
    run(range(1, 6), 0.0, "0", t=2)  # fresh start ...
    run(range(6, 8), 100.0, None, t=3)  # ... killed after step 7, its last checkpoint at 5
    run(range(6, 10), 200.0, "5", t=4)  # resumed from step 5
    rows, columns = loss_curves(path, tracking_uri=uri, experiment="curves")
    assert columns == ["step", "loss"]
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert [r["loss"] for r in rows] == [1, 2, 3, 4, 5, 206, 207, 208, 209]


def test_ray_run_name_follows_settings_seed_weights_and_data(tmp_path: Path) -> None:
    """Same settings: the same Ray run (a re-run resumes); any upstream change: a new one."""
    phase = MultiPPhase(crop=64, num_pframes=2)
    init = tmp_path / "single_p"
    init.mkdir()
    (init / "generator.pt").write_bytes(b"weights v1")
    data = tmp_path / "iframes"
    data.mkdir()
    (data / "manifest.json").write_text('{"codec": {"name": "hific"}}')

    def name(p: MultiPPhase = phase, seed: int = 0) -> str:
        return ray_run_name(
            "train_multi_p", "low", p, init_weights=init, iframe_root=data, seed=seed
        )

    first = name()
    assert first.startswith("train_multi_p-low-") and name() == first
    assert name(dataclasses.replace(phase, lr=1e-5)) != first
    assert name(seed=1) != first
    (init / "generator.pt").write_bytes(b"weights v2")
    second = name()
    assert second != first
    (data / "manifest.json").write_text('{"codec": {"name": "hific", "weights": "other"}}')
    assert name() not in (first, second)
