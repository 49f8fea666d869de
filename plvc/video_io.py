"""Reading and writing video frames: Y4M, raw YUV 4:2:0, PNG folders, any OpenCV video.

One convention throughout: a frame is an RGB ``uint8`` array ``[H, W, 3]``; a clip is
``[T, H, W, 3]``. :func:`frames_to_tensor` / :func:`tensor_to_frames` convert to and
from the models' float tensors ``[T, 3, H, W]`` in ``[0, 1]``.

Colour: YCbCr is BT.601 limited ("studio") range by default -- Y in 16..235, Cb/Cr in
16..240 -- the conversion ffmpeg applies to untagged YUV and the one learned-video-coding
papers use for UVG and JCT-VC. BT.709 is available as ``matrix="bt709"``. 4:2:0 chroma
is made by averaging each 2x2 block (chroma sited at the block centre, Y4M's
``C420jpeg``) and upsampled bilinearly with half-pixel centres (``upsample="bilinear"``,
the default) or by repeating each sample (``"nearest"``). Other 4:2:0 sitings
(``C420mpeg2``, ``C420paldv``) are read as if centre-sited.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch

from plvc.errors import VideoIOError
from plvc.fileio import atomic_write_bytes, temp_sibling

__all__ = [
    "PngFolderWriter",
    "Video",
    "VideoReader",
    "Y4MWriter",
    "frames_to_tensor",
    "open_video",
    "parse_size",
    "read_video",
    "rgb_to_yuv420",
    "tensor_to_frames",
    "write_video",
    "yuv420_to_rgb",
]

Matrix = Literal["bt601", "bt709"]
Upsample = Literal["bilinear", "nearest"]

_KR_KB: dict[str, tuple[float, float]] = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}
_Y4M_MAGIC = b"YUV4MPEG2"
_Y4M_MAX_HEADER = 4096
_Y4M_420 = {"420", "420jpeg", "420paldv", "420mpeg2"}
_PNG_SUFFIXES = {".png"}


# ---------------------------------------------------------------------------------------
# colour conversion


def _rgb_to_ycbcr_matrix(matrix: str) -> tuple[np.ndarray, np.ndarray]:
    """Limited-range RGB (0..255) -> YCbCr (``M @ rgb + offset``), from Kr and Kb."""
    if matrix not in _KR_KB:
        raise VideoIOError(f"unknown colour matrix {matrix!r}; use one of {sorted(_KR_KB)}")
    kr, kb = _KR_KB[matrix]
    kg = 1.0 - kr - kb
    luma = np.array([kr, kg, kb])
    cb = (np.array([0.0, 0.0, 1.0]) - luma) / (2 * (1 - kb))
    cr = (np.array([1.0, 0.0, 0.0]) - luma) / (2 * (1 - kr))
    m = np.stack([luma * 219.0, cb * 224.0, cr * 224.0]) / 255.0
    return m, np.array([16.0, 128.0, 128.0])


def rgb_to_yuv420(
    rgb: np.ndarray, matrix: Matrix = "bt601"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB ``uint8 [H, W, 3]`` (even H, W) -> planes Y ``[H, W]``, Cb, Cr ``[H/2, W/2]``."""
    h, w = rgb.shape[:2]
    if h % 2 or w % 2:
        raise VideoIOError(f"4:2:0 needs even width and height, got {w}x{h}")
    m, offset = _rgb_to_ycbcr_matrix(matrix)
    ycc = rgb.astype(np.float64) @ m.T + offset
    y = ycc[..., 0]
    # average chroma before rounding: one rounding step, not two
    chroma = ycc[..., 1:].reshape(h // 2, 2, w // 2, 2, 2).mean(axis=(1, 3))

    def to_u8(a: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)

    return to_u8(y), to_u8(chroma[..., 0]), to_u8(chroma[..., 1])


def _upsample_chroma(plane: np.ndarray, h: int, w: int, upsample: str) -> np.ndarray:
    if upsample == "nearest":
        return plane.repeat(2, axis=0).repeat(2, axis=1).astype(np.float64)
    if upsample == "bilinear":
        import cv2

        # INTER_LINEAR uses half-pixel centres: right for centre-sited chroma
        return cv2.resize(plane.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR).astype(
            np.float64
        )
    raise VideoIOError(f"unknown chroma upsampling {upsample!r}; use 'bilinear' or 'nearest'")


def yuv420_to_rgb(
    y: np.ndarray,
    cb: np.ndarray,
    cr: np.ndarray,
    matrix: Matrix = "bt601",
    upsample: Upsample = "bilinear",
) -> np.ndarray:
    """``uint8`` planes Y ``[H, W]``, Cb, Cr ``[H/2, W/2]`` -> RGB ``uint8 [H, W, 3]``."""
    h, w = y.shape
    if cb.shape != (h // 2, w // 2) or cr.shape != cb.shape:
        raise VideoIOError(f"chroma planes {cb.shape}, {cr.shape} do not fit luma {y.shape}")
    m, offset = _rgb_to_ycbcr_matrix(matrix)
    ycc = np.stack(
        [
            y.astype(np.float64),
            _upsample_chroma(cb, h, w, upsample),
            _upsample_chroma(cr, h, w, upsample),
        ],
        axis=-1,
    )
    rgb = (ycc - offset) @ np.linalg.inv(m).T
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# tensors


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """``uint8 [T, H, W, 3]`` (or one frame ``[H, W, 3]``) -> float ``[T, 3, H, W]`` in [0, 1]."""
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise VideoIOError(
            f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}"
        )
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)


