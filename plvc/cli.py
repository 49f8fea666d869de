"""``plvc``: encode a video to a PLVC stream, decode it, or describe a stream.

    plvc encode clip.y4m -o clip.plvc --weights models/low/gan/generator.pt --gop 9
    plvc decode clip.plvc -o decoded.y4m --weights models/low/gan/generator.pt
    plvc info clip.plvc
    plvc bundle old_generator.pt --intra-weights hific.pt -o bundle.pt

``--weights`` is a codec bundle: the generator and its intra codec's weights in one file
(what the training stages export), so a stream decodes anywhere that file is copied.

Bad input (unreadable video, corrupt stream, wrong weights) prints one line on stderr
and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from plvc.errors import PLVCError

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"quality\": 3}'")
    return value


def _gop(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError("GOP must be -1 (a single I-frame) or >= 1")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plvc",
        description="Perceptual Learned Video Compression (PLVC): real bitstreams from a "
        "trained generator and an intra (I-frame) codec.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    enc = sub.add_parser(
        "encode",
        help="encode a video to a .plvc stream",
        description="Encode INPUT (.y4m, raw .yuv, a folder of PNGs, or any video OpenCV "
        "reads) to a PLVC stream. Frames of any size are padded internally and cropped "
        "back on decode.",
    )
    enc.add_argument("input", type=Path, help="input video: .y4m, .yuv, PNG folder, or video file")
    enc.add_argument("-o", "--output", type=Path, required=True, help="output stream file")
    enc.add_argument(
        "--weights", type=Path, required=True, help="codec bundle (generator + intra codec)"
    )
    _intra_weights_argument(enc)
    enc.add_argument(
        "--gop",
        type=_gop,
        default=9,
        help="I-frame period: an I-frame every N frames; -1 for one I-frame (default 9, "
        "as in the paper's evaluation)",
    )
    enc.add_argument("--size", metavar="WxH", help="frame size of a raw .yuv input, e.g. 416x240")
    enc.add_argument(
        "--frames", type=_positive, metavar="N", help="encode at most the first N frames"
    )
    enc.add_argument(
        "--fps",
        type=Fraction,
        help="frame rate to record when the input has none (e.g. 30000/1001)",
    )
    enc.add_argument(
        "--intra",
        metavar="NAME",
        help="intra codec for I-frames (default: the one stored in the weights file)",
    )
    enc.add_argument(
        "--intra-config",
        type=_json_object,
        metavar="JSON",
        help="intra codec settings; with --intra the full config, otherwise keys that "
        "replace those from the weights file",
    )
    enc.add_argument("--quality", help="quality label stored in the stream (default: the weights')")
    enc.add_argument(
        "--matrix",
        choices=("bt601", "bt709"),
        default="bt601",
        help="YCbCr matrix of .y4m/.yuv input (limited range; default bt601)",
    )
    enc.add_argument(
        "--device",
        default="cpu",
        help="torch device, e.g. cpu or cuda (default cpu; decode "
        "on the same device type for bit-exact reconstruction)",
    )
    enc.add_argument(
        "--threads",
        type=_positive,
        metavar="N",
        help="CPU threads for coding (default: torch's); recorded in the stream so a CPU "
        "decoder uses the same count and reproduces the reconstruction exactly",
    )
    enc.add_argument(
        "--entropy-parameters",
        choices=("portable", "device", "exact"),
        default="portable",
        help="where the probability model runs: portable (CPU, float32, one thread: the "
        "latents decode identically with any thread count or accelerator; default), "
        "device (where the frames are: faster on a GPU, bit-exact on the same device type) "
        "or exact (CPU integer arithmetic: identical latents on any machine, slower)",
    )
    enc.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default="float32",
        help="precision of the transforms (bfloat16: several times faster on CPUs with "
        "AMX and on GPUs, slightly other pictures; default float32); recorded in the stream",
    )
    enc.add_argument(
        "--memory-format",
        choices=("channels-last", "nchw"),
        default="channels-last",
        help="memory format of the transforms (default channels-last, the faster on CPUs); "
        "recorded in the stream",
    )
    enc.add_argument(
        "--estimate-bits",
        action="store_true",
        help="also report the entropy model's estimated rate (one extra forward pass per frame)",
    )
    enc.add_argument(
        "--stats", type=Path, metavar="JSON", help="write per-frame statistics to this JSON file"
    )
    enc.add_argument("-f", "--force", action="store_true", help="overwrite OUTPUT if it exists")

    dec = sub.add_parser(
        "decode",
        help="decode a .plvc stream to PNGs or Y4M",
        description="Decode a PLVC stream. OUTPUT ending in .y4m is written as Y4M "
        "(4:2:0, even sizes only); anything else is a folder of frame_00001.png, ...",
    )
    dec.add_argument("input", type=Path, help="PLVC stream file")
    dec.add_argument("-o", "--output", type=Path, required=True, help="OUT.y4m or a folder")
    dec.add_argument(
        "--weights", type=Path, required=True, help="the codec bundle the stream was encoded with"
    )
    _intra_weights_argument(dec)
    dec.add_argument(
        "--intra-config",
        type=_json_object,
        metavar="JSON",
        help="replace keys of the intra codec config ("
        '{"allow_random_init": true} to decode a smoke-test stream of an untrained intra codec)',
    )
    dec.add_argument(
        "--matrix", choices=("bt601", "bt709"), default="bt601", help="YCbCr matrix of Y4M output"
    )
    dec.add_argument("--device", default="cpu", help="torch device (default cpu)")
    dec.add_argument(
        "--threads",
        type=_positive,
        metavar="N",
        help="CPU threads (default: the stream's, which reproduces the encoder's pictures bit "
        "for bit; another count decodes the same latents of a portable stream, with pictures "
        "that may differ in the last bits)",
    )
    dec.add_argument("-f", "--force", action="store_true", help="overwrite OUTPUT if it exists")

    bundle = sub.add_parser(
        "bundle",
        help="write one codec bundle from a generator file and its intra weights",
        description="Write a codec bundle (format 2): the generator of WEIGHTS and the intra "
        "codec's weights file embedded, so encode and decode need only this one file. "
        "Converts format-1 generator files, which named their intra weights by path.",
    )
    bundle.add_argument("input", type=Path, help="generator weights file (format 1 or 2)")
    bundle.add_argument("-o", "--output", type=Path, required=True, help="bundle file to write")
    _intra_weights_argument(bundle)
    bundle.add_argument("-f", "--force", action="store_true", help="overwrite OUTPUT if it exists")

    info = sub.add_parser("info", help="print a stream's header and rate summary")
    info.add_argument("input", type=Path, help="PLVC stream file")
    info.add_argument("--frames", action="store_true", help="also list every frame's size")
    return parser


def _intra_weights_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--intra-weights",
        type=Path,
        metavar="FILE",
        help="the intra codec's weights as a separate file: needed for format-1 generator "
        "files (which name it by path, never followed), or to replace the bundle's",
    )


def _check_output(path: Path, force: bool) -> None:
    if force or not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    raise PLVCError(f"{path} already exists (use --force to overwrite)")


def _encode(args: argparse.Namespace) -> str:
    from plvc.codec import VideoEncoder
    from plvc.determinism import CodingMode
    from plvc.fileio import atomic_write_bytes
    from plvc.intra import IntraCodec, get_intra_codec
    from plvc.video_io import open_video
    from plvc.weights import load_codec, load_weights

    _check_output(args.output, args.force)
    reader = open_video(args.input, size=args.size, max_frames=args.frames, matrix=args.matrix)
    intra: IntraCodec
    if args.intra is not None:
        model, meta = load_weights(args.weights, map_location=args.device)
        intra_config = dict(args.intra_config or {})
        if args.intra_weights is not None:
            intra_config["weights"] = str(args.intra_weights)
        try:
            intra = get_intra_codec(args.intra, **intra_config)
        except TypeError as exc:
            raise PLVCError(
                f"intra codec {args.intra!r}: bad config {intra_config}: {exc}"
            ) from None
        if hasattr(intra, "to"):
            intra.to(args.device)
    else:
        bundle = load_codec(
            args.weights,
            args.device,
            intra_weights=args.intra_weights,
            intra_overrides=args.intra_config,
        )
        model, meta, intra = bundle.model, bundle.meta, bundle.intra
    quality = args.quality if args.quality is not None else meta.quality
    fps = reader.fps if reader.fps is not None else args.fps

    start = time.perf_counter()
    encoder = VideoEncoder(
        model,
        intra,
        width=reader.width,
        height=reader.height,
        gop=args.gop,
        quality=quality,
        fps=fps,
        estimate_bits=args.estimate_bits,
        num_threads=args.threads,
        mode=CodingMode(
            entropy_parameters=args.entropy_parameters,
            precision=args.precision,
            channels_last=args.memory_format == "channels-last",
        ),
    )
    for frame in reader:
        encoder.encode_frame(frame)
    data = encoder.finish()
    atomic_write_bytes(args.output, data)
    seconds = time.perf_counter() - start

    stats = encoder.stats
    pixels = len(stats) * reader.width * reader.height
    if args.stats is not None:
        atomic_write_bytes(
            args.stats,
            json.dumps(
                {
                    "frames": [s.__dict__ for s in stats],
                    "width": reader.width,
                    "height": reader.height,
                    "stream_bytes": len(data),
                    "bpp": 8 * len(data) / pixels,
                },
                indent=1,
            ).encode(),
        )
    summary = (
        f"encoded {len(stats)} frames {reader.width}x{reader.height} -> {args.output}: "
        f"{len(data)} bytes, {8 * len(data) / pixels:.4f} bpp "
        f"({sum(s.frame_type == 'I' for s in stats)} I, "
        f"{sum(s.frame_type == 'P' for s in stats)} P; gop {args.gop}) in {seconds:.1f} s"
    )
    if args.estimate_bits and all(s.estimated_bits is not None for s in stats):
        estimated = sum(s.estimated_bits or 0.0 for s in stats)
        summary += f"; model estimate {estimated / pixels:.4f} bpp"
    return summary


def _decode(args: argparse.Namespace) -> str:
    from plvc.bitstream import decode_container
    from plvc.codec import VideoDecoder
    from plvc.video_io import PngFolderWriter, Y4MWriter, tensor_to_frames
    from plvc.weights import load_codec, load_weights

    _check_output(args.output, args.force)
    try:
        data = args.input.read_bytes()
    except OSError as exc:
        raise PLVCError(f"{args.input}: cannot read: {exc.strerror or exc}") from None
    try:
        # every check on the container before loading any model
        decode_container(data)
    except PLVCError as exc:
        raise type(exc)(f"{args.input}: {exc}") from None
    start = time.perf_counter()
    try:
        if args.intra_config and args.intra_config.get("allow_random_init"):
            # a smoke-test stream: its untrained intra codec is rebuilt from its own config
            model, _ = load_weights(args.weights, map_location=args.device)
            decoder = VideoDecoder(
                data, model, intra_overrides=args.intra_config, num_threads=args.threads
            )
        else:
            bundle = load_codec(
                args.weights,
                args.device,
                intra_weights=args.intra_weights,
                intra_overrides=args.intra_config,
            )
            decoder = VideoDecoder(data, bundle.model, intra=bundle.intra, num_threads=args.threads)
    except PLVCError as exc:
        raise type(exc)(f"{args.input}: {exc}") from None
    header = decoder.header
    fps = Fraction(*header.fps) if header.fps else None
    is_y4m = args.output.suffix.lower() == ".y4m"
    writer: Y4MWriter | PngFolderWriter = (
        Y4MWriter(args.output, fps, args.matrix) if is_y4m else PngFolderWriter(args.output)
    )
    with writer:
        for frame in decoder:
            writer.write(tensor_to_frames(frame)[0])
    seconds = time.perf_counter() - start
    pixels = header.frame_count * header.width * header.height
    return (
        f"decoded {header.frame_count} frames {header.width}x{header.height} -> "
        f"{args.output}: {len(data)} bytes, {8 * len(data) / pixels:.4f} bpp in {seconds:.1f} s"
    )


def _bundle(args: argparse.Namespace) -> str:
    from plvc.weights import load_weights, save_weights

    _check_output(args.output, args.force)
    model, meta = load_weights(args.input)
    config = {k: v for k, v in meta.intra_config.items() if k != "weights"}
    data = meta.intra_weights
    if args.intra_weights is not None:
        try:
            data = args.intra_weights.read_bytes()
        except OSError as exc:
            raise PLVCError(f"{args.intra_weights}: cannot read: {exc.strerror or exc}") from None
    elif data is None and meta.intra_trained:
        raise PLVCError(
            f"{args.input} does not embed its intra codec's weights (they were "
            f"{meta.intra_config.get('weights', 'a separate file')!r}): pass --intra-weights FILE"
        )
    save_weights(
        args.output,
        model,
        intra_name=meta.intra_name,
        intra_config=config,
        quality=meta.quality,
        extra=meta.extra,
        intra_weights_data=data,
    )
    from plvc.codec import model_fingerprint

    return (
        f"wrote codec bundle {args.output} ({args.output.stat().st_size} bytes): generator "
        f"{model_fingerprint(model).hex()}, intra codec {meta.intra_name}"
        + (f" with embedded weights ({len(data)} bytes)" if data is not None else " (untrained)")
    )


def _info(args: argparse.Namespace) -> str:
    from plvc.bitstream import read_stream

    header, frames = read_stream(args.input)
    size = args.input.stat().st_size
    pixels = header.frame_count * header.width * header.height
    by_type: dict[str, list[int]] = {"I": [], "P": []}
    for record in frames:
        by_type[record.frame_type.name].append(record.payload_bytes)
    payload = sum(map(sum, by_type.values()))
    fps = f"{header.fps[0]}/{header.fps[1]}" if header.fps else "unknown"
    lines = [
        f"file       {args.input} ({size} bytes)",
        f"format     PLVC version {header.version}",
        f"frames     {header.frame_count} of {header.width}x{header.height} (coded "
        f"{header.coded_width}x{header.coded_height}), fps {fps}",
        f"gop        {header.gop}" + (" (single I-frame)" if header.gop == -1 else ""),
        f"quality    {header.quality or '-'}",
        f"intra      {header.intra_name} {json.dumps(header.intra_config, sort_keys=True)}, "
        f"fingerprint {header.intra_fingerprint.hex()}",
        f"model      fingerprint {header.model_fingerprint.hex()}",
        f"coding     {header.coding_mode.describe()}, "
        + (f"{header.cpu_threads} CPU threads" if header.cpu_threads else "on an accelerator"),
    ]
    for kind, sizes in by_type.items():
        if sizes:
            lines.append(
                f"{kind}-frames   {len(sizes)}: {sum(sizes)} bytes "
                f"(mean {sum(sizes) / len(sizes):.0f}, min {min(sizes)}, max {max(sizes)})"
            )
    lines += [
        f"overhead   {size - payload} bytes (header and framing, "
        f"{100 * (size - payload) / size:.1f}%)",
        f"bpp        {8 * size / pixels:.4f} (payload only {8 * payload / pixels:.4f})",
    ]
    if args.frames:
        for i, record in enumerate(frames):
            parts = "+".join(str(len(s)) for s in record.strings)
            lines.append(
                f"  {i:5d} {record.frame_type.name} {record.payload_bytes:8d} B  ({parts})"
            )
    return "\n".join(lines)


_COMMANDS = {"encode": _encode, "decode": _decode, "bundle": _bundle, "info": _info}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``plvc`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    # CompressAI 1.2.8 triggers torch's torch.jit.script deprecation warning at import
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    try:
        print(_COMMANDS[args.command](args))
    except PLVCError as exc:
        print(f"plvc {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"plvc {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"plvc {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
