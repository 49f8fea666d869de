"""Video IO: known pixel values through Y4M/YUV/PNG, real video via OpenCV, clear errors."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from plvc.errors import VideoIOError
from plvc.video_io import (
    PngFolderWriter,
    Y4MWriter,
    frames_to_tensor,
    open_video,
    parse_size,
    read_video,
    rgb_to_yuv420,
    tensor_to_frames,
    write_video,
    yuv420_to_rgb,
)

from .conftest import sample_video_path

# BT.601 limited range: (R, G, B) -> (Y, Cb, Cr), textbook values
BT601 = [
    ((0, 0, 0), (16, 128, 128)),
    ((255, 255, 255), (235, 128, 128)),
    ((255, 0, 0), (81, 90, 240)),
    ((0, 255, 0), (145, 54, 34)),
    ((0, 0, 255), (41, 240, 110)),
]


def y4m_bytes(
    width: int, height: int, planes: list[tuple[int, int, int]], extra: str = ""
) -> bytes:
    """A Y4M file whose frame k has constant planes Y, Cb, Cr = planes[k]."""
    out = f"YUV4MPEG2 W{width} H{height} F25:1 Ip A1:1 C420jpeg{extra}\n".encode()
    for y, cb, cr in planes:
        out += b"FRAME\n"
        quarter = width * height // 4
        out += bytes([y]) * (width * height) + bytes([cb]) * quarter + bytes([cr]) * quarter
    return out


def test_bt601_reference_colours() -> None:
    for rgb, ycc in BT601:
        y, cb, cr = rgb_to_yuv420(np.full((2, 2, 3), rgb, np.uint8))
        assert (int(y[0, 0]), int(cb[0, 0]), int(cr[0, 0])) == ycc
        back = yuv420_to_rgb(y, cb, cr)
        assert np.abs(back.astype(int) - np.array(rgb)).max() <= 1


def test_bt709_differs_from_bt601() -> None:
    red = np.full((2, 2, 3), (255, 0, 0), np.uint8)
    y601 = rgb_to_yuv420(red, "bt601")[0][0, 0]
    y709 = rgb_to_yuv420(red, "bt709")[0][0, 0]
    assert (int(y601), int(y709)) == (81, 63)


def test_chroma_is_the_2x2_average() -> None:
    rgb = np.zeros((2, 4, 3), np.uint8)
    rgb[:, :2] = (255, 0, 0)  # left block red, right block black
    rgb[0, 2] = (255, 255, 255)  # one white pixel in the right block
    _, cb, cr = rgb_to_yuv420(rgb)
    assert cr[0, 0] == 240 and cb[0, 0] == 90
    assert cb.shape == (1, 2) and cr[0, 1] == 128 and cb[0, 1] == 128


def test_y4m_known_values(tmp_path: Path) -> None:
    path = tmp_path / "known.y4m"
    path.write_bytes(y4m_bytes(4, 2, [(16, 128, 128), (235, 128, 128), (81, 90, 240)]))
    video = read_video(path)
    assert video.frames.shape == (3, 2, 4, 3) and video.frames.dtype == np.uint8
    assert video.fps == Fraction(25)
    assert (video.frames[0] == 0).all() and (video.frames[1] == 255).all()
    assert np.abs(video.frames[2].astype(int) - (255, 0, 0)).max() <= 1


def test_y4m_write_read_round_trip(tmp_path: Path) -> None:
    """Colours constant on 2x2 blocks survive 4:2:0 up to rounding; a second write of
    what was read reproduces the file byte for byte."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 4, 3, 3), dtype=np.uint8)
    frames = blocks.repeat(2, axis=1).repeat(2, axis=2)
    path = tmp_path / "clip.y4m"
    assert write_video(path, frames, fps=Fraction(30000, 1001)) == 3
    video = read_video(path, upsample="nearest")
    assert video.fps == Fraction(30000, 1001)
    assert np.abs(video.frames.astype(int) - frames).max() <= 2
    again = tmp_path / "again.y4m"
    write_video(again, video.frames, fps=video.fps)
    assert path.read_bytes() == again.read_bytes()


def test_y4m_smooth_content_round_trip_is_close(tmp_path: Path) -> None:
    ramp = np.linspace(0, 255, 16).astype(np.uint8)
    frame = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[None, ::-1]), -1)
    write_video(tmp_path / "ramp.y4m", frame[None])
    back = read_video(tmp_path / "ramp.y4m").frames[0]
    error = np.abs(back.astype(int) - frame)
    assert error.mean() < 6 and error.max() <= 16  # chroma subsampling, worst at the corners


