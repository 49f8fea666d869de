"""One local Ray head shared by every stage of a run (``python -m pipeline.ray_cluster``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ray_cluster import local_head

REPO = Path(__file__).resolve().parents[2]

# what a stage does: join RAY_ADDRESS through init_ray, use the cluster, disconnect
_STAGE = """
import os, sys
from pipeline.ray_cluster import init_ray, shutdown_ray
import ray
how = init_ray()
train_env = [os.environ.get(k, "-") for k in
             ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")]
print("joined", how, ray.cluster_resources()["CPU"], *train_env, flush=True)
shutdown_ray()
sys.exit(int(sys.argv[1]))
"""


def _wrapped(tmp_path: Path, *stage_codes: int) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "stage.py"
    script.write_text(_STAGE)
    chain = " && ".join(f"{sys.executable} {script} {code}" for code in stage_codes)
    env = {
        k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_TRAIN_")
    }
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "pipeline.ray_cluster", "--num-cpus", "1", "--", "sh", "-c", chain],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_stages_of_one_command_join_the_same_head(tmp_path: Path) -> None:
    run = _wrapped(tmp_path, 0, 0)
    assert run.returncode == 0, run.stdout + run.stderr
    head = next(line for line in run.stdout.splitlines() if line.startswith("[ray] local head"))
    address = head.split(" at ")[1].split()[0]
    joined = [line.split() for line in run.stdout.splitlines() if line.startswith("joined")]
    # both stages joined the wrapper's head (not a Ray of their own) and saw its 1 CPU
    assert [j[1] for j in joined] == [address, address], run.stdout
    assert [float(j[2]) for j in joined] == [1.0, 1.0]
    # the head is this machine's alone: Ray Train's single-node settings reach every stage
    assert [j[3:] for j in joined] == [["0.5", "0"], ["0.5", "0"]]


def test_the_command_exit_code_is_kept_and_the_head_stopped(tmp_path: Path) -> None:
    run = _wrapped(tmp_path, 3)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "stopping the local head" in run.stdout
    assert not Path("/tmp/ray/ray_current_cluster").exists()


def test_a_set_ray_address_is_not_shadowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(RuntimeError, match="RAY_ADDRESS is already set"), local_head():
        pass
