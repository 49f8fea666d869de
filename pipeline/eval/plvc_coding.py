"""One test sequence through a PLVC codec and back: real bytes, decoded frames, timings.

:func:`code_serially` codes frame by frame in this process (progress per frame);
:func:`code_gops_in_parallel` hands the GOPs to worker processes (:mod:`plvc.parallel`),
for machines with more cores (or a GPU) than one stream keeps busy. Both check that the
decoder reproduced the encoder's reconstruction, frame by frame.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from plvc.codec import VideoDecoder, VideoEncoder
from plvc.generator import PLVC
from plvc.intra import IntraCodec

__all__ = ["CodedSequence", "code_gops_in_parallel", "code_serially", "to_uint8"]


def to_uint8(frame: torch.Tensor) -> np.ndarray:
    """Float ``[3, H, W]`` in [0, 1] -> ``uint8 [H, W, 3]`` (what a decoder writes to a file)."""
    x = frame.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


def _digest(frame: np.ndarray) -> bytes:
    return hashlib.sha256(frame.tobytes()).digest()


@dataclass
class CodedSequence:
    """A coded and decoded sequence: the stream, per-frame types and payload bytes, the
    decoded ``uint8 [T, H, W, 3]`` frames, and the P-frames' encode/decode seconds."""

    data: bytes
    types: list[str]
    payloads: list[int]
    decoded: np.ndarray
    #: decoded frames that differ from the encoder's reconstruction (should be 0)
    mismatches: int
    encode_seconds: list[float] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)


def code_serially(
    frames: np.ndarray,
    model: PLVC,
    intra: IntraCodec,
    progress: Callable[[float], Any],
    **options: Any,
) -> CodedSequence:
    """Encode ``frames`` (``uint8 [T, H, W, 3]``) frame by frame, decode the bytes back.
    ``options``: :class:`~plvc.codec.VideoEncoder`'s (gop, quality, fps, mode)."""
    height, width = frames.shape[1:3]
    encoder = VideoEncoder(model, intra, width=width, height=height, **options)
    digests, types, payloads, encode_s = [], [], [], []
    for frame in frames:
        start = time.perf_counter()
        stats, x_hat = encoder.encode_frame(frame)
        if stats.frame_type == "P":  # the I-frames are the intra codec's (measured alone)
            encode_s.append(time.perf_counter() - start)
        digests.append(_digest(to_uint8(x_hat)))
        types.append(stats.frame_type)
        payloads.append(stats.payload_bytes)
        progress(0.5)
    data = encoder.finish()
    decoder = VideoDecoder(data, model, intra=intra)
    decoded = np.empty((len(decoder), *frames.shape[1:]), dtype=np.uint8)
    decode_s, mismatches, iterator = [], 0, iter(decoder)
    for i in range(len(decoder)):
        start = time.perf_counter()
        frame = next(iterator)
        if types[i] == "P":
            decode_s.append(time.perf_counter() - start)
        decoded[i] = to_uint8(frame)
        mismatches += _digest(decoded[i]) != digests[i]
        progress(0.5)
    return CodedSequence(data, types, payloads, decoded, mismatches, encode_s, decode_s)


def code_gops_in_parallel(
    frames: np.ndarray, model: PLVC, intra: IntraCodec, workers: int, **options: Any
) -> CodedSequence:
    """:func:`code_serially` with the GOPs in ``workers`` processes of ``cores / workers``
    CPU threads each (:mod:`plvc.parallel`); the timings are each frame's in its worker."""
    from plvc.parallel import decode_video_parallel, encode_video_parallel

    result = encode_video_parallel(
        frames,
        model,
        intra,
        workers=workers,
        num_threads=max(1, torch.get_num_threads() // workers),
        return_reconstruction=True,
        **options,
    )
    assert result.reconstruction is not None
    images, seconds = decode_video_parallel(result.data, model, intra, workers=workers)
    types = [s.frame_type for s in result.frame_stats]
    decoded = np.stack([to_uint8(image) for image in images])
    digests = [_digest(to_uint8(x)) for x in result.reconstruction]
    p_frames = [i for i, kind in enumerate(types) if kind == "P"]
    return CodedSequence(
        data=result.data,
        types=types,
        payloads=[s.payload_bytes for s in result.frame_stats],
        decoded=decoded,
        mismatches=sum(_digest(a) != b for a, b in zip(decoded, digests, strict=False)),
        encode_seconds=[result.frame_stats[i].seconds or 0.0 for i in p_frames],
        decode_seconds=[seconds[i] for i in p_frames],
    )
