"""Checkpoints of a training phase: the files, RNG state per rank, and finding the last one of
a Ray Train run to resume.

Layout (one directory per checkpoint, written by rank 0)::

    meta.json          {"format", "phase", "phase_config", "step", "epoch", "world_size",
                        "metrics", "saved_at", "files": {name: bytes}}
    generator.pt       state_dict of the generator
    discriminator.pt   state_dict of the discriminator (GAN phases only)
    optimizers.pt      {"generator", "aux", "discriminator", "schedulers": {name: state}}
    rng.pt             {"per_rank": [{"python", "numpy", "torch", "cuda"} per rank]}
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import ray.data
    import ray.train
from pipeline.train.phase import PhaseModels, PhaseOptimizers, RunnerError, TrainingPhase, unwrap

__all__ = [
    "CHECKPOINT_FORMAT",
    "capture_rng_state",
    "check_resumable",
    "latest_checkpoint",
    "load_checkpoint",
    "load_models",
    "newest_complete_checkpoint",
    "ray_run_dir",
    "read_checkpoint_meta",
    "restore_rng_state",
    "save_checkpoint",
    "seed_everything",
]


def save_checkpoint(
    directory: Path,
    phase: TrainingPhase,
    models: PhaseModels,
    optimizers: PhaseOptimizers,
    *,
    step: int,
    epoch: int,
    rng_per_rank: list[dict[str, Any]],
    metrics: Mapping[str, float],
) -> None:
    """Write a resumable checkpoint of ``models`` (unwrapped if DDP) into ``directory``
    (layout in :mod:`pipeline.train.runner_utils`); ``rng_per_rank`` holds
    :func:`~pipeline.train.checkpoint.capture_rng_state` of every rank."""
    for name, module in models.named().items():
        torch.save(unwrap(module).state_dict(), directory / f"{name}.pt")
    opt_state: dict[str, Any] = {k: o.state_dict() for k, o in optimizers.named().items()}
    opt_state["schedulers"] = {k: s.state_dict() for k, s in optimizers.schedulers.items()}
    torch.save(opt_state, directory / "optimizers.pt")
    torch.save({"per_rank": rng_per_rank}, directory / "rng.pt")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "phase": phase.name,
        "phase_config": phase.config(),
        "step": step,
        "epoch": epoch,
        "world_size": len(rng_per_rank),
        "metrics": dict(metrics),
        "saved_at": time.time(),
        # what a complete copy holds: a checkpoint uploaded by rank 0 but not yet registered
        # by Ray Train when a worker died can be told from a half-copied one
        "files": {p.name: p.stat().st_size for p in sorted(directory.glob("*.pt"))},
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))


def load_models(directory: Path, models: PhaseModels, device: torch.device | str) -> None:
    for name, module in models.named().items():
        path = directory / f"{name}.pt"
        if not path.is_file():
            raise RunnerError(f"checkpoint {directory}: {name}.pt is missing")
        module.load_state_dict(torch.load(path, map_location=device, weights_only=True))


def load_checkpoint(
    directory: Path,
    phase: TrainingPhase,
    models: PhaseModels,
    optimizers: PhaseOptimizers,
    device: torch.device | str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load :func:`save_checkpoint`'s files into built models and optimizers; return the
    meta and the per-rank RNG states (restore one with ``restore_rng_state``)."""
    meta = read_checkpoint_meta(directory)
    if meta["phase"] != phase.name:
        raise RunnerError(
            f"checkpoint {directory} is of phase {meta['phase']!r}, not {phase.name!r}"
        )
    load_models(directory, models, device)
    opt_state = torch.load(directory / "optimizers.pt", map_location=device, weights_only=True)
    for name, opt in optimizers.named().items():
        if name not in opt_state:
            raise RunnerError(f"checkpoint {directory}: no state for the {name} optimizer")
        opt.load_state_dict(opt_state[name])
    for name, scheduler in optimizers.schedulers.items():
        scheduler.load_state_dict(opt_state["schedulers"][name])
    rng = torch.load(directory / "rng.pt", weights_only=True)["per_rank"]
    return meta, rng


def ray_run_dir(storage: str, run_name: str) -> str:
    return f"{storage.rstrip('/')}/{run_name}"


def latest_checkpoint(
    storage: str, run_name: str
) -> tuple[ray.train.Checkpoint, dict[str, Any]] | None:
    """The last registered checkpoint of an earlier run with this name, and its meta."""
    from ray.train import Result

    try:
        result = Result.from_path(ray_run_dir(storage, run_name))
    except RuntimeError:  # no such run folder, or no checkpoint snapshot in it
        return None
    if result.checkpoint is None:
        return None
    ckpt = result.checkpoint
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/meta.json") as f:
        meta = json.loads(f.read().decode())
    return ckpt, meta


def check_resumable(meta: Mapping[str, Any], phase: TrainingPhase, where: str) -> None:
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise RunnerError(
            f"{where}: checkpoint format {meta.get('format')!r} is not {CHECKPOINT_FORMAT}"
        )
    if meta["phase"] != phase.name:
        raise RunnerError(
            f"{where} holds a run of phase {meta['phase']!r}, not {phase.name!r}: "
            "use another run name or delete that folder"
        )
    old, new = meta.get("phase_config", {}), phase.config()
    if old != new:
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)
        raise RunnerError(
            f"{where} holds a run of phase {phase.name!r} with other settings ({diffs}). "
            "Resuming would mix them: delete that folder to start afresh, or use another run name"
        )


CHECKPOINT_FORMAT = 1


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


def newest_complete_checkpoint(
    run_dir: str, after_step: int
) -> tuple[ray.train.Checkpoint, int] | None:
    """The newest checkpoint folder in ``run_dir`` (a Ray Train run's storage folder, local
    or a pyarrow URI) of a step after ``after_step`` whose files are all there at the sizes
    its ``meta.json`` lists: ``(the checkpoint, its step)``, or None.

    Ray Train registers a checkpoint only once every worker has reported it; a worker killed
    between rank 0's upload and that moment leaves a complete checkpoint the restarted run
    would not see, losing up to two intervals of work instead of one.
    """
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(run_dir)
    except (pafs.ArrowInvalid, ValueError):
        fs, root = pafs.LocalFileSystem(), str(Path(run_dir).resolve())
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    steps = []
    for entry in entries:
        name = entry.base_name
        if entry.type == pafs.FileType.Directory and name.startswith("checkpoint_"):
            digits = name.removeprefix("checkpoint_")
            if digits.isdigit() and int(digits) > after_step:
                steps.append((int(digits), entry.path))
    for step, path in sorted(steps, reverse=True):
        try:
            with fs.open_input_stream(f"{path}/meta.json") as f:
                meta = json.loads(f.read().decode())
            files = meta.get("files")
            if meta.get("format") != CHECKPOINT_FORMAT or meta.get("step") != step or not files:
                continue
            infos = fs.get_file_info([f"{path}/{name}" for name in files])
        except (OSError, ValueError):
            continue
        if all(i.type == pafs.FileType.File and i.size == files[i.base_name] for i in infos):
            import ray.train

            return ray.train.Checkpoint(path=path, filesystem=fs), step
    return None