def tensor_to_frames(tensor: torch.Tensor) -> np.ndarray:
    """Float ``[T, 3, H, W]`` (or ``[3, H, W]``) in [0, 1] -> ``uint8 [T, H, W, 3]`` (rounded)."""
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4 or tensor.shape[1] != 3:
        raise VideoIOError(f"tensor must be [T, 3, H, W], got {list(tensor.shape)}")
    out = tensor.detach().float().clamp(0, 1).mul(255.0).round().to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous().cpu().numpy()


# ---------------------------------------------------------------------------------------
# readers


@dataclass
class Video:
    """A decoded clip: ``frames`` is RGB ``uint8 [T, H, W, 3]``; ``fps`` when the file says."""

    frames: np.ndarray
    fps: Fraction | None = None


def parse_size(text: str) -> tuple[int, int]:
    """``"416x240"`` -> ``(416, 240)`` (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match[1]) <= 0 or int(match[2]) <= 0:
        raise VideoIOError(f"size {text!r} is not WIDTHxHEIGHT with positive integers")
    return int(match[1]), int(match[2])


class VideoReader:
    """Frames of one source, read lazily; ``width``, ``height`` and ``fps`` are known upfront."""

    path: Path
    width: int
    height: int
    fps: Fraction | None = None

    def __init__(self, path: Path, max_frames: int | None) -> None:
        self.path = path
        if max_frames is not None and max_frames < 1:
            raise VideoIOError(f"{path}: frame limit must be >= 1, got {max_frames}")
        self.max_frames = max_frames

    def _frames(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[np.ndarray]:
        count = 0
        for frame in self._frames():
            yield frame
            count += 1
            if count == self.max_frames:
                return
        if count == 0:
            raise VideoIOError(f"{self.path}: contains no frames")

    def _error(self, message: str) -> VideoIOError:
        return VideoIOError(f"{self.path}: {message}")


def _even_420(reader: VideoReader) -> None:
    if reader.width % 2 or reader.height % 2:
        raise reader._error(
            f"4:2:0 needs even width and height, got {reader.width}x{reader.height}"
        )


def _read_exact(f: BinaryIO, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class _YuvPlanes:
    """Splits a 4:2:0 frame buffer into planes and converts to RGB."""

    def __init__(self, width: int, height: int, matrix: Matrix, upsample: Upsample) -> None:
        self.width, self.height = width, height
        self.matrix, self.upsample = matrix, upsample
        self.luma = width * height
        self.frame_bytes = self.luma * 3 // 2

    def to_rgb(self, buf: bytes) -> np.ndarray:
        a = np.frombuffer(buf, dtype=np.uint8)
        q = self.luma // 4
        y = a[: self.luma].reshape(self.height, self.width)
        cb = a[self.luma : self.luma + q].reshape(self.height // 2, self.width // 2)
        cr = a[self.luma + q :].reshape(self.height // 2, self.width // 2)
        return yuv420_to_rgb(y, cb, cr, self.matrix, self.upsample)


class Y4MReader(VideoReader):
    """YUV4MPEG2, 8-bit 4:2:0 (``C420``, ``C420jpeg``, ``C420paldv``, ``C420mpeg2``)."""

    def __init__(
        self, path: Path, max_frames: int | None, matrix: Matrix, upsample: Upsample
    ) -> None:
        super().__init__(path, max_frames)
        with open(path, "rb") as f:
            line = f.readline(_Y4M_MAX_HEADER)
        if not line.startswith(_Y4M_MAGIC + b" ") and line.rstrip(b"\n") != _Y4M_MAGIC:
            raise self._error(f"not a Y4M file (no {_Y4M_MAGIC.decode()} signature)")
        if not line.endswith(b"\n"):
            raise self._error(f"Y4M header line longer than {_Y4M_MAX_HEADER} bytes or truncated")
        self._data_start = len(line)
        params = {}
        for token in line.decode("ascii", errors="replace").split()[1:]:
            params[token[0]] = token[1:]
        try:
            self.width, self.height = int(params["W"]), int(params["H"])
        except (KeyError, ValueError):
            raise self._error("Y4M header lacks a valid W (width) or H (height)") from None
        if self.width <= 0 or self.height <= 0:
            raise self._error(f"Y4M header has invalid size {self.width}x{self.height}")
        colour = params.get("C", "420jpeg")
        if colour not in _Y4M_420:
            raise self._error(f"Y4M colour space C{colour} unsupported; only 8-bit 4:2:0 is read")
        if "F" in params:
            try:
                num, den = (int(v) for v in params["F"].split(":"))
                self.fps = Fraction(num, den) if num > 0 and den > 0 else None
            except ValueError:
                raise self._error(f"Y4M frame rate F{params['F']} is not N:D") from None
        _even_420(self)
        self._planes = _YuvPlanes(self.width, self.height, matrix, upsample)

    def _frames(self) -> Iterator[np.ndarray]:
        with open(self.path, "rb") as f:
            f.seek(self._data_start)
            index = 0
            while True:
                marker = f.readline(_Y4M_MAX_HEADER)
                if not marker:
                    return
                if not marker.startswith(b"FRAME") or not marker.endswith(b"\n"):
                    raise self._error(
                        f"frame {index}: expected a FRAME marker, found {marker[:16]!r}"
                    )
                buf = _read_exact(f, self._planes.frame_bytes)
                if len(buf) != self._planes.frame_bytes:
                    raise self._error(
                        f"frame {index} is truncated: {len(buf)} of "
                        f"{self._planes.frame_bytes} bytes ({self.width}x{self.height} 4:2:0)"
                    )
                yield self._planes.to_rgb(buf)
                index += 1


class YuvReader(VideoReader):
    """Raw planar 8-bit YUV 4:2:0 (I420): the size must be given, frames are back to back."""

    def __init__(
        self,
        path: Path,
        size: tuple[int, int] | None,
        max_frames: int | None,
        matrix: Matrix,
        upsample: Upsample,
    ) -> None:
        super().__init__(path, max_frames)
        if size is None:
            raise self._error("raw .yuv needs the frame size (--size WIDTHxHEIGHT)")
        self.width, self.height = size
        _even_420(self)
        self._planes = _YuvPlanes(self.width, self.height, matrix, upsample)
        file_size = path.stat().st_size
        frame_bytes = self._planes.frame_bytes
        if file_size == 0:
            raise self._error("file is empty")
        if file_size % frame_bytes:
            raise self._error(
                f"file size {file_size} is not a multiple of the {self.width}x{self.height} "
                f"4:2:0 frame size {frame_bytes}: wrong --size, or the last frame is truncated "
                f"({file_size % frame_bytes} extra bytes)"
            )
        self.frame_count = file_size // frame_bytes

    def _frames(self) -> Iterator[np.ndarray]:
        with open(self.path, "rb") as f:
            for _ in range(self.frame_count):
                yield self._planes.to_rgb(_read_exact(f, self._planes.frame_bytes))


def _natural_key(path: Path) -> list[int | str]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


class PngFolderReader(VideoReader):
    """Every ``*.png`` in a folder, in natural order (``im2`` before ``im10``)."""

    def __init__(self, path: Path, max_frames: int | None) -> None:
        super().__init__(path, max_frames)
        self.files = sorted(
            (p for p in path.iterdir() if p.suffix.lower() in _PNG_SUFFIXES and p.is_file()),
            key=_natural_key,
        )
        if not self.files:
            raise self._error("folder holds no .png files")
        first = self._load(self.files[0])
        self.height, self.width = first.shape[:2]

    def _load(self, file: Path) -> np.ndarray:
        import cv2

        image = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if image is None:
            raise VideoIOError(f"{file}: not a readable PNG image")
        return np.ascontiguousarray(image[..., ::-1])

    def _frames(self) -> Iterator[np.ndarray]:
        for file in self.files:
            frame = self._load(file)
            if frame.shape[:2] != (self.height, self.width):
                raise VideoIOError(
                    f"{file}: size {frame.shape[1]}x{frame.shape[0]} differs from the first "
                    f"frame's {self.width}x{self.height} ({self.files[0].name})"
                )
            yield frame


class OpenCVReader(VideoReader):
    """Any container/codec OpenCV's FFmpeg backend reads (mp4, mkv, avi, ...)."""

    def __init__(self, path: Path, max_frames: int | None) -> None:
        import cv2

        super().__init__(path, max_frames)
        capture = cv2.VideoCapture(str(path))
        try:
            if not capture.isOpened():
                raise self._error("OpenCV cannot open this file as a video")
            self.width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
            self.height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            fps = capture.get(cv2.CAP_PROP_FPS)
            self.fps = Fraction(fps).limit_denominator(1001) if fps and fps > 0 else None
        finally:
            capture.release()
        if self.width <= 0 or self.height <= 0:
            raise self._error("OpenCV reports no frame size")

    def _frames(self) -> Iterator[np.ndarray]:
        import cv2

        capture = cv2.VideoCapture(str(self.path))
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    return
                yield np.ascontiguousarray(frame[..., ::-1])
        finally:
            capture.release()


