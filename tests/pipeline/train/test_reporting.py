"""Rank 0's MLflow sink: a tracking server that goes away never stops or loses the training's
metrics; they are kept and logged at their own steps once it answers again."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.local_cluster import MlflowServer, free_port
from pipeline.train.reporting import MlflowSink


def _wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_an_unreachable_server_keeps_metrics_and_drops_images() -> None:
    # nothing listens there: every attempt is refused
    sink = MlflowSink(f"http://127.0.0.1:{free_port()}", "0" * 32, retry_s=0.1)
    sink.log_metrics({"train/loss": 1.0, "train/psnr": 20.0}, step=1)
    _wait_for(lambda: sink.failures >= 1)
    sink.log_metrics({"train/loss": 0.5, "train/psnr": 21.0}, step=2)
    sink.log_image("samples/x_hat", np.zeros((8, 8, 3), np.uint8), step=2)
    assert sink.close(timeout_s=30) == {
        "mlflow_unlogged_metrics": 4,
        "mlflow_unlogged_images": 1,
        "mlflow_failures": sink.failures,
    }


def test_metrics_kept_beyond_the_bound_drop_the_oldest() -> None:
    sink = MlflowSink(f"http://127.0.0.1:{free_port()}", "0" * 32, retry_s=60, max_pending=4)
    for step in range(1, 6):
        sink.log_metrics({"a": 1.0, "b": 2.0}, step=step)
    assert sink.close(timeout_s=30)["mlflow_unlogged_metrics"] == 10
    assert sink.dropped_metrics >= 6  # only the newest 4 values were still kept


@pytest.mark.cluster
def test_metrics_logged_while_the_server_was_down_reach_it_when_it_is_back(
    tmp_path: Path,
) -> None:
    with MlflowServer(tmp_path / "server") as server:
        client = MlflowClient(server.uri)
        run_id = client.create_run(client.create_experiment("sink")).info.run_id
        sink = MlflowSink(server.uri, run_id, retry_s=0.5)
        sink.log_metrics({"train/loss": 1.0}, step=1)
        _wait_for(lambda: len(client.get_metric_history(run_id, "train/loss")) == 1)

        server.stop()
        for step in range(2, 6):
            sink.log_metrics({"train/loss": 1.0 / step}, step=step)
        _wait_for(lambda: sink.failures >= 1)
        sink.log_image("samples/x_hat", np.zeros((8, 8, 3), np.uint8), step=5)
        server.start()

        sink.log_metrics({"train/loss": 1.0 / 6}, step=6)
        report = sink.close(timeout_s=60)
        history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert {m.step: m.value for m in history}[4] == pytest.approx(0.25)
    assert report["mlflow_unlogged_metrics"] == 0 and report["mlflow_unlogged_images"] == 1
