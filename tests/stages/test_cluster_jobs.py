"""The cluster path as an operator meets it: a two-node Ray cluster and a real ``mlflow server``
on this machine (loopback, :mod:`pipeline.local_cluster`), a training stage submitted with
``ray job submit`` exactly as the README says, and faults from outside: a ``RayTrainWorker``
SIGKILLed from the process table, the second node stopped, the stage's driver SIGKILLed, the
tracking server down mid-run and at the end. ``make test-cluster`` runs these (``-m cluster``);
``.ci/run`` runs them after the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.local_cluster import LocalRayCluster, MlflowServer
from pipeline.train.checkpoint import newest_complete_checkpoint
from tests.stages.conftest import REPO, small_params

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STEPS = 24
EVERY = 4  # runner.checkpoint_every: the most work a fault may cost
STAGE = "train_single_p"


@pytest.fixture(scope="module")
def workspace(
    tmp_path_factory: pytest.TempPathFactory, sample_shards: dict[str, str], ray_local: None
) -> dict[str, str]:
    """The sample's shards and ``iframes/low`` (a tiny untrained HiFiC), shared read-only by
    every job, as data on a shared filesystem."""
    import torch

    from pipeline.data.iframes import code_iframes
    from plvc.hific import HiFiC, HiFiCConfig, save_hific

    root = tmp_path_factory.mktemp("cluster_data")
    torch.manual_seed(0)
    weights = save_hific(root / "hific.pt", HiFiC(HiFiCConfig.tiny()))
    code_iframes(
        Path(sample_shards["paths.shards"]),
        root / "iframes" / "low",
        weights,
        quality="low",
        batch_size=8,
        num_actors=1,
        use_gpu=False,
        progress=False,
    )
    return {**sample_shards, "paths.iframes": str(root / "iframes")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRayCluster]:
    root = tmp_path_factory.mktemp("cluster_logs")
    with LocalRayCluster(root, num_nodes=2, cpus_per_node=2) as started:
        yield started


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("mlflow_server")) as server:
        yield server


@pytest.fixture
def job(
    tmp_path: Path,
    workspace: dict[str, str],
    cluster: LocalRayCluster,
    mlflow_server: MlflowServer,
) -> Callable[..., Any]:
    """``job(seed)``: a params file of its own (its own Ray run, models and metrics folders;
    the shared data and storage), and a way to submit it as the README does."""
    storage = tmp_path / "shared_storage"  # every node's workers and the driver write here
    pipeline_id = f"cluster-{tmp_path.name}"

    class Job:
        def __init__(self, seed: int) -> None:
            data = small_params(tmp_path, **workspace)
            data["seed"] = seed
            data["runner"].update(
                num_workers=2,
                cpus_per_worker=0.5,
                placement_strategy="SPREAD",
                storage_path=str(storage),
                checkpoint_every=EVERY,
                num_to_keep=2,
                log_every=1,
                image_every=1000,
                max_failures=3,
                materialize_data=False,
                # the faults below are timed against float32 steps (the sample trains in bf16)
                cpu_bf16=False,
                channels_last=False,
            )
            data["tracking"].update(uri=None, retry_s=2.0)
            data["train"]["single_p"].update(steps=STEPS, batch_size=2, crop=64)
            data["train"]["heldout_clips"] = 1
            self.params_file = tmp_path / "params.yaml"
            self.params_file.write_text(yaml.safe_dump(data))
            self.models = Path(data["paths"]["models"])
            self.metrics = Path(data["paths"]["metrics"])
            self.storage = storage
            self.pipeline_id = pipeline_id

        def command(self) -> tuple[list[str], dict[str, str]]:
            """The README's ``ray job submit`` line for this stage, and its environment."""
            env_vars = {
                "MLFLOW_TRACKING_URI": mlflow_server.uri,
                "PLVC_PIPELINE_ID": self.pipeline_id,
            }
            argv = [
                "ray", "job", "submit", "--address", cluster.dashboard_url,
                "--working-dir", ".",
                "--runtime-env-json", json.dumps({"env_vars": env_vars}),
                "--", "python", "-m", f"stages.{STAGE}", "--quality", "low",
                "--params", str(self.params_file),
            ]  # fmt: skip
            env = {**os.environ, **cluster.env}
            env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
            env.pop("RAY_ADDRESS", None)
            return argv, env

        def start(self) -> subprocess.Popen[str]:
            argv, env = self.command()
            return subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )

        def run(self) -> tuple[int, str]:
            proc = self.start()
            out, _ = proc.communicate(timeout=600)
            return proc.returncode, out

        def run_dir(self) -> Path | None:
            runs = sorted(self.storage.glob(f"{STAGE}-low-*"))
            return runs[0] if runs else None

        def newest_checkpoint(self) -> int:
            run_dir = self.run_dir()
            found = newest_complete_checkpoint(str(run_dir), -1) if run_dir else None
            return found[1] if found else -1

        def wait_for_checkpoint(self, step: int, proc: subprocess.Popen[str]) -> int:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                newest = self.newest_checkpoint()
                if newest >= step:
                    return newest
                if proc.poll() is not None:
                    pytest.fail(f"the job ended before checkpoint {step}:\n{proc.stdout.read()}")
                time.sleep(0.2)
            pytest.fail(f"no checkpoint of step {step} within 300 s")

        def result(self) -> dict[str, Any]:
            return json.loads((self.models / "low" / "single_p" / "result.json").read_text())

        def stage_runs(self) -> list[Any]:
            client = MlflowClient(mlflow_server.uri)
            experiment = client.get_experiment_by_name("plvc")
            return client.search_runs(
                [experiment.experiment_id],
                f"tags.`plvc.pipeline_id` = '{self.pipeline_id}' and tags.`plvc.role` = 'stage'",
            )

    return Job


