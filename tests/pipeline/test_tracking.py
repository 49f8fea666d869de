from __future__ import annotations

import socket
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import Params, TrackingConfig
from pipeline.tracking import (
    TrackingUnavailableError,
    log_json_artifact,
    pipeline_id,
    stage_run,
)


@pytest.fixture
def params(tmp_path: Path) -> Params:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return Params(tracking=TrackingConfig(uri=uri, experiment="test-exp"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage_runs_share_pipeline_parent(params: Params, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PLVC_PIPELINE_ID", "pipe-123")
    monkeypatch.setenv("DVC_STAGE", "shard")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    with stage_run("shard", params, logged_params={"shard": {"rows": 5}}) as run:
        mlflow.log_metric("clips", 7)
        log_json_artifact({"clips": 7}, "manifest.json")
        first = run.info.run_id
    monkeypatch.setenv("DVC_STAGE", "download")
    with stage_run("download", params) as run:
        second = run.info.run_id

    client = MlflowClient()
    a, b = client.get_run(first), client.get_run(second)
    assert a.data.tags["plvc.pipeline_id"] == "pipe-123"
    assert a.data.tags["plvc.dvc_stage"] == "shard"
    assert b.data.tags["plvc.dvc_stage"] == "download"
    assert a.data.tags["plvc.dvc_exp_name"] == "exp-a"
    assert len(a.data.tags["plvc.git_commit"]) >= 7 or a.data.tags["plvc.git_commit"] == "unknown"
    parent = a.data.tags["mlflow.parentRunId"]
    assert parent == b.data.tags["mlflow.parentRunId"]
    assert client.get_run(parent).data.tags["plvc.role"] == "pipeline"
    assert a.data.params["shard.rows"] == "5" and a.data.params["seed"] == "0"
    assert a.data.metrics["clips"] == 7
    assert [f.path for f in client.list_artifacts(first)] == ["manifest.json"]
    assert a.info.status == "FINISHED"


def test_failed_stage_marks_run_failed(params: Params, monkeypatch) -> None:
    monkeypatch.setenv("PLVC_PIPELINE_ID", "pipe-fail")
    with pytest.raises(RuntimeError, match="boom"), stage_run("shard", params) as run:
        run_id = run.info.run_id
        raise RuntimeError("boom")
    assert MlflowClient().get_run(run_id).info.status == "FAILED"


def test_unreachable_server_fails_fast(monkeypatch) -> None:
    port = _free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    params = Params(tracking=TrackingConfig(connect_timeout_s=1.0))
    start = time.monotonic()
    with (
        pytest.raises(TrackingUnavailableError, match=f"127.0.0.1:{port} is unreachable"),
        stage_run("download", params),
    ):
        pytest.fail("the stage body must not run")
    assert time.monotonic() - start < 30


def test_env_uri_overrides_params(tmp_path: Path, monkeypatch, params: Params) -> None:
    other = tmp_path / "other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    with stage_run("download", params):
        pass
    assert other.exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_pipeline_id_fresh_outside_dvc(monkeypatch) -> None:
    monkeypatch.delenv("PLVC_PIPELINE_ID", raising=False)
    assert pipeline_id() != pipeline_id()


def test_second_stage_in_one_process_uses_its_own_store(tmp_path: Path, monkeypatch) -> None:
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: it must not redirect a later stage."""
    monkeypatch.setenv("PLVC_PIPELINE_ID", "two-stores")
    first = Params(tracking=TrackingConfig(uri=f"sqlite:///{tmp_path / 'a.db'}"))
    second = Params(tracking=TrackingConfig(uri=f"sqlite:///{tmp_path / 'b.db'}"))
    with stage_run("download", first):
        pass
    with stage_run("shard", second) as run:
        run_id = run.info.run_id
    assert MlflowClient(tracking_uri=second.tracking.uri).get_run(run_id).info.run_id == run_id
