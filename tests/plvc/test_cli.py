"""The ``plvc`` command: encode/decode round trips in separate processes, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from plvc.bitstream import read_stream
from plvc.cli import main
from plvc.codec import decode_video, encode_video
from plvc.determinism import CodingMode
from plvc.generator import PLVC
from plvc.intra_compressai import CompressAIIntraCodec
from plvc.video_io import PngFolderWriter, Y4MWriter, read_video, tensor_to_frames, write_video

from .test_codec import make_codec_pair

PLVC_BIN = Path(sys.executable).parent / "plvc"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the installed ``plvc`` entry point (or ``python -m plvc.cli``) in a new process."""
    command = [str(PLVC_BIN)] if PLVC_BIN.exists() else [sys.executable, "-m", "plvc.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


@dataclass
class Setup:
    folder: Path
    model: PLVC
    intra: CompressAIIntraCodec
    weights: Path
    frames: np.ndarray  # uint8 [T, H, W, 3]


@pytest.fixture(scope="module")
def setup(carphone: torch.Tensor, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    folder = tmp_path_factory.mktemp("cli")
    model, intra, weights = make_codec_pair(folder, seed=2)
    frames = tensor_to_frames(carphone[:4, :, :100, :150])
    return Setup(folder, model, intra, weights, frames)


def test_y4m_round_trip_from_the_command_line(setup: Setup) -> None:
    source = setup.folder / "clip.y4m"
    write_video(source, setup.frames, fps=Fraction(30000, 1001))
    stream = setup.folder / "clip.plvc"
    encoded = run_cli("encode", source, "-o", stream, "--weights", setup.weights, "--gop", "3")
    assert encoded.returncode == 0, encoded.stderr
    assert encoded.stdout.count("\n") == 1
    assert "encoded 4 frames 150x100" in encoded.stdout and "bpp" in encoded.stdout
    header, records = read_stream(stream)
    assert [r.frame_type.name for r in records] == ["I", "P", "P", "I"]
    assert header.fps == (30000, 1001) and header.quality == "low"

    # the CLI's stream is exactly what the library makes from the same frames
    video = read_video(source)

    def library_stream(mode: CodingMode | None = None) -> bytes:
        return encode_video(
            video.frames,
            setup.model,
            setup.intra,
            gop=3,
            quality="low",
            fps=video.fps,
            num_threads=header.cpu_threads,
            mode=mode,
        ).data

    assert library_stream() == stream.read_bytes()

    decoded_path = setup.folder / "decoded.y4m"
    decoded = run_cli("decode", stream, "-o", decoded_path, "--weights", setup.weights)
    assert decoded.returncode == 0, decoded.stderr
    assert "decoded 4 frames 150x100" in decoded.stdout
    # another process wrote the same Y4M as this process's decode
    expected = setup.folder / "expected.y4m"
    with Y4MWriter(expected, Fraction(30000, 1001)) as writer:
        for frame in tensor_to_frames(
            decode_video(stream.read_bytes(), setup.model, intra=setup.intra)
        ):
            writer.write(frame)
    assert decoded_path.read_bytes() == expected.read_bytes()

    # the coding mode options reach the stream's header and code as the library does
    fast = setup.folder / "fast.plvc"
    options = ("--entropy-parameters", "device", "--precision", "bfloat16")
    encoded = run_cli(
        "encode", source, "-o", fast, "--weights", setup.weights, "--gop", "3", *options
    )
    assert encoded.returncode == 0, encoded.stderr
    mode = CodingMode(entropy_parameters="device", precision="bfloat16")
    assert read_stream(fast)[0].coding_mode == mode
    assert library_stream(mode) == fast.read_bytes()


def test_png_folder_round_trip_with_odd_size(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    source = setup.folder / "pngs"
    write_video(source, setup.frames[:3, :99, :149])  # odd sizes: padding both ways
    stream = setup.folder / "pngs.plvc"
    status = main(
        ["encode", str(source), "-o", str(stream), "--weights", str(setup.weights), "--gop", "-1"]
    )
    assert status == 0
    assert "encoded 3 frames 149x99" in capsys.readouterr().out

    out = setup.folder / "decoded_pngs"
    decoded = run_cli("decode", stream, "-o", out, "--weights", setup.weights)
    assert decoded.returncode == 0, decoded.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"frame_{i:05d}.png" for i in (1, 2, 3)]
    expected = tensor_to_frames(decode_video(stream.read_bytes(), setup.model, intra=setup.intra))
    np.testing.assert_array_equal(read_video(out).frames, expected)


def test_corrupt_stream_exits_2_with_one_line(setup: Setup) -> None:
    data = bytearray(write_small_stream(setup))
    data[len(data) // 2] ^= 0x10
    corrupt = setup.folder / "corrupt.plvc"
    corrupt.write_bytes(bytes(data))
    result = run_cli("decode", corrupt, "-o", setup.folder / "x.y4m", "--weights", setup.weights)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "corrupt.plvc" in result.stderr and "CRC32 mismatch" in result.stderr
    assert not (setup.folder / "x.y4m").exists()


def write_small_stream(setup: Setup) -> bytes:
    path = setup.folder / "small.plvc"
    if not path.exists():
        frames = setup.frames[:2, :64, :64]
        path.write_bytes(encode_video(frames, setup.model, setup.intra, gop=-1).data)
    return path.read_bytes()


def test_info_prints_the_header(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    path = setup.folder / "small.plvc"
    write_small_stream(setup)
    assert main(["info", str(path), "--frames"]) == 0
    out = capsys.readouterr().out
    assert "frames     2 of 64x64 (coded 64x64)" in out
    assert "gop        -1 (single I-frame)" in out
    assert "intra      compressai" in out and "bpp" in out
    assert "    0 I" in out and "    1 P" in out
    assert "coding     entropy parameters portable, float32, channels-last" in out


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda s: ["info", s.folder / "nothing.plvc"], "nothing.plvc: cannot read stream"),
        (
            lambda s: [
                "encode",
                s.folder / "raw.yuv",
                "-o",
                s.folder / "o",
                "--weights",
                s.weights,
            ],
            "needs the frame size",
        ),
        (
            lambda s: ["encode", s.folder / "in.y4m", "-o", s.folder / "o", "--weights", s.folder],
            "weights file not found",
        ),
        (
            lambda s: ["decode", s.folder / "small.plvc", "-o", s.folder, "--weights", s.weights],
            "already exists (use --force",
        ),
    ],
)
def test_user_errors_exit_2(
    setup: Setup, capsys: pytest.CaptureFixture[str], make_args: object, message: str
) -> None:
    write_small_stream(setup)
    (setup.folder / "raw.yuv").write_bytes(bytes(96))
    write_video(setup.folder / "in.y4m", setup.frames[:1, :16, :16])
    args = [str(a) for a in make_args(setup)]  # type: ignore[operator]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_corrupt_weights_file_exits_2(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    bad = setup.folder / "bad_weights.pt"
    bad.write_bytes(b"\x00" * 64)
    stream = setup.folder / "small.plvc"
    write_small_stream(setup)
    out = setup.folder / "never.y4m"
    assert main(["decode", str(stream), "-o", str(out), "--weights", str(bad)]) == 2
    assert "bad_weights.pt: cannot read weights file" in capsys.readouterr().err
    assert not out.exists()


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("encode", "decode", "info"))
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", "x.y4m"])  # missing -o and --weights
    assert exit_info.value.code == 2


