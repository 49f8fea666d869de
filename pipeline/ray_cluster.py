"""Connecting to Ray: a real cluster when one is named, else a local one on loopback.

Every stage connects through :func:`init_ray`: to ``RAY_ADDRESS`` (a cluster, a ``ray job
submit`` job, or the shared local head below) or, with none, to a Ray of its own that it
starts on 127.0.0.1 and stops at its end. Starting that Ray costs ~10-15 s on 2 cores, so a
whole pipeline run shares one (``make demo`` runs ``dvc repro`` under it)::

    python -m pipeline.ray_cluster [--num-cpus N] -- dvc repro

starts a local head on loopback, runs the command with ``RAY_ADDRESS`` pointing at it, and
stops the head when the command ends, also on a failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from pipeline.config import Params

__all__ = [
    "SINGLE_NODE_TRAIN_ENV",
    "init_ray",
    "local_head",
    "main",
    "ray_session",
    "shutdown_ray",
    "single_node_train_settings",
    "skip_known_ray_noise",
]

# Ray records the last local cluster here; a stale copy makes the next start or
# `ray job submit` try to join a dead cluster.
_CURRENT_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")
# A local Ray with token auth (Ray's default) writes a token here when there is none; one this
# module's Ray created is removed with it, so no credential outlives the cluster it opened.
_AUTH_TOKEN_FILE = Path.home() / ".ray" / "auth_token"
_created_token = False
_RAY_NOISE = "Failed to query Ray Train Controller actor state"


def init_ray(params: Params | None = None, *, num_cpus: int | None = None) -> str:
    """Start or join Ray; return ``"local"`` or the cluster address joined.

    ``RAY_ADDRESS`` (set by ``ray job submit`` inside a job) wins over ``ray.address``
    in params; with neither, an embedded single-node cluster is started with node IP
    127.0.0.1. Ray 2.60's gRPC servers (GCS, raylet, workers) still listen on every interface
    there; its token authentication (on by default) is what guards them.
    """
    import ray

    if ray.is_initialized():
        return "existing"
    address = os.environ.get("RAY_ADDRESS") or (params.ray.address if params else None)
    if address:
        ray.init(address=address, log_to_driver=True)
        return address
    cpus = num_cpus or (params.ray.num_cpus if params else None)
    single_node_train_settings()
    global _created_token
    _created_token = _created_token or not _AUTH_TOKEN_FILE.exists()
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
    )
    return "local"


#: Ray Train V2 settings for a cluster of one machine (a user's own value is kept): the
#: controller polls the workers every 0.5 s instead of 2 s (a run's start and end are each
#: noticed up to one interval late), and no preemption watcher, an actor (a process) that only
#: watches other nodes being drained
SINGLE_NODE_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def single_node_train_settings() -> None:
    """Set :data:`SINGLE_NODE_TRAIN_ENV` in this process (the Train controller and workers
    inherit it from the driver); for a local Ray only."""
    for key, value in SINGLE_NODE_TRAIN_ENV.items():
        os.environ.setdefault(key, value)


def skip_known_ray_noise() -> None:
    """Keep one known-harmless Ray warning out of the driver's output (not the log files).

    Ray Train V2's PlacementGroupCleaner asks the state API every second whether the
    controller is alive and, on a local Ray without a dashboard (so without a state API),
    warns each time; the local cluster is shut down with the stage, so there is nothing for it
    to clean. A dashboard would cost ~2 s per stage start and a worker set-up hook ~0.7 s per
    worker process, where Ray's own log filter (``RAY_DEDUP_LOGS_SKIP_REGEX``) costs nothing.
    Ray reads it when imported: call this before ``import ray`` (stages do, in
    :func:`pipeline.cli.run_stage`). A user's own setting is kept.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", _RAY_NOISE)


def shutdown_ray() -> None:
    """Stop the local Ray this process started and remove its stale cluster record."""
    import ray

    global _created_token
    if ray.is_initialized():
        ray.shutdown()
    if not os.environ.get("RAY_ADDRESS"):
        _CURRENT_CLUSTER_FILE.unlink(missing_ok=True)
        if _created_token:
            _AUTH_TOKEN_FILE.unlink(missing_ok=True)
            _created_token = False


@contextlib.contextmanager
def ray_session(
    params: Params | None = None, *, num_cpus: int | None = None, lazy: bool = False
) -> Iterator[Callable[[], str]]:
    """Ray for the block: connected on entry (or, with ``lazy``, on the first call of the
    yielded ``connect()``), and disconnected at the end, also on an error or Ctrl-C, if this
    block connected it (a Ray that was already up is left alone). ``connect()`` returns what
    :func:`init_ray` returned."""
    state: dict[str, str] = {}

    def connect() -> str:
        if "how" not in state:
            state["how"] = init_ray(params, num_cpus=num_cpus)
        return state["how"]

    if not lazy:
        connect()
    try:
        yield connect
    finally:
        if state.get("how", "existing") != "existing":
            shutdown_ray()


@contextlib.contextmanager
def local_head(num_cpus: int | None = None) -> Iterator[str]:
    """A local Ray head on 127.0.0.1 for the block; yields its address (``host:port``).

    The head runs as children of this process and is stopped at the end of the block (also
    on an error); its cluster record and the auth token it created go with it. Another
    process joins it with ``RAY_ADDRESS=<address>``.
    """
    import ray

    if os.environ.get("RAY_ADDRESS"):
        raise RuntimeError(
            f"RAY_ADDRESS is already set ({os.environ['RAY_ADDRESS']}): unset it to start a "
            "local head, or run the command without this wrapper to use that cluster"
        )
    init_ray(num_cpus=num_cpus)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        shutdown_ray()


def _run_with_head(command: Sequence[str], num_cpus: int | None) -> int:
    with local_head(num_cpus) as address:
        print(f"[ray] local head at {address} for: {' '.join(command)}", flush=True)
        # the stages join with RAY_ADDRESS, but the head is this machine's alone
        env = {**SINGLE_NODE_TRAIN_ENV, **os.environ, "RAY_ADDRESS": address}
        child = subprocess.Popen(list(command), env=env)

        def forward(signum: int, _frame: FrameType | None) -> None:
            child.send_signal(signum)

        # Ctrl-C reaches the whole foreground group (the child too): wait for the child to
        # stop rather than tearing Ray down under it; SIGTERM is passed on the same way
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        print(f"[ray] command exited with {code}; stopping the local head", flush=True)
        return code


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.ray_cluster [--num-cpus N] -- COMMAND...``: run COMMAND with
    ``RAY_ADDRESS`` set to a local head started for it (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.ray_cluster",
        description="Run a command (e.g. `dvc repro`) with one local Ray head for all its stages.",
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the head (all)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: python -m pipeline.ray_cluster -- dvc repro")
    skip_known_ray_noise()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(_run_with_head(command, args.num_cpus))


if __name__ == "__main__":
    main()
