"""x264 / x265 anchors through ffmpeg, on the same frames as the learned codec.

Low-delay P configuration, the one learned-video-coding papers use for their x264/x265
anchors (e.g. DCVC's ``-tune zerolatency`` commands): no B-frames, no look-ahead, an
I-frame (IDR, closed GOP) exactly every ``gop_size`` frames (``keyint = min-keyint``,
scene-cut detection off), so the anchors see the same GOP structure as our codec.

* ``tune="zerolatency"`` (default) turns off B-frames, look-ahead, MB-tree / CU-tree and
  frame threading; ``bframes=0`` is also set explicitly. ``preset`` (default
  ``"medium"``, x264/x265's default) trades speed for rate; use ``"veryslow"`` for the
  strongest anchor, ``"ultrafast"`` in tests.
* Colour: RGB frames are converted to YUV 4:2:0 (BT.601 limited range, 2x2 chroma
  average) and back with :mod:`plvc.video_io`, the conversion our own video files use;
  ffmpeg's swscale is never involved, so anchors are bit-exact across ffmpeg builds.
* Rate: ``rate_control="crf"`` (the values are CRFs), ``"qp"`` (constant QP) or
  ``"bpp"`` (the values are target bpp, turned into an average bitrate
  ``bpp x W x H x fps``; two-pass by default, which lands within a few percent).
* Bytes: the raw Annex-B elementary stream (no container), with SEI NAL units removed
  (``filter_units``: x264 writes a ~600-byte options string into every stream, noise at
  low rates on small clips; SEI never affects decoding). ``bpp`` is measured from these
  bytes: :func:`pipeline.eval.metrics.bits_per_pixel`.
* ``threads`` (default 1) is fixed, not "auto": x264's zerolatency uses sliced threads,
  whose slice count would make the bitstream depend on the machine's core count.

ffmpeg is found by :func:`find_ffmpeg`: the ``ffmpeg`` argument (param
``evaluate.ffmpeg``), then the binary of the ``imageio-ffmpeg`` wheel (a static GPL build
with libx264 and libx265), then ``ffmpeg`` on ``PATH``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from pipeline.eval.metrics import EvaluationError, bits_per_pixel

__all__ = [
    "CODECS",
    "BaselineConfig",
    "BaselineError",
    "BaselineResult",
    "FFmpegNotFoundError",
    "encode_decode",
    "ffmpeg_encoders",
    "find_ffmpeg",
    "run_baselines",
]

Codec = Literal["x264", "x265"]
RateControl = Literal["crf", "qp", "bpp"]

#: our codec name -> (ffmpeg encoder, raw elementary-stream muxer, SEI NAL unit types)
CODECS: dict[str, tuple[str, str, str]] = {
    "x264": ("libx264", "h264", "6"),
    "x265": ("libx265", "hevc", "39|40"),  # prefix and suffix SEI
}
_PARAM = "evaluate.ffmpeg"


class BaselineError(EvaluationError):
    """An anchor encode or decode failed, or its output does not fit the input."""


class FFmpegNotFoundError(BaselineError):
    """No usable ffmpeg (or one without the needed encoder); the message names the param."""


def find_ffmpeg(ffmpeg: str | os.PathLike[str] | None = None) -> Path:
    """The ffmpeg to use: ``ffmpeg`` (``evaluate.ffmpeg``), else imageio-ffmpeg's, else PATH's."""
    if ffmpeg is not None:
        found = shutil.which(str(ffmpeg))
        if found is None:
            raise FFmpegNotFoundError(f"{_PARAM} = {str(ffmpeg)!r}: not an executable file")
        return Path(found)
    try:
        import imageio_ffmpeg

        # honours IMAGEIO_FFMPEG_EXE, then the bundled binary, then the system's
        return Path(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        pass
    found = shutil.which("ffmpeg")
    if found is None:
        raise FFmpegNotFoundError(
            f"ffmpeg not found: set {_PARAM} to an ffmpeg built with libx264 and libx265, "
            "install the imageio-ffmpeg wheel (it ships one), or install the system's ffmpeg "
            "(Debian: apt-get install ffmpeg)"
        )
    return Path(found)


@functools.cache
def ffmpeg_encoders(ffmpeg: Path) -> frozenset[str]:
    """Names of the video encoders ``ffmpeg`` was built with."""
    try:
        proc = subprocess.run(
            [str(ffmpeg), "-hide_banner", "-encoders"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise FFmpegNotFoundError(f"{ffmpeg} does not run as ffmpeg ({exc}); set {_PARAM}") from exc
    names = set()
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith("V"):
            names.add(parts[1])
    return frozenset(names)


@dataclass(frozen=True)
class BaselineConfig:
    """One anchor codec's settings (the ``evaluate.baselines`` params)."""

    codec: Codec = "x265"
    rate_control: RateControl = "crf"
    #: CRFs, QPs or target bpp, by ``rate_control``
    points: tuple[float, ...] = (37.0, 32.0, 27.0, 22.0)
    #: an I-frame every ``gop_size`` frames: the same GOP as our codec
    gop_size: int = 9
    preset: str = "medium"
    #: None: no tune; "zerolatency": the low-delay configuration
    tune: str | None = "zerolatency"
    #: frames per second written into the stream; only the "bpp" mode's bitrate depends on it
    fps: float = 30.0
    #: two-pass rate control in "bpp" mode
    two_pass: bool = True
    threads: int = 1
    strip_sei: bool = True
    ffmpeg: str | None = None
    #: seconds per ffmpeg call
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise BaselineError(
                f"evaluate.baselines: unknown codec {self.codec!r}; use one of {sorted(CODECS)}"
            )
        if self.rate_control not in ("crf", "qp", "bpp"):
            raise BaselineError(
                "evaluate.baselines: rate_control must be crf, qp or bpp, "
                f"got {self.rate_control!r}"
            )
        if not self.points:
            raise BaselineError("evaluate.baselines: points is empty")
        if self.rate_control in ("crf", "qp") and not all(0 <= p <= 51 for p in self.points):
            raise BaselineError(
                f"evaluate.baselines: {self.rate_control} values must be in 0..51, "
                f"got {self.points}"
            )
        if self.rate_control == "bpp" and not all(p > 0 for p in self.points):
            raise BaselineError(f"evaluate.baselines: target bpp must be > 0, got {self.points}")
        if self.gop_size < 1 or self.threads < 1 or self.fps <= 0:
            raise BaselineError("evaluate.baselines: gop_size and threads must be >= 1 and fps > 0")


