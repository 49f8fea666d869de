"""The function Ray Train hands to its workers, in a module that imports nothing heavy.

Ray Train's ``TrainController`` actor deserializes the train function and its loop config
before it starts the workers, so every module they reference is imported once more, in that
process, for each run: torch, CompressAI and the codec cost ~7 s of a 2-core machine's time per
run (measured: a 2-worker run that returns at once took 27-31 s with the phase object in its
config, 21-24 s with the phase as bytes). Here the phase travels pickled and the heavy loop
(:mod:`pipeline.train.worker`) is imported on the workers only.
"""

from __future__ import annotations

import pickle
from typing import Any

__all__ = ["pack_loop_config", "train_worker"]


def pack_loop_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its ``phase`` object as pickle bytes (what :func:`train_worker` takes)."""
    return {**config, "phase": pickle.dumps(config["phase"])}


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker: unpacks the phase and runs
    :func:`pipeline.train.worker.train_worker`."""
    from pipeline.train.worker import train_worker as run_worker

    return run_worker({**config, "phase": pickle.loads(config["phase"])})
