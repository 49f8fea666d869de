"""GOP-parallel coding: every GOP starts at an I-frame with a fresh recurrent state.

Nothing crosses a GOP boundary (the generator's state and the RPM restart at each I-frame,
paper Fig. 2), so GOPs code independently. :func:`encode_video_parallel` and
:func:`decode_video_parallel` hand them to worker processes and join the results in order.
Each worker runs the networks with ``num_threads`` CPU threads (recorded in the header as
for a serial encoder), so a parallel encode gives *the same bytes* as
:func:`plvc.codec.encode_video` with that thread count, and a parallel decode the same
frames as :func:`plvc.codec.decode_video`: more processes with fewer threads each, which
keeps many cores (or one GPU's host side) busy where a single stream cannot.

Workers are spawned processes (not forked: forking after PyTorch's thread pools started
can deadlock); each receives the model and the intra codec once.
"""

from __future__ import annotations

import dataclasses
import io
import multiprocessing
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from typing import Any

import torch

from plvc.bitstream import (
    FrameRecord,
    FrameType,
    decode_container,
    encode_container,
    frame_type_for_index,
)
from plvc.codec import EncodeResult, Frame, FrameStats, VideoDecoder, VideoEncoder
from plvc.determinism import CodingMode
from plvc.errors import PLVCError
from plvc.generator import PLVC
from plvc.intra import IntraCodec

__all__ = ["decode_video_parallel", "encode_video_parallel", "gop_spans"]

_WORKER: dict[str, Any] = {}


def gop_spans(frame_count: int, gop: int) -> list[tuple[int, int]]:
    """``[start, end)`` of every GOP of a ``frame_count``-frame stream with period ``gop``."""
    starts = [i for i in range(frame_count) if frame_type_for_index(i, gop) is FrameType.I]
    return list(zip(starts, [*starts[1:], frame_count], strict=True))


def _init_worker(codec: bytes, num_threads: int) -> None:
    torch.set_num_threads(num_threads)
    model, intra = torch.load(io.BytesIO(codec), weights_only=False)
    _WORKER.update(model=model, intra=intra, threads=num_threads)


def _encode_gop(
    frames: list[Frame], options: dict[str, Any], want_reconstruction: bool
) -> tuple[list[FrameRecord], list[FrameStats], list[torch.Tensor], bytes]:
    encoder = VideoEncoder(
        _WORKER["model"], _WORKER["intra"], num_threads=_WORKER["threads"], **options
    )
    reconstruction = []
    for frame in frames:
        _, x_hat = encoder.encode_frame(frame)
        if want_reconstruction:
            reconstruction.append(x_hat)
    # the GOP as a stream of its own: its header is the whole stream's but for the count
    return encoder.records, encoder.stats, reconstruction, encoder.finish()


def _decode_gop(stream: bytes) -> tuple[list[torch.Tensor], list[float]]:
    decoder = VideoDecoder(stream, _WORKER["model"], intra=_WORKER["intra"])
    frames, seconds = [], []
    iterator = iter(decoder)
    for _ in range(len(decoder)):
        start = time.perf_counter()
        frames.append(next(iterator))
        seconds.append(time.perf_counter() - start)
    return frames, seconds


def _pool(model: PLVC, intra: IntraCodec, workers: int, num_threads: int) -> ProcessPoolExecutor:
    if workers < 1 or num_threads < 1:
        raise PLVCError(f"workers and num_threads must be >= 1, got {workers}, {num_threads}")
    buffer = io.BytesIO()
    torch.save((model, intra), buffer)
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(buffer.getvalue(), num_threads),
    )


def _in_order(pool: ProcessPoolExecutor, job: Callable[..., Any], jobs: Iterable[tuple]) -> list:
    futures = [pool.submit(job, *args) for args in jobs]
    return [future.result() for future in futures]


def encode_video_parallel(
    frames: Sequence[Frame],
    model: PLVC,
    intra: IntraCodec,
    *,
    gop: int,
    workers: int,
    num_threads: int = 1,
    quality: str = "",
    fps: Fraction | None = None,
    mode: CodingMode | None = None,
    return_reconstruction: bool = False,
) -> EncodeResult:
    """:func:`plvc.codec.encode_video` of ``frames`` with its GOPs coded by ``workers``
    processes of ``num_threads`` CPU threads each; the same bytes as a serial encode with
    ``num_threads``. Frame stats carry each frame's encoding seconds (in its worker)."""
    frames = list(frames)
    if not frames:
        raise PLVCError("no frames to encode")
    first = frames[0]
    height, width = first.shape[-2:] if isinstance(first, torch.Tensor) else first.shape[:2]
    options = {
        "width": int(width),
        "height": int(height),
        "gop": gop,
        "quality": quality,
        "fps": fps,
        "mode": mode,
    }
    spans = gop_spans(len(frames), gop)
    with _pool(model, intra, workers, num_threads) as pool:
        parts = _in_order(
            pool,
            _encode_gop,
            ((frames[a:b], options, return_reconstruction) for a, b in spans),
        )
    records = [record for part in parts for record in part[0]]
    stats = [
        dataclasses.replace(s, index=a + s.index)
        for (a, _), part in zip(spans, parts, strict=True)
        for s in part[1]
    ]
    header, _ = decode_container(parts[0][3])
    header = dataclasses.replace(header, frame_count=len(frames))
    return EncodeResult(
        data=encode_container(header, records),
        header=header,
        frame_stats=stats,
        reconstruction=(
            torch.stack([x for part in parts for x in part[2]]) if return_reconstruction else None
        ),
    )


def decode_video_parallel(
    data: bytes,
    model: PLVC,
    intra: IntraCodec,
    *,
    workers: int,
) -> tuple[torch.Tensor, list[float]]:
    """:func:`plvc.codec.decode_video` with the GOPs decoded by ``workers`` processes (each on
    the stream's thread count): ``(frames [T, 3, H, W], seconds per frame)``."""
    header, records = decode_container(data)
    VideoDecoder(data, model, intra=intra)  # every check of the whole stream, before any work
    spans = gop_spans(header.frame_count, header.gop)
    streams = [
        encode_container(dataclasses.replace(header, frame_count=b - a), records[a:b])
        for a, b in spans
    ]
    with _pool(model, intra, workers, max(header.cpu_threads, 1)) as pool:
        parts = _in_order(pool, _decode_gop, ((stream,) for stream in streams))
    frames = [frame for part in parts for frame in part[0]]
    return torch.stack(frames), [s for part in parts for s in part[1]]