@dataclass
class BaselineResult:
    """One anchor encode: the real bitstream and the frames decoded from it."""

    codec: str
    rate_control: str
    value: float
    bitstream: bytes
    #: [T, 3, H, W] float in [0, 1], decoded by ffmpeg and converted like our own output
    decoded: Tensor
    bpp: float
    encode_s: float
    decode_s: float
    command: list[str] = field(default_factory=list)

    @property
    def point(self) -> str:
        """Label of this rate point, e.g. ``"crf=27"``."""
        return f"{self.rate_control}={self.value:g}"


def _codec_params(cfg: BaselineConfig, value: float, width: int, height: int) -> list[str]:
    params = [f"keyint={cfg.gop_size}", f"min-keyint={cfg.gop_size}", "scenecut=0", "bframes=0"]
    if cfg.codec == "x264":
        params.append(f"threads={cfg.threads}")
    else:
        params += ["open-gop=0", f"pools={cfg.threads}", "frame-threads=1", "log-level=error"]
    if cfg.rate_control == "crf":
        params.append(f"crf={value:g}")
    elif cfg.rate_control == "qp":
        params.append(f"qp={round(value)}")
    else:
        kbps = value * width * height * cfg.fps / 1000.0
        params.append(f"bitrate={max(1, round(kbps))}")
    return params


def _encode_command(
    ffmpeg: Path,
    cfg: BaselineConfig,
    value: float,
    t: int,
    width: int,
    height: int,
    out: Path,
    pass_no: int | None,
    stats: Path,
) -> list[str]:
    encoder, muxer, sei = CODECS[cfg.codec]
    params = _codec_params(cfg, value, width, height)
    if pass_no is not None:
        params += [f"pass={pass_no}", f"stats={stats}"]
    cmd = [
        str(ffmpeg),
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "yuv420p",
        "-s",
        f"{width}x{height}",
        "-r",
        f"{cfg.fps:g}",
        "-i",
        "pipe:0",
        "-frames:v",
        str(t),
        "-c:v",
        encoder,
        "-preset",
        cfg.preset,
    ]
    if cfg.tune:
        cmd += ["-tune", cfg.tune]
    cmd += [f"-{cfg.codec}-params", ":".join(params)]
    if cfg.strip_sei:
        cmd += ["-bsf:v", f"filter_units=remove_types={sei}"]
    cmd += ["-f", muxer, str(out)]
    return cmd


def _run(cmd: list[str], stdin: bytes | None, timeout: float, what: str) -> bytes:
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BaselineError(f"{what}: ffmpeg ran past {timeout:g} s") from exc
    except OSError as exc:
        raise BaselineError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise BaselineError(
            f"{what}: ffmpeg exited {proc.returncode}: {err}\ncommand: {' '.join(cmd)}"
        )
    return proc.stdout