def _cluster_processes(cluster: LocalRayCluster, marker: str) -> list[psutil.Process]:
    """Processes of the cluster's nodes whose command line holds ``marker`` (as ``ps`` shows)."""
    found = []
    for index in range(len(cluster.nodes)):
        for pid in cluster.node_pids(index):
            try:
                proc = psutil.Process(pid)
                if marker in " ".join(proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                continue
    return found


def test_a_submitted_stage_trains_on_both_nodes_and_logs_to_the_server(
    job: Callable[..., Any], cluster: LocalRayCluster, mlflow_server: MlflowServer
) -> None:
    submitted = job(seed=11)
    code, out = submitted.run()
    assert code == 0, out
    result = submitted.result()
    assert result["steps"] == STEPS and result["started_from_step"] == 0
    # SPREAD on two nodes: one worker on each
    assert sorted(result["worker_nodes"]) == sorted(cluster.node_ids), result["worker_nodes"]
    # checkpoints in the shared storage, the weights where paths.models says
    run_dir = Path(result["ray_run_path"])
    assert run_dir.parent == submitted.storage
    assert {p.name for p in run_dir.glob("checkpoint_*")} >= {f"checkpoint_{STEPS:08d}"}
    assert (submitted.models / "low" / "single_p" / "generator.pt").is_file()
    # one stage run on the server, FINISHED, under its pipeline's parent run
    (run,) = submitted.stage_runs()
    assert run.info.status == "FINISHED" and run.data.tags["plvc.dvc_stage"] == STAGE
    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["plvc.role"] == "pipeline"
    assert parent.data.tags["plvc.pipeline_id"] == submitted.pipeline_id
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))
    assert "heldout/psnr" in run.data.metrics


