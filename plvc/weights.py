"""Codec bundles: the one file a user needs to encode and decode video.

A ``torch.save`` dict of plain types only, so ``torch.load(weights_only=True)`` reads it::

    {"format": "plvc-weights", "version": 2,
     "config": PLVCConfig.to_dict(),           # rebuilds the generator
     "state_dict": {...},                      # after update(): CDF tables included
     "fingerprint": str,                       # hex model fingerprint (plvc.codec)
     "intra": {"name": str,                    # the I-frame codec the generator pairs with
               "config": dict,                 # rebuilds it; names no file
               "weights_sha256": str | None,   # digest of its weights file (None: untrained)
               "weights": uint8 tensor | None},  # that file's bytes, embedded
     "quality": str, "extra": dict}            # e.g. lambda, training step, git commit

Version 1 files held only the generator and named the intra codec's weights by path; they
still load, and their intra weights are then given explicitly (:func:`load_codec`'s
``intra_weights``, ``plvc --intra-weights``; ``plvc bundle`` converts them).
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
    from plvc.intra import IntraCodec

__all__ = [
    "WEIGHTS_FORMAT",
    "WEIGHTS_VERSION",
    "CodecBundle",
    "WeightsMeta",
    "file_sha256",
    "load_codec",
    "load_weights",
    "read_weights_meta",
    "save_weights",
]

WEIGHTS_FORMAT = "plvc-weights"
WEIGHTS_VERSION = 2
_READABLE_VERSIONS = (1, 2)
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
    """Rebuilds the intra codec with ``get_intra_codec(intra_name, **intra_config)``, plus
    ``weights_sha256`` for a trained one; a format-1 file's also names its ``weights`` path."""
    quality: str
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = WEIGHTS_VERSION
    intra_weights: bytes | None = field(default=None, repr=False)
    """The intra codec's weights file, embedded (format 2)."""

    @property
    def intra_trained(self) -> bool:
        return "weights_sha256" in self.intra_config or "weights" in self.intra_config


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
    intra_weights_data: bytes | None = None,
) -> None:
    """Write a codec bundle atomically: ``model`` (after ``model.update(force=True)``, which
    this calls) and its intra codec, whose weights file (``intra_config["weights"]``, checked
    against ``intra_config["weights_sha256"]`` when given; or ``intra_weights_data``) is
    embedded, so the bundle names no other file."""
    intra_config = dict(intra_config)
    try:
        json.dumps(intra_config)
    except (TypeError, ValueError) as exc:
        raise WeightsError(
            f"intra_config must be JSON-serialisable (it goes into streams): {exc}"
        ) from None
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    intra_weights, digest = _intra_weights_bytes(intra_config, intra_weights_data)
    portable = {k: v for k, v in intra_config.items() if k not in ("weights", "weights_sha256")}
    if digest is not None:
        portable["weights_sha256"] = digest
    model.update(force=True)
    from plvc.codec import model_fingerprint

    payload = {
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "fingerprint": model_fingerprint(model).hex(),
        "intra": {
            "name": str(intra_name),
            "config": portable,
            "weights": (
                torch.frombuffer(bytearray(intra_weights), dtype=torch.uint8)
                if intra_weights is not None
                else None
            ),
        },
        "quality": str(quality),
        "extra": extra,
    }
    _check_plain(payload["config"], "config")
    target = Path(path)
    try:
        atomic_torch_save(payload, target)
    except OSError as exc:
        raise WeightsError(f"{target}: cannot write weights: {exc.strerror or exc}") from None


def _intra_weights_bytes(
    intra_config: Mapping[str, Any], data: bytes | None
) -> tuple[bytes | None, str | None]:
    """The intra codec's weights file bytes and their SHA-256 (``None, None``: untrained)."""
    expected = intra_config.get("weights_sha256")
    if data is None and intra_config.get("weights") is not None:
        path = Path(intra_config["weights"])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise WeightsError(
                f"intra codec weights {path}: cannot read them into the bundle: "
                f"{exc.strerror or exc}"
            ) from None
    if data is None:
        if expected is not None:
            raise WeightsError(
                f"intra config names weights_sha256 {str(expected)[:16]}... but no weights file "
                "to embed: give intra_config['weights'] or intra_weights_data"
            )
        return None, None
    digest = hashlib.sha256(data).hexdigest()
    if expected is not None and expected != digest:
        raise WeightsError(
            f"intra codec weights have SHA-256 {digest[:16]}..., the intra config says "
            f"{str(expected)[:16]}...: a different file"
        )
    return bytes(data), digest


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
    if version not in _READABLE_VERSIONS:
        raise WeightsError(
            f"{path}: weights format version {version!r}, this build reads "
            f"{', '.join(map(str, _READABLE_VERSIONS))}"
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
    embedded = intra.get("weights")
    intra_weights: bytes | None = None
    if embedded is not None:
        if not isinstance(embedded, torch.Tensor) or embedded.dtype != torch.uint8:
            raise WeightsError(f"{path}: 'intra.weights' must be a uint8 tensor of file bytes")
        intra_weights = embedded.cpu().contiguous().numpy().tobytes()
        digest = hashlib.sha256(intra_weights).hexdigest()
        if intra_config.get("weights_sha256") != digest:
            raise WeightsError(
                f"{path}: the embedded intra weights have SHA-256 {digest[:16]}..., the bundle "
                f"says {str(intra_config.get('weights_sha256'))[:16]}...: the file is damaged"
            )
    return WeightsMeta(
        config=config,
        intra_name=intra_name,
        intra_config=intra_config,
        quality=_field(payload, "quality", str, path),
        extra=_field(payload, "extra", dict, path),
        version=version,
        intra_weights=intra_weights,
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


@dataclass
class CodecBundle:
    """A loaded codec bundle: the generator, its intra codec and the file's metadata."""

    model: PLVC
    intra: IntraCodec
    meta: WeightsMeta
    path: Path


def load_codec(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    intra_weights: str | os.PathLike[str] | None = None,
    intra_overrides: Mapping[str, Any] | None = None,
) -> CodecBundle:
    """Load a codec bundle: the generator and the intra codec built from the embedded weights.

    ``intra_weights``: a separate intra weights file, the explicit way to use a format-1
    file (which names its intra weights by a path this never follows) or to replace the
    embedded ones. ``intra_overrides``: other intra config keys (e.g. ``decode_threads``;
    ``allow_random_init`` for an untrained smoke-test intra codec).
    """
    from plvc.intra import get_intra_codec

    p = Path(path)
    model, meta = load_weights(p, map_location=device)
    config = {k: v for k, v in meta.intra_config.items() if k != "weights"}
    config.update(intra_overrides or {})
    if intra_weights is not None:
        config.pop("weights_sha256", None)
        config["weights"] = str(intra_weights)
    elif meta.intra_weights is not None:
        config["weights_data"] = meta.intra_weights
    elif meta.intra_trained:
        named = meta.intra_config.get("weights", "a separate file")
        raise WeightsError(
            f"{p}: a format-{meta.version} weights file without its intra codec's weights "
            f"(they were {named!r}); pass that file explicitly (intra_weights=..., plvc "
            "--intra-weights FILE) or convert the pair to one bundle with 'plvc bundle'"
        )
    try:
        intra = get_intra_codec(meta.intra_name, **config)
    except TypeError as exc:
        shown = {k: v for k, v in config.items() if k != "weights_data"}
        raise WeightsError(
            f"{p}: intra codec {meta.intra_name!r} cannot be built from {shown}: {exc}"
        ) from None
    to = getattr(intra, "to", None)
    if callable(to):
        to(device)
    return CodecBundle(model, intra, meta, p)
