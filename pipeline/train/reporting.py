"""What a worker reports while it trains: running means of the loss terms (averaged over
ranks) and rank 0's MLflow logging, which never stops a run when the server is away.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
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
    """Rank 0's link to the stage's MLflow run, which never slows or stops the training.

    Metrics and images are queued and sent by a background thread, so a step never waits on
    the tracking server. When the server does not answer, the thread keeps the metrics
    (up to ``max_pending`` values, the oldest dropped beyond), drops images (they are
    replaceable; the checkpoint holds the weights), warns once, and retries every
    ``retry_s`` seconds; once the server is back, the kept metrics are logged at their own
    steps. :meth:`close` makes a last attempt and returns what could not be logged.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        run_id: str | None,
        *,
        retry_s: float = 30.0,
        max_pending: int = 200_000,
    ) -> None:
        self.run_id = run_id
        self.failures = 0
        self.retry_s, self.max_pending = retry_s, max_pending
        self._client = None
        self._queue: collections.deque[tuple[str, Any]] = collections.deque()
        self._queued_metrics = 0  # metric values in the queue, kept so a put never rescans it
        self._wake = threading.Condition()
        self._closing = False
        self._offline = False
        self.dropped_metrics = 0
        self.dropped_images = 0
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            # a down server costs a short wait per attempt, not MLflow's default of 7
            # retries with exponential back-off (minutes); this process only trains
            for key, value in _WORKER_HTTP_SETTINGS.items():
                os.environ.setdefault(key, value)
            self._client = MlflowClient(tracking_uri=tracking_uri)
            self._thread = threading.Thread(target=self._send_loop, name="mlflow-sink", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self._client is None or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._put("metrics", [Metric(key, float(v), now, step) for key, v in metrics.items()])

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        if self._client is None:
            return
        if self._offline:
            self.dropped_images += 1
            return
        self._put("image", (key, image, step))

    def close(self, timeout_s: float = 60.0) -> dict[str, int]:
        """Send what is queued (one more attempt if the server was away), wait up to
        ``timeout_s``; returns the counts of what was not logged and of failed attempts."""
        if self._client is not None:
            with self._wake:
                self._closing = True
                self._wake.notify()
            self._thread.join(timeout_s)
        with self._wake:
            left_metrics = self._queued_metrics
            left_images = sum(1 for kind, _ in self._queue if kind == "image")
            self._queue.clear()
            self._queued_metrics = 0
        return {
            "mlflow_unlogged_metrics": left_metrics + self.dropped_metrics,
            "mlflow_unlogged_images": left_images + self.dropped_images,
            "mlflow_failures": self.failures,
        }

    def _put(self, kind: str, payload: Any) -> None:
        with self._wake:
            self._queue.append((kind, payload))
            if kind == "metrics":
                self._queued_metrics += len(payload)
            while self._queued_metrics > self.max_pending:
                kind0, oldest = self._queue.popleft()
                if kind0 == "metrics":
                    self._queued_metrics -= len(oldest)
                    self.dropped_metrics += len(oldest)
                else:
                    self.dropped_images += 1
            self._wake.notify()

    def _send_loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                kind, payload = self._queue[0]
            try:
                self._send(kind, payload)
            except Exception as exc:  # any tracking failure: keep the item, wait, retry
                self.failures += 1
                if not self._offline:
                    print(
                        f"warning: MLflow logging failed ({type(exc).__name__}: {exc}); "
                        f"training goes on, metrics are kept and retried every "
                        f"{self.retry_s:g} s",
                        file=sys.stderr,
                        flush=True,
                    )
                self._offline = True
                with self._wake:
                    if self._closing:
                        return  # that was the last attempt
                    self._wake.wait(self.retry_s)
                continue
            with self._wake:
                if self._queue and self._queue[0][1] is payload:
                    self._queue.popleft()
                    if kind == "metrics":
                        self._queued_metrics -= len(payload)
            if self._offline:
                self._offline = False
                print("MLflow logging works again: the kept metrics are being sent", flush=True)

    def _send(self, kind: str, payload: Any) -> None:
        assert self._client is not None
        if kind == "image":
            key, image, step = payload
            self._client.log_image(self.run_id, image, key=key, step=step)
            return
        for start in range(0, len(payload), 1000):
            self._client.log_batch(self.run_id, metrics=payload[start : start + 1000])


#: MLflow's HTTP client settings in a training worker (a user's own environment wins)
_WORKER_HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