def _wait_until_gone(cluster: LocalRayCluster, marker: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while _cluster_processes(cluster, marker):
        if time.monotonic() > deadline:
            pytest.fail(f"{marker} processes still alive {timeout_s:.0f} s after their job died")
        time.sleep(0.5)


def _resume_figures(client: MlflowClient, run_id: str, killed_at: float, resumed: int) -> str:
    """Steps lost and time to resume, from the run's logged loss: the last step logged before
    the kill, and the first step logged after it (a step re-done after the restart is logged
    twice)."""
    history = client.get_metric_history(run_id, "train/loss")
    before = max(m.step for m in history if m.timestamp / 1000 <= killed_at)
    after = min((m for m in history if m.timestamp / 1000 > killed_at), key=lambda m: m.timestamp)
    return (
        f"trained to step {before} when killed, resumed from checkpoint {resumed} "
        f"({before - resumed} step(s) re-done, at most {EVERY}); first step after the restart "
        f"logged {after.timestamp / 1000 - killed_at:.1f} s after the kill"
    )


def test_a_worker_killed_from_outside_resumes_from_the_newest_checkpoint(
    job: Callable[..., Any], cluster: LocalRayCluster, mlflow_server: MlflowServer
) -> None:
    submitted = job(seed=12)
    proc = submitted.start()
    try:
        newest = submitted.wait_for_checkpoint(2 * EVERY, proc)
        # right after a checkpoint lands, as an operator's kill or an OOM killer would
        on_second_node = cluster.node_pids(1)
        workers = _cluster_processes(cluster, "RayTrainWorker")
        (victim,) = [p for p in workers if p.pid in on_second_node]
        newest = max(newest, submitted.newest_checkpoint())
        victim.send_signal(signal.SIGKILL)
        killed_at = time.time()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    result = submitted.result()
    assert result["steps"] == STEPS
    # the restarted group started from the newest complete checkpoint at the kill (or a
    # later one, written in the moment before the kill reached the process)
    assert newest <= result["started_from_step"] < STEPS, (newest, result["started_from_step"])
    (run,) = submitted.stage_runs()  # one MLflow run, not one per worker group
    assert run.info.status == "FINISHED"
    client = MlflowClient(mlflow_server.uri)
    print(
        "worker kill:",
        _resume_figures(client, run.info.run_id, killed_at, result["started_from_step"]),
    )
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert steps == set(range(1, STEPS + 1))


def test_a_crashed_node_moves_the_run_to_the_nodes_left(
    job: Callable[..., Any], cluster: LocalRayCluster, mlflow_server: MlflowServer
) -> None:
    submitted = job(seed=13)
    proc = submitted.start()
    try:
        newest = submitted.wait_for_checkpoint(EVERY, proc)
        # the second host dies (`ray stop` would drain it: let the run finish there first)
        cluster.stop_node(1, wait=False, crash=True)
        killed_at = time.time()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.add_node()  # a replacement, for the tests after this one
    assert proc.returncode == 0, out
    result = submitted.result()
    assert result["steps"] == STEPS and result["started_from_step"] >= newest
    # SPREAD is a preference: with one node left, both workers run on the head
    assert result["worker_nodes"] == [cluster.node_ids[0]] * 2
    (run,) = submitted.stage_runs()
    assert run.info.status == "FINISHED"
    client = MlflowClient(mlflow_server.uri)
    print("node crash:", _resume_figures(client, run.info.run_id, killed_at, newest))


def test_a_killed_driver_is_resumed_by_submitting_the_stage_again(
    job: Callable[..., Any], cluster: LocalRayCluster, mlflow_server: MlflowServer
) -> None:
    submitted = job(seed=14)
    proc = submitted.start()
    try:
        submitted.wait_for_checkpoint(2 * EVERY, proc)
        # the python process itself, not the shell the job supervisor starts it with
        (driver,) = [
            p for p in _cluster_processes(cluster, f"stages.{STAGE}")
            if f"stages.{STAGE}" in p.cmdline() and str(submitted.params_file) in p.cmdline()
        ]  # fmt: skip
        newest = submitted.newest_checkpoint()
        driver.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out
    assert "failed" in out
    # the driver's Train controller and workers go with it (Ray's fate sharing)
    _wait_until_gone(cluster, "RayTrainWorker")
    assert not (submitted.models / "low" / "single_p").exists()

    resubmitted_at = time.time()
    code, out = submitted.run()
    assert code == 0, out
    result = submitted.result()
    assert result["steps"] == STEPS and result["started_from_step"] >= newest > 0
    resumed = next(r for r in submitted.stage_runs() if r.info.status == "FINISHED")
    first = min(
        m.timestamp / 1000 - resubmitted_at
        for m in MlflowClient(mlflow_server.uri).get_metric_history(
            resumed.info.run_id, "train/loss"
        )
    )
    print(
        f"driver kill: killed after checkpoint {newest}, the re-submitted job resumed from step "
        f"{result['started_from_step']} and logged its first step {first:.1f} s after submission"
    )
    runs = {r.info.status: r for r in submitted.stage_runs()}
    # the killed driver's run could not end itself; the re-run's curves still start at 1
    assert set(runs) == {"RUNNING", "FINISHED"}
    curves = (submitted.metrics.parent / "plots" / "low" / f"{STAGE}.csv").read_text()
    assert [int(r.split(",")[0]) for r in curves.splitlines()[1:]] == list(range(1, STEPS + 1))


def test_tracking_server_down_mid_run_loses_no_training(
    job: Callable[..., Any], cluster: LocalRayCluster, mlflow_server: MlflowServer
) -> None:
    submitted = job(seed=15)
    proc = submitted.start()
    try:
        submitted.wait_for_checkpoint(EVERY, proc)
        mlflow_server.stop()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        mlflow_server.start()
    # training went on to its last step and exported; the stage then says what is missing
    assert proc.returncode != 0, out
    assert "stopped answering during the stage" in out and "Nothing trained is lost" in out
    assert "did not take" in out  # the workers' metrics that never reached the server
    first = submitted.result()
    assert first["steps"] == STEPS and first["mlflow_unlogged_metrics"] > 0

    # with the server back, the same submission only exports and logs
    code, out = submitted.run()
    assert code == 0, out
    again = submitted.result()
    assert (
        again["started_from_step"] == STEPS and again["checkpoint_path"] == first["checkpoint_path"]
    )
    statuses = sorted(r.info.status for r in submitted.stage_runs())
    assert statuses == ["FINISHED", "RUNNING"]