def open_video(
    path: str | os.PathLike[str],
    *,
    size: tuple[int, int] | str | None = None,
    max_frames: int | None = None,
    matrix: Matrix = "bt601",
    upsample: Upsample = "bilinear",
) -> VideoReader:
    """Open a Y4M, raw ``.yuv`` (needs ``size``), PNG folder or any video OpenCV reads."""
    p = Path(path)
    if not p.exists():
        raise VideoIOError(f"{p}: no such file or folder")
    if isinstance(size, str):
        size = parse_size(size)
    try:
        if p.is_dir():
            return PngFolderReader(p, max_frames)
        suffix = p.suffix.lower()
        if suffix == ".y4m":
            return Y4MReader(p, max_frames, matrix, upsample)
        if suffix == ".yuv":
            return YuvReader(p, size, max_frames, matrix, upsample)
        return OpenCVReader(p, max_frames)
    except OSError as exc:
        raise VideoIOError(f"{p}: {exc.strerror or exc}") from None


def read_video(path: str | os.PathLike[str], **kwargs: object) -> Video:
    """Read a whole clip (arguments as :func:`open_video`) into memory."""
    reader = open_video(path, **kwargs)  # type: ignore[arg-type]
    try:
        frames = np.stack(list(reader))
    except OSError as exc:
        raise VideoIOError(f"{reader.path}: {exc.strerror or exc}") from None
    return Video(frames, reader.fps)


