"""Connecting to Ray: a real cluster when one is named, else a local one on loopback."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import Params

__all__ = ["init_ray", "quiet_placement_group_cleaner", "shutdown_ray"]

# Ray records the last local cluster here; a stale copy makes the next start or
# `ray job submit` try to join a dead cluster.
_CURRENT_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")


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
        runtime_env={"worker_process_setup_hook": quiet_placement_group_cleaner},
    )
    return "local"


def quiet_placement_group_cleaner() -> None:
    """Worker set-up hook of the local Ray (no dashboard, so no state API).

    Ray Train V2's PlacementGroupCleaner asks the state API every second whether the
    controller is alive and, without a dashboard, warns each time; a local cluster is shut
    down with the stage, so there is nothing for it to clean. A dashboard would cost ~2 s per
    stage start on the sample.
    """
    import logging

    logging.getLogger(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    ).setLevel(logging.ERROR)


def shutdown_ray() -> None:
    """Stop the local Ray this process started and remove its stale cluster record."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if not os.environ.get("RAY_ADDRESS"):
        _CURRENT_CLUSTER_FILE.unlink(missing_ok=True)
