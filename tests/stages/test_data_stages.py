"""The ``download`` and ``shard`` stage CLIs: outputs, metrics files and MLflow runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_params
from stages import download as download_stage
from stages import shard as shard_stage


def test_download_then_shard_logs_one_run_per_stage(
    write_params, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("PLVC_PIPELINE_ID", "stage-test")
    params_file = write_params()
    params = load_params(params_file)

    download_stage.main(["--params", str(params_file)])
    raw_manifest = json.loads((params.paths.raw / "manifest.json").read_text())
    assert raw_manifest["source"] == "sample"
    assert raw_manifest["counts"]["train"] > 0 and raw_manifest["counts"]["test"] > 0

    shard_stage.main(["--params", str(params_file)])
    manifest = json.loads((params.paths.shards / "manifest.json").read_text())
    shards = (params.paths.shards / "train").glob("*.parquet")
    rows = sum(pq.read_metadata(f).num_rows for f in shards)
    assert rows == manifest["splits"]["train"]["clips"] == raw_manifest["counts"]["train"]
    metrics = json.loads((params.paths.metrics / "shard.json").read_text())
    assert metrics["train_clips"] == rows and metrics["test_skipped"] == 0

    client = MlflowClient(tracking_uri=params.tracking.uri)
    exp = client.get_experiment_by_name("plvc")
    runs = client.search_runs([exp.experiment_id], "tags.`plvc.role` = 'stage'")
    by_stage = {r.data.tags["plvc.dvc_stage"]: r for r in runs}
    assert set(by_stage) == {"download", "shard"}
    assert by_stage["shard"].data.metrics["train_clips"] == rows
    assert by_stage["shard"].data.params["shard.rows_per_shard"] == "8"
    assert by_stage["download"].data.params["download.source"] == "sample"
    artifacts = {a.path for a in client.list_artifacts(by_stage["shard"].info.run_id)}
    assert "manifest.json" in artifacts
    assert {r.data.tags["plvc.pipeline_id"] for r in runs} == {"stage-test"}


def test_bad_params_fail_before_any_work(write_params, tmp_path: Path) -> None:
    params_file = write_params(**{"shard.row_group_rows": -3})
    proc = subprocess.run(
        [sys.executable, "-m", "stages.shard", "--params", str(params_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "shard.row_group_rows = -3" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_shard_without_raw_data_names_the_folder(write_params, tmp_path: Path) -> None:
    params_file = write_params()
    proc = subprocess.run(
        [sys.executable, "-m", "stages.shard", "--params", str(params_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert str(tmp_path / "data/raw/vimeo_septuplet") in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["--help"])
def test_stage_help(flag: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stages.download", flag], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--params" in proc.stdout