# ---------------------------------------------------------------------------------------
# writers


def _check_frame(frame: np.ndarray, size: tuple[int, int] | None, where: str) -> None:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise VideoIOError(
            f"{where}: frames must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}"
        )
    if size is not None and frame.shape[:2] != size:
        raise VideoIOError(
            f"{where}: frame size {frame.shape[1]}x{frame.shape[0]} differs from "
            f"{size[1]}x{size[0]}"
        )


class Y4MWriter:
    """Streams frames to a Y4M file; it appears at ``path`` (atomically) only on success."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: Fraction | None = None,
        matrix: Matrix = "bt601",
    ) -> None:
        self.path = Path(path)
        self.fps = fps if fps is not None else Fraction(25)
        self.matrix = matrix
        self.count = 0
        self._size: tuple[int, int] | None = None
        self._tmp = temp_sibling(self.path)
        self._file: BinaryIO | None = None

    def write(self, frame: np.ndarray) -> None:
        _check_frame(frame, self._size, str(self.path))
        if self._file is None:
            h, w = frame.shape[:2]
            if h % 2 or w % 2:
                raise VideoIOError(
                    f"{self.path}: Y4M 4:2:0 needs even width and height, got {w}x{h}; "
                    "write a PNG folder instead"
                )
            self._size = (h, w)
            try:
                self._file = open(self._tmp, "xb")  # noqa: SIM115 - closed in close()/abort()
            except OSError as exc:
                raise VideoIOError(f"{self.path}: cannot write: {exc.strerror or exc}") from None
            fps = Fraction(self.fps)
            header = f"YUV4MPEG2 W{w} H{h} F{fps.numerator}:{fps.denominator} Ip A1:1 C420jpeg\n"
            self._file.write(header.encode())
        y, cb, cr = rgb_to_yuv420(frame, self.matrix)
        self._file.write(b"FRAME\n")
        for plane in (y, cb, cr):
            self._file.write(plane.tobytes())
        self.count += 1

    def close(self) -> None:
        """Finish the file and move it into place."""
        if self._file is None:
            raise VideoIOError(f"{self.path}: no frames were written")
        self._file.close()
        self._file = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Y4MWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class PngFolderWriter:
    """Writes ``frame_00001.png``, ... into a folder; each file appears atomically."""

    def __init__(self, folder: str | os.PathLike[str], pattern: str = "frame_{:05d}.png") -> None:
        self.folder = Path(folder)
        self.pattern = pattern
        self.count = 0
        self._size: tuple[int, int] | None = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VideoIOError(
                f"{self.folder}: cannot create folder: {exc.strerror or exc}"
            ) from None

    def write(self, frame: np.ndarray) -> None:
        import cv2

        _check_frame(frame, self._size, str(self.folder))
        self._size = frame.shape[:2]
        target = self.folder / self.pattern.format(self.count + 1)
        ok, encoded = cv2.imencode(".png", np.ascontiguousarray(frame[..., ::-1]))
        if not ok:
            raise VideoIOError(f"{target}: PNG encoding failed")
        try:
            atomic_write_bytes(target, encoded.tobytes())
        except OSError as exc:
            raise VideoIOError(f"{target}: cannot write: {exc.strerror or exc}") from None
        self.count += 1

    def close(self) -> None:
        if self.count == 0:
            raise VideoIOError(f"{self.folder}: no frames were written")

    def abort(self) -> None:
        """Nothing to undo: finished frames stay, a partial file never exists."""

    def __enter__(self) -> PngFolderWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()


def write_video(
    path: str | os.PathLike[str],
    frames: Iterable[np.ndarray],
    *,
    fps: Fraction | None = None,
    matrix: Matrix = "bt601",
) -> int:
    """Write RGB ``uint8`` frames to ``*.y4m`` or else a PNG folder; return the frame count."""
    p = Path(path)
    writer: Y4MWriter | PngFolderWriter = (
        Y4MWriter(p, fps, matrix) if p.suffix.lower() == ".y4m" else PngFolderWriter(p)
    )
    with writer:
        for frame in frames:
            writer.write(frame)
    return writer.count
