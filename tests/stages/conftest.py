"""Fixtures for stage tests: a params file whose paths and MLflow store live in tmp."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def small_params(root: Path, **overrides: Any) -> dict[str, Any]:
    """The shipped sample params, shrunk to one short video and pointed into ``root``."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    # every row of Table 1 (the sample lists one): the tests train and evaluate `low`
    data["qualities"] = yaml.safe_load((REPO / "params-full.yaml").read_text())["qualities"]
    for key in data["paths"]:
        data["paths"][key] = str(root / data["paths"][key])
    data["tracking"]["uri"] = f"sqlite:///{root / 'mlflow.db'}"
    data["download"]["sample"].update(
        {"videos": ["carphone_pristine"], "clip_stride": 6, "min_clips": 10}
    )
    data["shard"].update({"rows_per_shard": 8, "row_group_rows": 4, "workers": 2})
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return data


@pytest.fixture
def write_params(tmp_path: Path) -> Callable[..., Path]:
    def _write(**overrides: Any) -> Path:
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(small_params(tmp_path, **overrides)))
        return path

    return _write


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The ``download`` and ``shard`` stages run once on the small sample, for the tests of the
    stages after them: ``{"paths.raw": ..., "paths.shards": ...}``, to pass as overrides to
    ``write_params``. Read-only: a test that changes them must copy them first."""
    from stages import download as download_stage
    from stages import shard as shard_stage

    root = tmp_path_factory.mktemp("sample_shards")
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(small_params(root)))
    try:
        download_stage.main(["--params", str(path)])
        shard_stage.main(["--params", str(path)])
    finally:
        mlflow.set_tracking_uri(None)  # the tests' own stores, not this one
    return {
        "paths.raw": str(root / "data/raw/vimeo_septuplet"),
        "paths.shards": str(root / "data/shards"),
    }
