"""The models of one quality under evaluation: each PLVC phase's exported generator with the
intra codec its I-frames were made with, and that intra codec alone (HiFiC all-intra).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.eval.metrics import EvaluationError
from plvc.bitstream import check_payload_size
from plvc.weights import file_sha256

if TYPE_CHECKING:
    from plvc.generator import PLVC
    from plvc.intra import IntraCodec
    from plvc.weights import WeightsMeta

__all__ = [
    "INTRA_METHOD",
    "PHASES",
    "CachedIntraCodec",
    "PhaseModel",
    "QualityModels",
    "load_quality_models",
    "phase_method",
]


#: PLVC's training phases, in order; each exported model is one method
PHASES = ("single_p", "multi_p", "gan")


#: the I-frame codec alone, every frame intra
INTRA_METHOD = "hific_intra"


def phase_method(phase: str) -> str:
    """Method name of a PLVC phase's model: ``plvc_single_p``, ``plvc_multi_p``, ``plvc_gan``."""
    return f"plvc_{phase}"


class CachedIntraCodec:
    """An intra codec that codes each distinct image once (it is deterministic).

    ``encode`` is keyed by the image's bytes, ``decode`` by the stream's; decoded images
    on the 8-bit grid (HiFiC's) are kept as ``uint8``. :meth:`clear` between sequences.
    """

    def __init__(self, inner: IntraCodec) -> None:
        self.inner = inner
        self.name = inner.name
        self.stride = inner.stride
        self._encoded: dict[bytes, bytes] = {}
        self._decoded: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @property
    def config(self) -> dict[str, Any]:
        from plvc.codec import intra_spec

        return intra_spec(self.inner)[1]

    def clear(self) -> None:
        self._encoded.clear()
        self._decoded.clear()

    @staticmethod
    def _image_key(image: torch.Tensor) -> bytes:
        x = image.detach().float().contiguous().cpu()
        digest = hashlib.sha256(str(tuple(x.shape)).encode())
        digest.update(x.numpy().tobytes())
        return digest.digest()

    def encode(self, image: torch.Tensor) -> bytes:
        key = self._image_key(image)
        payload = self._encoded.get(key)
        if payload is None:
            self.misses += 1
            payload = self.inner.encode(image)
            self._encoded[key] = payload
        else:
            self.hits += 1
        return payload

    def decode(self, data: bytes, expected_size: tuple[int, int] | None = None) -> torch.Tensor:
        key = hashlib.sha256(data).digest()
        cached = self._decoded.get(key)
        if cached is not None:
            check_payload_size("intra payload", tuple(cached.shape[-2:]), expected_size)
            self.hits += 1
            return cached.float().div(255.0) if cached.dtype == torch.uint8 else cached.clone()
        self.misses += 1
        image = self.inner.decode(data, expected_size=expected_size)
        self._remember_decoded(key, image)
        return image

    def _remember_decoded(self, key: bytes, image: torch.Tensor) -> None:
        levels = image.detach().float().cpu().mul(255.0).round()
        on_grid = torch.equal(levels.div(255.0), image.detach().float().cpu())
        self._decoded[key] = levels.to(torch.uint8) if on_grid else image.detach().cpu().clone()

    def remember(self, image: torch.Tensor, payload: bytes, decoded: torch.Tensor) -> None:
        """Seed the cache with a coding of ``image`` done with :attr:`inner` elsewhere."""
        self._encoded.setdefault(self._image_key(image), payload)
        key = hashlib.sha256(payload).digest()
        if key not in self._decoded:
            self._remember_decoded(key, decoded)


@dataclass
class PhaseModel:
    """One PLVC phase's exported generator and the intra codec it pairs with."""

    phase: str
    path: Path
    model: PLVC
    meta: WeightsMeta
    intra: CachedIntraCodec

    @property
    def method(self) -> str:
        return phase_method(self.phase)


@dataclass
class QualityModels:
    """Everything :func:`evaluate_quality` codes with for one quality."""

    quality: str
    phases: list[PhaseModel]
    #: the all-intra method's codec (the quality's ``hific.pt``, else the generators')
    intra: CachedIntraCodec
    intra_source: str
    missing_phases: list[str] = field(default_factory=list)

    def codecs(self) -> list[CachedIntraCodec]:
        out: list[CachedIntraCodec] = [self.intra]
        for p in self.phases:
            if all(p.intra is not c for c in out):
                out.append(p.intra)
        return out


def load_quality_models(
    models_dir: str | os.PathLike[str], quality: str, device: str | torch.device = "cpu"
) -> QualityModels:
    """Load ``models_dir/<quality>/{single_p,multi_p,gan}/generator.pt`` (those present) and
    the intra codecs. Raises :class:`EvaluationError` naming the files when none is present,
    or a :class:`plvc.errors.PLVCError` naming the file that cannot be loaded."""
    from plvc.hific import hific_intra_codec
    from plvc.intra import get_intra_codec
    from plvc.weights import load_weights

    root = Path(models_dir) / quality
    hific_path = root / "hific" / "hific.pt"
    shared: CachedIntraCodec | None = None
    shared_sha = None
    if hific_path.is_file():
        shared = CachedIntraCodec(hific_intra_codec(weights=hific_path, device=device))
        shared_sha = shared.config.get("weights_sha256") or file_sha256(hific_path)
    by_spec: dict[str, CachedIntraCodec] = {}
    phases: list[PhaseModel] = []
    missing: list[str] = []
    for phase in PHASES:
        path = root / phase / "generator.pt"
        if not path.is_file():
            missing.append(phase)
            continue
        model, meta = load_weights(path, map_location=device)
        same_file = (
            shared is not None
            and meta.intra_name == "hific"
            and meta.intra_config.get("weights_sha256") == shared_sha
        )
        if same_file:
            assert shared is not None
            intra = shared
        else:
            spec = repr((meta.intra_name, sorted(meta.intra_config.items())))
            if spec not in by_spec:
                config = dict(meta.intra_config)
                if meta.intra_weights is not None:  # a codec bundle: decode through it
                    config["weights_data"] = meta.intra_weights
                if meta.intra_name == "hific":
                    config["device"] = device
                try:
                    by_spec[spec] = CachedIntraCodec(get_intra_codec(meta.intra_name, **config))
                except TypeError as exc:
                    raise EvaluationError(
                        f"{path}: its intra codec {meta.intra_name!r} {meta.intra_config} "
                        f"cannot be rebuilt: {exc}"
                    ) from None
                if shared is not None:
                    warnings.warn(
                        f"{path} pairs with intra codec {meta.intra_name} "
                        f"{meta.intra_config}, not {hific_path}: coding its I-frames with "
                        "its own",
                        stacklevel=2,
                    )
            intra = by_spec[spec]
        phases.append(PhaseModel(phase, path, model, meta, intra))
    if not phases and shared is None:
        wanted = ", ".join(str(root / p / "generator.pt") for p in PHASES)
        raise EvaluationError(
            f"no trained models for quality {quality!r}: none of {wanted} or {hific_path} "
            f"exists; run the training stages (train_single_p@{quality} ...) first"
        )
    if shared is not None:
        intra, source = shared, str(hific_path)
    else:
        intra, source = phases[0].intra, f"intra codec of {phases[0].path}"
    return QualityModels(quality, phases, intra, source, missing)