def _to_yuv420(frames: Tensor, matrix: str) -> tuple[bytes, int, int]:
    from plvc.video_io import rgb_to_yuv420, tensor_to_frames

    rgb = tensor_to_frames(frames)
    _, h, w, _ = rgb.shape
    if h % 2 or w % 2:
        raise BaselineError(f"YUV 4:2:0 anchors need even frame sizes, got {w}x{h}")
    chunks = []
    for frame in rgb:
        chunks.extend(p.tobytes() for p in rgb_to_yuv420(frame, matrix=matrix))  # type: ignore[arg-type]
    return b"".join(chunks), w, h


def _from_yuv420(
    raw: bytes, t_expected: int, width: int, height: int, matrix: str, what: str
) -> Tensor:
    from plvc.video_io import frames_to_tensor, yuv420_to_rgb

    y_size, c_size = width * height, (width // 2) * (height // 2)
    frame_size = y_size + 2 * c_size
    if len(raw) % frame_size:
        raise BaselineError(
            f"{what}: decoded {len(raw)} bytes, not a whole number of {width}x{height} frames"
        )
    t = len(raw) // frame_size
    if t != t_expected:
        raise BaselineError(f"{what}: decoded {t} frames, expected {t_expected}")
    buf = np.frombuffer(raw, dtype=np.uint8).reshape(t, frame_size)
    rgb = np.empty((t, height, width, 3), dtype=np.uint8)
    for i in range(t):
        y = buf[i, :y_size].reshape(height, width)
        cb = buf[i, y_size : y_size + c_size].reshape(height // 2, width // 2)
        cr = buf[i, y_size + c_size :].reshape(height // 2, width // 2)
        rgb[i] = yuv420_to_rgb(y, cb, cr, matrix=matrix)  # type: ignore[arg-type]
    return frames_to_tensor(rgb)


def encode_decode(
    frames: Tensor,
    config: BaselineConfig,
    value: float,
    *,
    matrix: Literal["bt601", "bt709"] = "bt601",
) -> BaselineResult:
    """Encode ``frames`` (``[T, 3, H, W]`` float in [0, 1]) at one rate point; decode them back."""
    if (
        not isinstance(frames, Tensor)
        or frames.dim() != 4
        or frames.shape[1] != 3
        or frames.shape[0] < 1
    ):
        shape = list(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise BaselineError(f"frames must be a [T, 3, H, W] tensor with T >= 1, got {shape}")
    cfg = config
    ffmpeg = find_ffmpeg(cfg.ffmpeg)
    encoder, muxer, _ = CODECS[cfg.codec]
    if encoder not in ffmpeg_encoders(ffmpeg):
        raise FFmpegNotFoundError(
            f"{ffmpeg} has no {encoder} encoder: set {_PARAM} to an ffmpeg built with libx264 and "
            "libx265 (the imageio-ffmpeg wheel's or Debian's ffmpeg package)"
        )
    t = frames.shape[0]
    yuv, w, h = _to_yuv420(frames, matrix)
    what = f"{cfg.codec} {cfg.rate_control}={value:g}"
    with tempfile.TemporaryDirectory(prefix="plvc-anchor-") as tmp:
        out = Path(tmp) / f"stream.{muxer}"
        stats = Path(tmp) / "ratecontrol.log"
        passes: Sequence[int | None] = (
            (1, 2) if cfg.rate_control == "bpp" and cfg.two_pass else (None,)
        )
        start = time.perf_counter()
        for pass_no in passes:
            cmd = _encode_command(ffmpeg, cfg, value, t, w, h, out, pass_no, stats)
            _run(cmd, yuv, cfg.timeout_s, what)
        encode_s = time.perf_counter() - start
        bitstream = out.read_bytes()
        start = time.perf_counter()
        raw = _run(
            [
                str(ffmpeg),
                "-hide_banner",
                "-nostdin",
                "-loglevel",
                "error",
                "-f",
                muxer,
                "-i",
                str(out),
                "-f",
                "rawvideo",
                "-pix_fmt",
                "yuv420p",
                "pipe:1",
            ],
            None,
            cfg.timeout_s,
            what + " (decode)",
        )
        decode_s = time.perf_counter() - start
    decoded = _from_yuv420(raw, t, w, h, matrix, what)
    return BaselineResult(
        codec=cfg.codec,
        rate_control=cfg.rate_control,
        value=float(value),
        bitstream=bitstream,
        decoded=decoded,
        bpp=bits_per_pixel(len(bitstream), t, h, w),
        encode_s=encode_s,
        decode_s=decode_s,
        command=cmd,
    )


def run_baselines(
    frames: Tensor,
    configs: Sequence[BaselineConfig],
    *,
    matrix: Literal["bt601", "bt709"] = "bt601",
) -> list[BaselineResult]:
    """Every rate point of every anchor config on ``frames``, in order."""
    results = []
    with torch.no_grad():
        for cfg in configs:
            results.extend(encode_decode(frames, cfg, v, matrix=matrix) for v in cfg.points)
    return results
