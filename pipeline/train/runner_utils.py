"""Ray-free pieces of the training runner: checkpoint files, RNG state, metric averaging,
rank-0 MLflow logging, sample-image grids and storage paths.

Kept apart from :mod:`pipeline.train.runner` so they can be used (and tested) in one process.

Checkpoint layout (one directory per checkpoint, written by rank 0)::

    meta.json          {"format", "phase", "phase_config", "step", "epoch", "world_size",
                        "metrics", "saved_at"}
    generator.pt       state_dict of the generator
    discriminator.pt   state_dict of the discriminator (GAN phases only)
    optimizers.pt      {"generator", "aux", "discriminator", "schedulers": {name: state}}
    rng.pt             {"per_rank": [{"python", "numpy", "torch", "cuda"} per rank]}
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "MetricAverager",
    "MlflowSink",
    "capture_rng_state",
    "fingerprinted_run_name",
    "image_grid",
    "read_checkpoint_meta",
    "resolve_storage_path",
    "restore_rng_state",
    "seed_everything",
    "to_uint8_image",
    "unwrap",
]

def fingerprinted_run_name(prefix: str, identity: Mapping[str, Any]) -> str:
    """``<prefix>-<10 hex digits>``: a Ray Train run name that changes with ``identity``.

    ``identity`` holds what makes a checkpoint belong to a training (phase settings, seed,
    digests of the init weights and data), but not the step budget. Re-running a killed
    stage then resumes its run and raising the steps continues it, while a changed setting
    or upstream output (``dvc exp run -S ...``) starts a fresh run, where one shared name
    would resume a run trained otherwise (which the runner refuses).
    """
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return f"{prefix}-{hashlib.sha256(blob).hexdigest()[:10]}"


#: bumped when the checkpoint layout changes incompatibly
CHECKPOINT_FORMAT = 1

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def resolve_storage_path(storage_path: str, root: Path) -> str:
    """A URI (``s3://...``) as-is; a relative local path made absolute under ``root``.

    Ray Train wants an absolute path or a URI, and the stage may run from any directory.
    """
    if _URI.match(storage_path):
        return storage_path
    path = Path(storage_path).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """This process's generator states, in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _as_tuple(value: Any) -> Any:
    # random.setstate needs tuples all the way down; a round trip may turn them into lists
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


def read_checkpoint_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of a checkpoint directory, checked for the format this code writes."""
    path = Path(directory) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {directory}: cannot read meta.json: {exc}") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {directory}: format {meta.get('format')!r}, this code reads "
            f"format {CHECKPOINT_FORMAT}"
        )
    return meta


class MetricAverager:
    """Running sums of per-step scalars, averaged over steps (and ranks) when logged.

    Values stay on the device between log steps, so accumulating costs no host sync.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    def add(self, values: Mapping[str, Tensor]) -> None:
        for key, value in values.items():
            v = value.detach().float()
            self._sums[key] = self._sums[key] + v if key in self._sums else v.clone()
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def pop(self, all_reduce: bool) -> dict[str, float]:
        """Means since the last pop; with ``all_reduce``, also averaged over all ranks.

        Every rank must call this at the same step when ``all_reduce`` is set (it is a
        collective). Keys are sorted so the ranks' vectors line up.
        """
        if not self._sums:
            return {}
        keys = sorted(self._sums)
        vector = torch.stack([self._sums[k] for k in keys]) / max(self._count, 1)
        if all_reduce:
            import torch.distributed as dist

            dist.all_reduce(vector, op=dist.ReduceOp.SUM)
            vector /= dist.get_world_size()
        self._sums.clear()
        self._count = 0
        return dict(zip(keys, vector.tolist(), strict=True))


def to_uint8_image(x: Tensor) -> np.ndarray:
    """A float image ``[3, H, W]`` in [0, 1] → uint8 ``[H, W, 3]``."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] image, got shape {tuple(x.shape)}")
    return (x.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def image_grid(*rows: Tensor, max_items: int = 4, pad: int = 2) -> np.ndarray:
    """Images side by side as one uint8 ``[H, W, 3]`` grid: one row per tensor, one column
    per item (e.g. ``image_grid(originals, reconstructions)`` with tensors ``[B, 3, h, w]``
    in [0, 1]). Rows must share ``h, w``; at most ``max_items`` columns.
    """
    if not rows:
        raise ValueError("image_grid needs at least one row of images")
    shape = rows[0].shape[1:]
    for r in rows:
        if r.ndim != 4 or r.shape[1] != 3 or r.shape[1:] != shape:
            shapes = [tuple(t.shape) for t in rows]
            raise ValueError(f"image_grid rows must be [B, 3, h, w] of one size, got {shapes}")
    n = min(max_items, *(r.shape[0] for r in rows))
    _, h, w = shape
    grid = np.full((len(rows) * (h + pad) - pad, n * (w + pad) - pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j in range(n):
            y, x = i * (h + pad), j * (w + pad)
            grid[y : y + h, x : x + w] = to_uint8_image(r[j])
    return grid


class MlflowSink:
    """Rank 0's link to the stage's MLflow run. A failing tracking store only warns:
    a 100k-step run must not die because the tracking server blinked.
    """

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.run_id = run_id
        self.failures = 0
        self._client = None
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self._client is None or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(v), now, step) for key, v in metrics.items()]
        self._call("metrics", self._client.log_batch, self.run_id, metrics=batch)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        if self._client is not None:
            self._call("image", self._client.log_image, self.run_id, image, key=key, step=step)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # any tracking failure: warn and keep training
            self.failures += 1
            if self.failures <= 3:
                print(
                    f"warning: MLflow {what} logging failed ({type(exc).__name__}: {exc}); "
                    "training goes on",
                    file=sys.stderr,
                    flush=True,
                )
