"""PLVC: Perceptual Learned Video Compression with a recurrent conditional GAN.

The codec library: the generator (:class:`PLVC`), intra codecs, the bitstream and the
video encode/decode API. Pure PyTorch + CompressAI; importing ``plvc`` loads only the
error types, everything else on first use.

    >>> import plvc
    >>> model, meta = plvc.load_weights("weights.pt")
    >>> intra = plvc.get_intra_codec(meta.intra_name, **meta.intra_config)
    >>> result = plvc.encode_video(frames, model, intra, gop=9, quality=meta.quality)
    >>> frames_hat = plvc.decode_video(result.data, model)
"""

from __future__ import annotations

import importlib
from typing import Any

from plvc.errors import BitstreamError, IntraCodecError, PLVCError, VideoIOError, WeightsError

__all__ = [
    "PLVC",
    "BitstreamError",
    "CodingMode",
    "EncodeResult",
    "FrameStats",
    "IntraCodec",
    "IntraCodecError",
    "PLVCConfig",
    "PLVCError",
    "VideoDecoder",
    "VideoEncoder",
    "VideoIOError",
    "WeightsError",
    "WeightsMeta",
    "available_intra_codecs",
    "decode_video",
    "encode_video",
    "get_intra_codec",
    "load_weights",
    "read_video",
    "register_intra_codec",
    "save_weights",
    "write_video",
]

# public name -> module that defines it; imported lazily (torch, CompressAI, OpenCV)
_LAZY = {
    "PLVC": "plvc.generator",
    "PLVCConfig": "plvc.generator",
    "CodingMode": "plvc.determinism",
    "EncodeResult": "plvc.codec",
    "FrameStats": "plvc.codec",
    "VideoDecoder": "plvc.codec",
    "VideoEncoder": "plvc.codec",
    "decode_video": "plvc.codec",
    "encode_video": "plvc.codec",
    "IntraCodec": "plvc.intra",
    "available_intra_codecs": "plvc.intra",
    "get_intra_codec": "plvc.intra",
    "register_intra_codec": "plvc.intra",
    "WeightsMeta": "plvc.weights",
    "load_weights": "plvc.weights",
    "save_weights": "plvc.weights",
    "read_video": "plvc.video_io",
    "write_video": "plvc.video_io",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'plvc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