def test_png_writer_keeps_frames_of_an_interrupted_decode(tmp_path: Path) -> None:
    writer = PngFolderWriter(tmp_path / "out")
    writer.write(np.zeros((4, 4, 3), np.uint8))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["frame_00001.png"]


def _truncated_y4m(folder: Path, frames: np.ndarray) -> Path:
    """Two whole frames, then half of the third: the encoder has coded frames when it fails."""
    path = folder / "truncated.y4m"
    write_video(path, frames[:3, :16, :16])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 16 * 16 // 2])
    return path


def _yuv_not_a_frame_multiple(folder: Path, frames: np.ndarray) -> Path:
    path = folder / "ragged.yuv"
    path.write_bytes(bytes(16 * 16 * 3 // 2 * 2 + 100))
    return path


def _png_folder(folder: Path, frames: np.ndarray, last: bytes | np.ndarray) -> Path:
    import cv2

    out = folder / ("pngs_bad" if isinstance(last, bytes) else "pngs_sized")
    write_video(out, frames[:2, :16, :16])
    target = out / "frame_00003.png"
    if isinstance(last, bytes):
        target.write_bytes(last)
    else:
        cv2.imwrite(str(target), last)
    return out


def _odd_y4m(folder: Path, frames: np.ndarray) -> Path:
    path = folder / "odd.y4m"
    path.write_bytes(b"YUV4MPEG2 W15 H16 F25:1 C420jpeg\nFRAME\n" + bytes(15 * 16 * 2))
    return path


def _junk_mp4(folder: Path, frames: np.ndarray) -> Path:
    path = folder / "junk.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    return path


@pytest.mark.parametrize(
    ("make_input", "size", "message"),
    [
        (_truncated_y4m, None, r"truncated\.y4m: .*frame 2 is truncated"),
        (_yuv_not_a_frame_multiple, "16x16", r"ragged\.yuv: .*not a multiple"),
        (lambda f, v: _png_folder(f, v, b"not a png"), None, r"frame_00003\.png: not a readable"),
        (
            lambda f, v: _png_folder(f, v, np.zeros((8, 16, 3), np.uint8)),
            None,
            r"frame_00003\.png: size 16x8 differs",
        ),
        (_odd_y4m, None, r"odd\.y4m: .*even width and height"),
        (_junk_mp4, None, r"junk\.mp4: "),
    ],
)
def test_bad_encode_inputs_exit_2_and_write_nothing(
    setup: Setup,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_input: Any,
    size: str | None,
    message: str,
) -> None:
    """`plvc encode` on broken input: one line naming the file and the problem, exit 2, and
    no file at the output path (the stream is written only once it is whole)."""
    import re

    source = make_input(tmp_path, setup.frames)
    out = tmp_path / "out.plvc"
    args = ["encode", str(source), "-o", str(out), "--weights", str(setup.weights)]
    assert main([*args, *(["--size", size] if size else [])]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert not out.exists() and list(tmp_path.glob("out.plvc*")) == []
