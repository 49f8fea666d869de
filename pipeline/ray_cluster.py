"""Connecting to Ray: a real cluster when one is named, else a local one on loopback."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.config import Params

__all__ = ["init_ray", "ray_session", "shutdown_ray", "skip_known_ray_noise"]

# Ray records the last local cluster here; a stale copy makes the next start or
# `ray job submit` try to join a dead cluster.
_CURRENT_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")
_RAY_NOISE = "Failed to query Ray Train Controller actor state"


def init_ray(params: Params | None = None, *, num_cpus: int | None = None) -> str:
    """Start or join Ray; return ``"local"`` or the cluster address joined.

    ``RAY_ADDRESS`` (set by ``ray job submit`` inside a job) wins over ``ray.address``
    in params; with neither, an embedded single-node cluster is started on 127.0.0.1
    so nothing listens on other interfaces.
    """
    import ray

    if ray.is_initialized():
        return "existing"
    address = os.environ.get("RAY_ADDRESS") or (params.ray.address if params else None)
    if address:
        ray.init(address=address, log_to_driver=True)
        return address
    cpus = num_cpus or (params.ray.num_cpus if params else None)
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
    )
    return "local"


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

    if ray.is_initialized():
        ray.shutdown()
    if not os.environ.get("RAY_ADDRESS"):
        _CURRENT_CLUSTER_FILE.unlink(missing_ok=True)


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
