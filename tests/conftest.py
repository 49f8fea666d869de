"""Session-wide fixtures shared by every test package."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Tests never talk to a real tracking server or cluster a developer may have configured.
for _var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PLVC_PIPELINE_ID"):
    os.environ.pop(_var, None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray (2 CPUs, loopback only) for the whole session, shut down at the end."""
    from pipeline.ray_cluster import init_ray, shutdown_ray

    init_ray(num_cpus=2)
    try:
        yield
    finally:
        shutdown_ray()
