"""Session-wide fixtures shared by every test package."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest

# Tests never talk to a real tracking server or cluster a developer may have configured.
for _var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PLVC_PIPELINE_ID"):
    os.environ.pop(_var, None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


# Test modules that start Ray (in this process or in the stage processes they run). Under
# pytest-xdist (`make test`: -n 2 --dist loadgroup) they all run in one worker, one after the
# other: two local Ray clusters on one machine break each other's token auth.
RAY_MODULES = frozenset(
    {
        "tests/pipeline/test_ray_cluster.py",
        "tests/pipeline/data/test_datasets.py",
        "tests/pipeline/data/test_iframes.py",
        "tests/pipeline/train/test_phases_plvc.py",
        "tests/pipeline/train/test_runner.py",
        "tests/stages/test_hific_stages.py",
        "tests/stages/test_plvc_stages.py",
        "tests/stages/test_cluster_jobs.py",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.pluginmanager.hasplugin("xdist"):
        return
    root = config.rootpath
    for item in items:
        module = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
        uses_ray = (
            module in RAY_MODULES
            or item.get_closest_marker("ray") is not None
            or "ray_local" in getattr(item, "fixturenames", ())
        )
        if uses_ray:
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray (2 CPUs, loopback only) for the whole session, shut down at the end."""
    from pipeline.ray_cluster import init_ray, shutdown_ray

    init_ray(num_cpus=2)
    try:
        yield
    finally:
        shutdown_ray()


@pytest.fixture(scope="session")
def spynet_weights() -> Callable[..., dict]:
    """``make(seed, levels=6)``: random weights laid out like a pretrained SpyNet file
    (sniklaus/pytorch-spynet's ``network-*.pytorch``: 7x7 convs 8-32-64-32-16-2 per level)."""
    import torch

    widths = (8, 32, 64, 32, 16, 2)

    def make(seed: int, levels: int = 6) -> dict:
        generator = torch.Generator().manual_seed(seed)
        state = {}
        for level in range(levels):
            for rank, (cin, cout) in enumerate(itertools.pairwise(widths)):
                key = f"netBasic.{level}.netBasic.{2 * rank}"
                weight = torch.randn(cout, cin, 7, 7, generator=generator) * 0.02
                state[f"{key}.weight"] = weight
                state[f"{key}.bias"] = torch.randn(cout, generator=generator) * 0.02
        return state

    return make
