"""`dvc repro` of the data stages in a scratch copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def scratch_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A git + DVC checkout of the tracked files with a one-video sample."""
    root = tmp_path_factory.mktemp("repo")
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["download"]["sample"].update(
        {"videos": ["carphone_pristine"], "clip_stride": 6, "min_clips": 10}
    )
    params["shard"]["workers"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
    }
    env.pop("PLVC_PIPELINE_ID", None)
    _run(["git", "init", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root, env)
    return root, env


def test_repro_then_noop(scratch_repo: tuple[Path, dict[str, str]]) -> None:
    root, env = scratch_repo
    _run([str(BIN / "dvc"), "repro", "download", "shard"], root, env)
    assert (root / "data/shards/manifest.json").is_file()
    assert (root / "dvc.lock").is_file()

    status = _run([str(BIN / "dvc"), "status", "download", "shard"], root, env)
    assert "up to date" in status.stdout.lower()
    again = _run([str(BIN / "dvc"), "repro", "download", "shard"], root, env)
    assert "didn't change" in again.stdout or "up to date" in again.stdout.lower()

    metrics = json.loads(_run([str(BIN / "dvc"), "metrics", "show", "--json"], root, env).stdout)
    shown = json.dumps(metrics)
    assert "train_clips" in shown and "clips_test" in shown
    _run([str(BIN / "dvc"), "params", "diff"], root, env)


def test_stages_share_one_pipeline_run(scratch_repo: tuple[Path, dict[str, str]]) -> None:
    root, env = scratch_repo
    # a no-op when test_repro_then_noop ran first on this worker (pytest-xdist may not)
    _run([str(BIN / "dvc"), "repro", "download", "shard"], root, env)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("plvc")
    runs = client.search_runs([exp.experiment_id], "tags.`plvc.role` = 'stage'")
    first = [r for r in runs if r.data.tags["plvc.dvc_stage"] in ("download", "shard")]
    assert len(first) == 2, "one run per stage executed (the no-op repro adds none)"
    assert len({r.data.tags["plvc.pipeline_id"] for r in first}) == 1
    assert len({r.data.tags["mlflow.parentRunId"] for r in first}) == 1
