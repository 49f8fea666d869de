"""A Ray cluster of several nodes and a real MLflow tracking server on this machine, to rehearse
the cluster path (``ray job submit``, a shared ``runner.storage_path``, faults) before a real
cluster, and to test it (``make test-cluster``).

Every node is a ``ray start --block`` process of its own (the head with the dashboard, which
serves ``ray job submit``), as an operator starts them on separate hosts; the MLflow server is
``mlflow server`` with a SQLite store and an artifact folder. Everything listens on loopback
ports chosen free, lives in one temp folder, authenticates with a token of its own (passed
through ``RAY_AUTH_TOKEN``, so ``~/.ray/auth_token`` and another local Ray are left alone), and
is stopped, process group and stray children included, when the block ends::

    with LocalRayCluster(tmp, num_nodes=2, cpus_per_node=2) as cluster, MlflowServer(tmp) as ml:
        cluster.submit(["python", "-m", "stages.train_single_p", "--quality", "low"],
                       env_vars={"MLFLOW_TRACKING_URI": ml.uri}, cwd=repo)
        cluster.stop_node(1)        # a node leaves, as `ray stop` on that host

``python -m pipeline.local_cluster --nodes 2`` starts both and prints how to submit to them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import requests

from pipeline.errors import PipelineError

__all__ = [
    "ClusterError",
    "LocalRayCluster",
    "MlflowServer",
    "free_port",
    "main",
    "stop_process_tree",
]


class ClusterError(PipelineError):
    """A local cluster or tracking server did not start, or a submitted job failed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process_tree(
    proc: subprocess.Popen[Any], timeout_s: float = 40.0, signum: int = signal.SIGTERM
) -> None:
    """Send ``signum`` to ``proc`` (SIGTERM: a graceful stop, Ray and MLflow stop their own
    children on it), then SIGKILL whatever of its process group and descendants is still
    alive after ``timeout_s``."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.send_signal(signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout_s)
    _, alive = psutil.wait_procs([p for p in tree if p.is_running()], timeout=2 if timeout_s else 0)
    with contextlib.suppress(ProcessLookupError, psutil.Error):
        os.killpg(proc.pid, signal.SIGKILL)  # started with its own session: pgid == pid
    for p in alive:
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            p.kill()
    if proc.poll() is None:
        proc.wait(5)


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen[Any], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"{proc.args[:3]} exited with {proc.returncode}; log: {log}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise ClusterError(f"{url} did not answer within {timeout_s:.0f} s; log: {log}")


class LocalRayCluster:
    """``num_nodes`` Ray nodes on this machine (node 0 the head), each started by ``ray start
    --block`` with ``cpus_per_node`` logical CPUs and a custom resource ``node<i>: 1``.

    ``env`` holds what a client needs (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN``): :meth:`submit`
    passes it to ``ray job submit``; a process that joins with ``RAY_ADDRESS`` needs it too.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        num_nodes: int = 2,
        cpus_per_node: float = 2,
        start_timeout_s: float = 90.0,
        object_store_bytes: int = 1 << 30,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        # Ray's unix sockets live under the temp dir: keep its path short (108-byte limit)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="plvc-ray-", dir="/tmp"))
        self.log_dir = Path(root) if root is not None else self.temp_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.num_nodes, self.cpus_per_node = num_nodes, cpus_per_node
        self.start_timeout_s = start_timeout_s
        self.object_store_bytes = object_store_bytes
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(24),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.nodes: list[subprocess.Popen[Any] | None] = []
        #: Ray's node id of each node, by index
        self.node_ids: list[str] = []

    # -- nodes ---------------------------------------------------------------------------

    def _node_command(self, index: int) -> list[str]:
        ray = str(Path(sys.executable).with_name("ray"))
        command = [
            ray,
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.cpus_per_node}",
            "--num-gpus=0",
            # Ray's default is 30% of the machine's memory per node: too much for several nodes
            f"--object-store-memory={self.object_store_bytes}",
            f"--resources={json.dumps({f'node{index}': 1})}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            # a folder per node, as each host has its own /tmp/ray: nodes sharing one would
            # unpack a job's working_dir into the same place and delete the driver's cwd
            f"--temp-dir={self.temp_dir / f'n{index}'}",
        ]
        if index == 0:
            return [
                *command,
                "--head",
                f"--port={self.gcs_port}",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
            ]
        return [*command, f"--address={self.gcs_address}"]

    def _spawn(self, command: Sequence[str], log: Path) -> Any:
        env = {**os.environ, **self.env}
        env.pop("RAY_ADDRESS", None)
        # as in an activated virtualenv: a job's `python` is the one Ray runs on
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        with log.open("ab") as out:
            return subprocess.Popen(
                list(command),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stopped as a whole
            )

    def add_node(self) -> int:
        """Start one more node (the head first); returns its index once Ray lists it alive."""
        index = len(self.nodes)
        log = self.log_dir / f"ray-node{index}.log"
        proc = self._spawn(self._node_command(index), log)
        self.nodes.append(proc)
        if index == 0:
            _wait_http(f"{self.dashboard_url}/api/version", self.start_timeout_s, proc, log)
        known = set(self.node_ids)
        alive = self._wait_for(lambda ids: len(ids - known) == 1, f"node {index}", proc, log)
        self.node_ids.append((alive - known).pop())
        return index

    def alive_node_ids(self) -> set[str]:
        """The ids of the nodes Ray lists alive now (as ``ray list nodes``)."""
        response = requests.get(
            f"{self.dashboard_url}/nodes?view=summary",
            headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"},
            timeout=10,
        )
        response.raise_for_status()
        summary = response.json()["data"]["summary"]
        return {
            n["raylet"]["nodeId"] for n in summary if n.get("raylet", {}).get("state") == "ALIVE"
        }

    def _wait_for(
        self,
        done: Callable[[set[str]], bool],
        what: str,
        proc: subprocess.Popen[Any] | None = None,
        log: Path | None = None,
    ) -> set[str]:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise ClusterError(f"ray start exited with {proc.returncode}; log: {log}")
            try:
                alive = self.alive_node_ids()
                if done(alive):
                    return alive
            except (requests.RequestException, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise ClusterError(f"Ray {what}: not as expected after {self.start_timeout_s:.0f} s")

    def stop_node(self, index: int, *, wait: bool = True, crash: bool = False) -> None:
        """Stop node ``index`` as ``ray stop`` does on its host (SIGTERM: Ray drains the node,
        letting running work finish for up to 30 s, then SIGKILL), or with ``crash`` as a host
        that dies (SIGKILL to every process of the node at once); with ``wait``, return once
        the head no longer lists it alive."""
        proc = self.nodes[index]
        if proc is None:
            return
        stop_process_tree(
            proc, timeout_s=0 if crash else 40.0, signum=signal.SIGKILL if crash else signal.SIGTERM
        )
        self.nodes[index] = None
        if wait and index > 0 and self.nodes[0] is not None:
            node_id = self.node_ids[index]
            self._wait_for(lambda ids: node_id not in ids, f"node {index} leaving")

    def node_pids(self, index: int) -> set[int]:
        """The processes of node ``index`` (``ray start``, raylet, its workers) alive now."""
        proc = self.nodes[index]
        if proc is None:
            return set()
        try:
            root = psutil.Process(proc.pid)
            return {root.pid, *(p.pid for p in root.children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    # -- jobs ----------------------------------------------------------------------------

    def submit(
        self,
        entrypoint: Sequence[str],
        *,
        cwd: str | os.PathLike[str],
        env_vars: Mapping[str, str] | None = None,
        working_dir: str | None = None,
        no_wait: bool = False,
        timeout_s: float = 900,
    ) -> subprocess.CompletedProcess[str]:
        """``ray job submit --address <dashboard> [--working-dir D] --runtime-env-json
        '{"env_vars": ...}' -- ENTRYPOINT``, run from ``cwd`` as a user would; waits for the job
        and returns the client's output, unless ``no_wait``."""
        ray = str(Path(sys.executable).with_name("ray"))
        command = [ray, "job", "submit", "--address", self.dashboard_url]
        if working_dir is not None:
            command += ["--working-dir", working_dir]
        if env_vars:
            command += ["--runtime-env-json", json.dumps({"env_vars": dict(env_vars)})]
        if no_wait:
            command.append("--no-wait")
        command += ["--", *entrypoint]
        env = {**os.environ, **self.env}
        env.pop("RAY_ADDRESS", None)
        return subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
        )

    # -- lifetime ------------------------------------------------------------------------

    def start(self) -> LocalRayCluster:
        try:
            for _ in range(self.num_nodes):
                self.add_node()
        except BaseException:
            self.shutdown()
            raise
        return self

    def shutdown(self) -> None:
        """Stop every node (workers first, the head last) and remove the temp folder."""
        for index in reversed(range(len(self.nodes))):
            self.stop_node(index, wait=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.shutdown()


class MlflowServer:
    """``mlflow server`` on a free loopback port: SQLite store ``root/mlflow.db``, artifacts
    served from ``root/mlartifacts``. :meth:`stop` and :meth:`start` again keep the store, as a
    server that goes down and comes back."""

    def __init__(self, root: str | os.PathLike[str], *, start_timeout_s: float = 90.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.log = self.root / "mlflow-server.log"
        self.proc: subprocess.Popen[Any] | None = None

    def start(self) -> MlflowServer:
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        command = [
            mlflow,
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "mlartifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        # the server's job runner (GenAI evaluation jobs) is ten more processes we do not use
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            _wait_http(f"{self.uri}/health", self.start_timeout_s, self.proc, self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_tree(self.proc)
            self.proc = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.local_cluster [--nodes N] [--cpus-per-node C] [--root DIR]``:
    start the nodes and an MLflow server, print how to use them, stop all on Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.local_cluster",
        description="A multi-node Ray cluster and an MLflow server on this machine (loopback).",
    )
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=float, default=2)
    parser.add_argument("--root", type=Path, default=Path("local_cluster"), help="logs, store")
    args = parser.parse_args(argv)
    with (
        LocalRayCluster(args.root, num_nodes=args.nodes, cpus_per_node=args.cpus_per_node) as c,
        MlflowServer(args.root / "mlflow") as server,
    ):
        print(
            f"Ray: {c.num_nodes} node(s), dashboard {c.dashboard_url}; MLflow: {server.uri}\n"
            f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN={c.env['RAY_AUTH_TOKEN']}\n"
            f"  ray job submit --address {c.dashboard_url} --runtime-env-json "
            f'\'{{"env_vars": {{"MLFLOW_TRACKING_URI": "{server.uri}"}}}}\' -- '
            "python -m stages.train_single_p --quality low\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping", flush=True)


if __name__ == "__main__":
    main()
