"""Exported generator weights: one file that a user needs to encode and decode video.

A ``torch.save`` dict of plain types only, so ``torch.load(weights_only=True)`` reads it::

    {"format": "plvc-weights", "version": 1,
     "config": PLVCConfig.to_dict(),           # rebuilds the network
     "state_dict": {...},                      # after update(): CDF tables included
     "intra": {"name": str, "config": dict},   # the I-frame codec the weights pair with
     "quality": str, "extra": dict}            # e.g. lambda, training step, git commit

Files are written to a temporary sibling and renamed, so a crash never leaves a
half-written file at the target path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from plvc.errors import PLVCError, WeightsError
from plvc.fileio import atomic_torch_save

if TYPE_CHECKING:
    from plvc.generator import PLVC, PLVCConfig

__all__ = [
    "WEIGHTS_FORMAT",
    "WEIGHTS_VERSION",
    "WeightsMeta",
    "file_sha256",
    "load_weights",
    "read_weights_meta",
    "save_weights",
]

WEIGHTS_FORMAT = "plvc-weights"
WEIGHTS_VERSION = 1
_PLAIN = (str, int, float, bool, type(None))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks: the one file digest of the
    project (weights in streams and manifests, run fingerprints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class WeightsMeta:
    """Everything in a weights file except the tensors."""

    config: PLVCConfig
    intra_name: str
    intra_config: dict[str, Any]
    quality: str
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = WEIGHTS_VERSION


def _check_plain(value: Any, where: str) -> None:
    """Only types ``torch.load(weights_only=True)`` accepts, so the file stays loadable."""
    if isinstance(value, (*_PLAIN, torch.Tensor)):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise WeightsError(f"{where}: key {key!r} is not a string")
            _check_plain(item, f"{where}.{key}")
        return
    raise WeightsError(
        f"{where} is a {type(value).__name__}; weights files hold only str, int, float, bool, "
        "None, lists, dicts and tensors"
    )


def save_weights(
    path: str | os.PathLike[str],
    model: PLVC,
    *,
    intra_name: str,
    intra_config: Mapping[str, Any],
    quality: str,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` (after ``model.update(force=True)``, which this calls) and its
    intra-codec spec to ``path`` atomically."""
    intra_config = dict(intra_config)
    try:
        json.dumps(intra_config)
    except (TypeError, ValueError) as exc:
        raise WeightsError(
            f"intra_config must be JSON-serialisable (it goes into streams): {exc}"
        ) from None
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    model.update(force=True)
    payload = {
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "intra": {"name": str(intra_name), "config": intra_config},
        "quality": str(quality),
        "extra": extra,
    }
    _check_plain(payload["config"], "config")
    target = Path(path)
    try:
        atomic_torch_save(payload, target)
    except OSError as exc:
        raise WeightsError(f"{target}: cannot write weights: {exc.strerror or exc}") from None


def _field(payload: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in payload:
        raise WeightsError(f"{path}: weights file lacks the {key!r} entry")
    value = payload[key]
    if not isinstance(value, kind):
        raise WeightsError(f"{path}: entry {key!r} has type {type(value).__name__}")
    return value


def read_weights_meta(payload: Any, path: Path) -> WeightsMeta:
    """Validate a loaded payload's tags and metadata (not the tensors)."""
    from plvc.generator import PLVCConfig

    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise WeightsError(f"{path}: not a PLVC weights file (no format tag {WEIGHTS_FORMAT!r})")
    version = payload.get("version")
    if version != WEIGHTS_VERSION:
        raise WeightsError(
            f"{path}: weights format version {version!r}, this build reads {WEIGHTS_VERSION}"
        )
    try:
        config = PLVCConfig.from_dict(_field(payload, "config", dict, path))
    except (PLVCError, TypeError) as exc:
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(f"{path}: invalid model config: {exc}") from None
    intra = _field(payload, "intra", dict, path)
    intra_name = intra.get("name")
    intra_config = intra.get("config")
    if not isinstance(intra_name, str) or not isinstance(intra_config, dict):
        raise WeightsError(f"{path}: 'intra' entry must hold a name (str) and a config (dict)")
    return WeightsMeta(
        config=config,
        intra_name=intra_name,
        intra_config=intra_config,
        quality=_field(payload, "quality", str, path),
        extra=_field(payload, "extra", dict, path),
        version=version,
    )


def load_weights(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[PLVC, WeightsMeta]:
    """Rebuild the generator from a weights file; returns ``(model in eval mode, meta)``."""
    from plvc.generator import PLVC

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: weights file not found")
    try:
        payload = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a non-torch or damaged file
        raise WeightsError(f"{p}: cannot read weights file ({type(exc).__name__}: {exc})") from None
    meta = read_weights_meta(payload, p)
    state = _field(payload, "state_dict", dict, p)
    model = PLVC(meta.config)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise WeightsError(f"{p}: state dict does not fit the model config: {exc}") from None
    model.to(map_location)
    model.eval()
    return model, meta
