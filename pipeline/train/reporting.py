"""What a worker reports while it trains: running means of the loss terms (averaged over
ranks) and rank 0's MLflow logging, which never stops a run when the server is away.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MetricAverager",
    "MlflowSink",
]


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
