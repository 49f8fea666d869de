from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import Params, TrackingConfig
from pipeline.tracking import (
    TrackingUnavailableError,
    log_json_artifact,
    log_pipeline_summary,
    metric_key,
    params_changed_since_commit,
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


def test_pipeline_summary_lands_on_the_parent_run(
    params: Params, monkeypatch, tmp_path: Path
) -> None:
    """What the MLflow UI compares: the parent run of each pipeline carries the summary, and
    the experiment opens as a runs table (model development), not as GenAI traces."""
    monkeypatch.setenv("PLVC_PIPELINE_ID", "pipe-summary")
    summary = tmp_path / "summary.md"
    summary.write_text("# report")
    figure = tmp_path / "rd_psnr_rgb.png"
    figure.write_bytes(b"png")
    with stage_run("evaluate_report", params) as run:
        parent = log_pipeline_summary(
            {metric_key("x265", "crf=28", "bpp"): 0.25, "bd_rate/plvc_gan/vs_x265/psnr_rgb": -12.5},
            [(summary, None), (figure, "rd/figures")],
            {"train.gan.steps": "300", "dvc_exp_name": "exp-b"},
        )
        # a second call (a re-run of the stage) adds metrics, keeps the first param values
        log_pipeline_summary({"extra": 1.0}, (), {"train.gan.steps": "400"})
    client = MlflowClient()
    assert client.get_run(run.info.run_id).data.tags["mlflow.parentRunId"] == parent
    data = client.get_run(parent).data
    assert data.metrics == {
        "x265/crf_28/bpp": 0.25,
        "bd_rate/plvc_gan/vs_x265/psnr_rgb": -12.5,
        "extra": 1.0,
    }
    assert data.params == {"train.gan.steps": "300", "dvc_exp_name": "exp-b"}
    assert {a.path for a in client.list_artifacts(parent)} == {"summary.md", "rd"}
    assert [a.path for a in client.list_artifacts(parent, "rd/figures")] == [
        "rd/figures/rd_psnr_rgb.png"
    ]
    experiment = client.get_experiment_by_name("test-exp")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    with pytest.raises(TrackingUnavailableError, match="needs an active stage run"):
        log_pipeline_summary({"x": 1.0})


def test_params_changed_since_commit(tmp_path: Path, monkeypatch) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    params_file = tmp_path / "params.yaml"
    params_file.write_text("train:\n  gan: {steps: 300, lr: 0.0001}\nseed: 0\n")
    git("add", "params.yaml")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "params")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert params_changed_since_commit(params_file) == {}
    # what `dvc exp run -S train.gan.steps=500 -S data.crop=64` leaves in the workspace
    params_file.write_text("train:\n  gan: {steps: 500, lr: 0.0001}\nseed: 0\ndata: {crop: 64}\n")
    assert params_changed_since_commit(params_file) == {"train.gan.steps": "500", "data.crop": "64"}
    assert params_changed_since_commit(tmp_path.parent / "elsewhere.yaml") == {}


def test_a_store_lost_mid_stage_is_named_and_the_run_dropped(tmp_path: Path, monkeypatch) -> None:
    store = tmp_path / "store"
    store.mkdir()
    params = Params(tracking=TrackingConfig(uri=f"sqlite:///{store / 'mlflow.db'}"))
    monkeypatch.setenv("PLVC_PIPELINE_ID", "pipe-lost")
    with (
        pytest.raises(TrackingUnavailableError, match="stopped answering during the stage") as err,
        stage_run("train_gan", params, run_name="train_gan-low"),
    ):
        store.rename(tmp_path / "moved")  # the store goes away while the stage works
    message = str(err.value)
    assert "Nothing trained is lost" in message and "stays RUNNING" in message
    assert mlflow.active_run() is None  # a next stage in this process starts clean