def test_y4m_frame_parameters_and_limit(tmp_path: Path) -> None:
    data = y4m_bytes(2, 2, [(16, 128, 128)] * 4).replace(b"FRAME\n", b"FRAME Ixyz\n")
    (tmp_path / "p.y4m").write_bytes(data)
    assert read_video(tmp_path / "p.y4m", max_frames=2).frames.shape[0] == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"RIFF....", "not a Y4M file"),
        (b"YUV4MPEG2 W4 F25:1\n", "W \\(width\\) or H \\(height\\)"),
        (b"YUV4MPEG2 W4 H2 C444\n", "C444 unsupported"),
        (b"YUV4MPEG2 W4 H2 C420p10\n", "C420p10 unsupported"),
        (b"YUV4MPEG2 W5 H2\n", "even width and height, got 5x2"),
        (b"YUV4MPEG2 W4 H2\nFRAME\n" + bytes(5), "frame 0 is truncated: 5 of 12 bytes"),
        (b"YUV4MPEG2 W4 H2\nFRAMX\n" + bytes(12), "frame 0: expected a FRAME marker"),
        (b"YUV4MPEG2 W4 H2\n", "contains no frames"),
    ],
)
def test_y4m_errors_name_file_and_problem(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.y4m"
    path.write_bytes(data)
    with pytest.raises(VideoIOError, match=rf"bad\.y4m: .*{message}"):
        read_video(path)


def test_raw_yuv_known_values_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "clip.yuv"
    frame = bytes([235]) * 8 + bytes([128]) * 4  # 4x2 white, 4:2:0
    path.write_bytes(frame * 3)
    video = read_video(path, size="4x2")
    assert video.frames.shape == (3, 2, 4, 3) and (video.frames == 255).all()
    assert video.fps is None
    assert read_video(path, size=(4, 2), max_frames=1).frames.shape[0] == 1

    with pytest.raises(VideoIOError, match=r"clip\.yuv: raw \.yuv needs the frame size"):
        open_video(path)
    with pytest.raises(VideoIOError, match=r"clip\.yuv: file size 36 is not a multiple .* 8x2"):
        open_video(path, size="8x2")
    with pytest.raises(VideoIOError, match=r"clip\.yuv: 4:2:0 needs even width"):
        open_video(path, size="3x4")
    path.write_bytes(frame * 2 + frame[:5])
    with pytest.raises(VideoIOError, match="last frame is truncated"):
        open_video(path, size="4x2")


def test_png_folder_round_trip_is_exact_and_naturally_sorted(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (11, 5, 7, 3), dtype=np.uint8)  # odd sizes are fine in PNG
    folder = tmp_path / "pngs"
    assert write_video(folder, frames) == 11
    video = read_video(folder)
    np.testing.assert_array_equal(video.frames, frames)
    # im2 sorts before im10 even though "10" < "2" as text
    other = tmp_path / "named"
    other.mkdir()
    for i in (1, 2, 10):
        import cv2

        cv2.imwrite(str(other / f"im{i}.png"), np.full((2, 2, 3), i, np.uint8))
    assert [int(f[0, 0, 0]) for f in read_video(other).frames] == [1, 2, 10]


def test_png_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoIOError, match=r"empty: folder holds no \.png files"):
        read_video(empty)
    mixed = tmp_path / "mixed"
    writer = PngFolderWriter(mixed)
    writer.write(np.zeros((4, 4, 3), np.uint8))
    import cv2

    cv2.imwrite(str(mixed / "frame_00002.png"), np.zeros((6, 4, 3), np.uint8))
    with pytest.raises(VideoIOError, match=r"frame_00002\.png: size 4x6 differs"):
        read_video(mixed)
    (mixed / "frame_00002.png").write_bytes(b"not a png")
    with pytest.raises(VideoIOError, match=r"frame_00002\.png: not a readable PNG"):
        read_video(mixed)


def test_real_video_through_opencv() -> None:
    path = sample_video_path("carphone_pristine")
    reader = open_video(path, max_frames=4)
    assert (reader.width, reader.height) == (176, 144)
    assert reader.fps is not None and 29 < float(reader.fps) < 31
    frames = np.stack(list(reader))
    assert frames.shape == (4, 144, 176, 3) and frames.std() > 10


def test_missing_and_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(VideoIOError, match=r"nothing\.mp4: no such file"):
        open_video(tmp_path / "nothing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(VideoIOError, match=r"junk\.mp4: "):
        read_video(junk)


def test_y4m_writer_needs_even_size_and_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "out.y4m"
    with pytest.raises(VideoIOError, match="even width and height, got 5x4"):
        write_video(path, np.zeros((1, 4, 5, 3), np.uint8))
    assert not path.exists()
    with pytest.raises(RuntimeError), Y4MWriter(path) as writer:
        writer.write(np.zeros((4, 4, 3), np.uint8))
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file
    with pytest.raises(VideoIOError, match="differs from 4x4"):
        write_video(path, [np.zeros((4, 4, 3), np.uint8), np.zeros((2, 2, 3), np.uint8)])


def test_tensor_conversions() -> None:
    frames = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    tensor = frames_to_tensor(frames)
    assert tensor.shape == (2, 3, 3, 4) and tensor.dtype == torch.float32
    assert float(tensor.max()) <= 1.0
    np.testing.assert_array_equal(tensor_to_frames(tensor), frames)
    assert tensor_to_frames(torch.full((3, 1, 1), 2.0))[0, 0, 0].tolist() == [255] * 3
    with pytest.raises(VideoIOError, match="uint8"):
        frames_to_tensor(frames.astype(np.float32))


def test_parse_size() -> None:
    assert parse_size("416x240") == (416, 240)
    with pytest.raises(VideoIOError, match="WIDTHxHEIGHT"):
        parse_size("416*240")
