"""Registry of I-frame (intra) codecs.

PLVC codes the first frame of each GOP with an image codec (HiFiC in the paper). Any
codec that turns an image into bytes and back can serve: it registers a factory under a
name, and the bitstream stores that name so the decoder rebuilds the same codec.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from plvc.errors import IntraCodecError

__all__ = [
    "IntraCodec",
    "available_intra_codecs",
    "get_intra_codec",
    "register_intra_codec",
]


@runtime_checkable
class IntraCodec(Protocol):
    """An image codec: ``encode(image) -> bytes`` and ``decode(bytes) -> image``.

    Images are float tensors ``[3, H, W]`` in ``[0, 1]`` whose sides are multiples of
    :attr:`stride`; ``decode(encode(x))`` must give the same pixels in any process.
    """

    name: str
    stride: int

    def encode(self, image: torch.Tensor) -> bytes: ...

    def decode(self, data: bytes, expected_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``expected_size`` ``(H, W)``: what the caller knows the image to be; a payload that
        declares another size raises :class:`~plvc.errors.BitstreamError` before anything is
        decoded (a forged payload must not make the decoder allocate for its own size)."""
        ...


IntraFactory = Callable[..., IntraCodec]

_REGISTRY: dict[str, IntraFactory] = {}
# modules that register codecs when imported; imported lazily so `plvc` stays light
_PROVIDERS: tuple[str, ...] = ("plvc.intra_compressai", "plvc.hific")


def register_intra_codec(name: str, factory: IntraFactory) -> None:
    """Register ``factory(**kwargs) -> IntraCodec`` under ``name``."""
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise IntraCodecError(f"intra codec {name!r} is already registered")
    _REGISTRY[name] = factory


def _load_providers() -> None:
    for module in _PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # only a provider that does not exist yet is optional, not a broken import inside it
            if exc.name != module:
                raise


def available_intra_codecs() -> list[str]:
    """Names that :func:`get_intra_codec` accepts."""
    _load_providers()
    return sorted(_REGISTRY)


def get_intra_codec(name: str, **kwargs: Any) -> IntraCodec:
    """Build the intra codec registered as ``name``."""
    _load_providers()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise IntraCodecError(
            f"unknown intra codec {name!r}; available: {', '.join(sorted(_REGISTRY)) or 'none'}"
        ) from None
    return factory(**kwargs)
