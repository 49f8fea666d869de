"""x264, x265, VVC (VVenC) and AV1 (SVT-AV1) anchors through ffmpeg, on the same frames as
the learned codec.

Low-delay configuration, the one learned-video-coding papers use for their anchors (e.g.
DCVC's ``-tune zerolatency`` x264/x265 commands, VTM's low-delay configs): no future
references, no look-ahead, an I-frame (closed GOP) exactly every ``gop_size`` frames,
scene-cut detection off, so the anchors see the same GOP structure as our codec.

* x264/x265: ``keyint = min-keyint = gop_size``, ``scenecut=0``, ``bframes=0``.
* ``vvenc`` (H.266/VVC, Fraunhofer VVenC): its low-delay mode (``PicReordering=0``,
  ``GOPSize=8``: low-delay B, past references only). VVenC refreshes only with
  ``DecodingRefreshType=none`` in that mode, so each GOP is coded as its own stream (an IDR
  picture, then ``gop_size - 1`` inter pictures) and the streams are concatenated: a closed
  GOP exactly. VVenC codes 10-bit: the 8-bit planes are shifted up by 2 bits going in and
  rounded back going out, both here, bit-exact. ``rate_control``: ``qp`` (0-63) or ``bpp``.
* ``svtav1`` (AV1, SVT-AV1): ``pred-struct=1`` (low delay), ``keyint = gop_size`` with
  ``irefresh-type=2`` (key frames: closed GOP), ``scd=0``; raw OBU stream. ``rate_control``:
  ``crf`` (0-63) or ``bpp`` (one-pass CBR: SVT-AV1's low delay takes no other rate control
  for a target rate). ``preset`` is SVT-AV1's number (default ``"8"``).

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
  whose slice count would make the bitstream depend on the machine's core count (the same
  holds for VVenC's and SVT-AV1's threads).

ffmpeg is found by :func:`find_ffmpeg`: the ``ffmpeg`` argument (param
``evaluate.ffmpeg``), then the binary of the ``imageio-ffmpeg`` wheel (a static GPL build
with libx264, libx265, libvvenc and libsvtav1), then ``ffmpeg`` on ``PATH``. HM and VTM are
not packaged anywhere pip reaches; they are not among the anchors.
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

from pipeline.eval.external_anchor import ExternalCommands, code_external
from pipeline.eval.metrics import EvaluationError, bits_per_pixel
from pipeline.eval.rate_search import RateSearch

__all__ = [
    "CODECS",
    "AnchorEncoder",
    "BaselineConfig",
    "BaselineError",
    "BaselineResult",
    "FFmpegNotFoundError",
    "encode_decode",
    "ffmpeg_encoders",
    "ffmpeg_listing",
    "ffmpeg_version",
    "find_ffmpeg",
    "run_baselines",
    "yuv420_bytes",
]

Codec = Literal["x264", "x265", "vvenc", "svtav1", "external"]
RateControl = Literal["crf", "qp", "bpp"]


@dataclass(frozen=True)
class AnchorEncoder:
    """How one anchor codec is driven through ffmpeg."""

    #: ffmpeg encoder name
    encoder: str
    #: raw elementary-stream muxer (and demuxer)
    muxer: str
    #: NAL unit types ``filter_units`` removes (SEI); None: nothing to strip
    sei_types: str | None
    #: the ffmpeg option that takes the encoder's own ``key=value:...`` parameters
    params_option: str
    rate_controls: tuple[str, ...]
    #: largest CRF / QP value
    max_value: int
    default_preset: str
    #: the encoder takes 10-bit input only
    ten_bit: bool = False
    #: each GOP coded as its own stream (the encoder cannot close a low-delay GOP itself)
    gop_per_stream: bool = False
    #: two-pass rate control in low delay (SVT-AV1: one-pass CBR only)
    two_pass: bool = True
    #: smallest CRF / QP on the scale (SVT-AV1's CRF 0 is not the top quality: on the
    #: sample it codes at 0.21 bpp where CRF 1 takes 2.3 bpp)
    min_value: int = 0


#: our codec name -> how ffmpeg runs it
CODECS: dict[str, AnchorEncoder] = {
    "x264": AnchorEncoder(
        "libx264", "h264", "6", "-x264-params", ("crf", "qp", "bpp"), 51, "medium"
    ),
    # prefix and suffix SEI
    "x265": AnchorEncoder(
        "libx265", "hevc", "39|40", "-x265-params", ("crf", "qp", "bpp"), 51, "medium"
    ),
    "vvenc": AnchorEncoder(
        "libvvenc",
        "vvc",
        "23|24",
        "-vvenc-params",
        ("qp", "bpp"),
        63,
        "medium",
        ten_bit=True,
        gop_per_stream=True,
    ),
    "svtav1": AnchorEncoder(
        "libsvtav1",
        "obu",
        None,
        "-svtav1-params",
        ("crf", "bpp"),
        63,
        "8",
        two_pass=False,
        min_value=1,
    ),
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
def ffmpeg_listing(ffmpeg: Path, option: str) -> str:
    """What ``ffmpeg -hide_banner <option>`` prints (``-encoders``, ``-filters``, ...)."""
    try:
        proc = subprocess.run(
            [str(ffmpeg), "-hide_banner", option],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise FFmpegNotFoundError(f"{ffmpeg} does not run as ffmpeg ({exc}); set {_PARAM}") from exc
    return proc.stdout


@functools.cache
def ffmpeg_encoders(ffmpeg: Path) -> frozenset[str]:
    """Names of the video encoders ``ffmpeg`` was built with."""
    names = set()
    for line in ffmpeg_listing(ffmpeg, "-encoders").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith("V"):
            names.add(parts[1])
    return frozenset(names)


@functools.cache
def ffmpeg_version(ffmpeg: Path) -> str:
    """The first line of ``ffmpeg -version`` (the build fixes every encoder library's version)."""
    try:
        proc = subprocess.run(
            [str(ffmpeg), "-version"], capture_output=True, text=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise FFmpegNotFoundError(f"{ffmpeg} does not run as ffmpeg ({exc}); set {_PARAM}") from exc
    return proc.stdout.splitlines()[0].strip() if proc.stdout else "unknown"


@dataclass(frozen=True)
class BaselineConfig:
    """One anchor codec's settings (the ``evaluate.baselines`` params)."""

    codec: Codec = "x265"
    rate_control: RateControl = "crf"
    #: CRFs, QPs or target bpp, by ``rate_control``; empty when ``search`` picks them
    points: tuple[float, ...] = (37.0, 32.0, 27.0, 22.0)
    #: pick the CRF/QP points from a short search (:mod:`pipeline.eval.rate_search`)
    search: RateSearch | None = None
    #: an I-frame every ``gop_size`` frames: the same GOP as our codec
    gop_size: int = 9
    #: None: the codec's default (``medium``; SVT-AV1 ``8``)
    preset: str | None = None
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
    #: an ``external`` codec's method name and command templates
    #: (:mod:`pipeline.eval.external_anchor`)
    name: str | None = None
    encode: str | None = None
    decode: str | None = None

    @property
    def method(self) -> str:
        """The method name in reports: the codec, or an external codec's ``name``."""
        return self.name or self.codec

    @property
    def external(self) -> ExternalCommands | None:
        if self.codec != "external":
            return None
        return ExternalCommands(str(self.name), str(self.encode), self.decode)

    def __post_init__(self) -> None:
        if self.codec == "external":
            if not self.name or not self.encode:
                raise BaselineError(
                    "evaluate.baselines: an external codec needs a 'name' (its method name "
                    "in the reports) and an 'encode' command template"
                )
            if self.name in CODECS:
                raise BaselineError(
                    f"evaluate.baselines: external codec name {self.name!r} is a built-in codec"
                )
            if self.rate_control == "bpp":
                raise BaselineError(
                    f"evaluate.baselines ({self.name}): an external codec takes the values of "
                    "its own 'qp' or 'crf' option ({value} in its template), not a target bpp"
                )
            self.external  # noqa: B018 - validates the templates now, naming the param
            return
        if self.codec not in CODECS:
            raise BaselineError(
                f"evaluate.baselines: unknown codec {self.codec!r}; use one of {sorted(CODECS)}"
            )
        spec = CODECS[self.codec]
        if self.rate_control not in spec.rate_controls:
            raise BaselineError(
                f"evaluate.baselines: {self.codec}'s rate_control must be one of "
                f"{', '.join(spec.rate_controls)}, got {self.rate_control!r}"
            )
        if not self.points and self.search is None:
            raise BaselineError(
                f"evaluate.baselines ({self.codec}): give 'points' or a 'search' bpp range"
            )
        low, top = spec.min_value, spec.max_value
        if self.rate_control in ("crf", "qp") and not all(low <= p <= top for p in self.points):
            raise BaselineError(
                f"evaluate.baselines: {self.codec} {self.rate_control} values must be in "
                f"{low}..{top}, got {self.points}"
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


def _kbps(cfg: BaselineConfig, bpp: float, width: int, height: int) -> int:
    return max(1, round(bpp * width * height * cfg.fps / 1000.0))


def _codec_options(cfg: BaselineConfig, value: float, width: int, height: int) -> list[str]:
    """ffmpeg options after ``-c:v``: preset, tune, rate and the encoder's own parameters."""
    spec = CODECS[cfg.codec]
    preset = cfg.preset if cfg.preset is not None else spec.default_preset
    options = ["-preset", preset]
    if cfg.codec in ("x264", "x265"):
        if cfg.tune:
            options += ["-tune", cfg.tune]
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
            params.append(f"bitrate={_kbps(cfg, value, width, height)}")
    elif cfg.codec == "vvenc":
        # one stream per GOP (see the module doc): no intra period inside a stream
        params = [
            "PicReordering=0",
            "GOPSize=8",
            "DecodingRefreshType=none",
            "IntraPeriod=-1",
            "POC0IDR=1",
            f"Threads={cfg.threads}",
        ]
        if cfg.rate_control == "qp":
            options += ["-qp", str(round(value))]
        else:
            options += ["-b:v", f"{_kbps(cfg, value, width, height)}k"]
    else:  # svtav1
        params = [
            "pred-struct=1",
            f"keyint={cfg.gop_size}",
            "irefresh-type=2",
            "scd=0",
            f"lp={cfg.threads}",
        ]
        if cfg.rate_control == "crf":
            options += ["-crf", str(round(value))]
        else:
            # SVT-AV1's low delay takes CBR only, and one pass
            params.append("rc=2")
            options += ["-b:v", f"{_kbps(cfg, value, width, height)}k"]
    return [*options, spec.params_option, ":".join(params)]


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
    spec = CODECS[cfg.codec]
    options = _codec_options(cfg, value, width, height)
    if pass_no is not None:
        if cfg.codec in ("x264", "x265"):
            options[-1] += f":pass={pass_no}:stats={stats}"
        else:
            options += ["-pass", str(pass_no), "-passlogfile", str(stats)]
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
        "yuv420p10le" if spec.ten_bit else "yuv420p",
        "-s",
        f"{width}x{height}",
        "-r",
        f"{cfg.fps:g}",
        "-i",
        "pipe:0",
        "-frames:v",
        str(t),
        "-c:v",
        spec.encoder,
        *options,
    ]
    if cfg.strip_sei and spec.sei_types:
        cmd += ["-bsf:v", f"filter_units=remove_types={spec.sei_types}"]
    cmd += ["-f", spec.muxer, str(out)]
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


def yuv420_bytes(frames: Tensor, matrix: str) -> tuple[bytes, int, int]:
    """``[T, 3, H, W]`` float RGB in [0, 1] -> ``(yuv420p bytes, W, H)``, with
    :func:`plvc.video_io.rgb_to_yuv420` (even sizes only)."""
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


def _to_ten_bit(yuv8: bytes) -> bytes:
    return (np.frombuffer(yuv8, dtype=np.uint8).astype("<u2") << 2).tobytes()


def _from_ten_bit(yuv10: bytes) -> bytes:
    if len(yuv10) % 2:
        raise BaselineError(f"decoded 10-bit output has an odd byte count ({len(yuv10)})")
    levels = (np.frombuffer(yuv10, dtype="<u2").astype(np.uint32) + 2) >> 2
    return np.minimum(levels, 255).astype(np.uint8).tobytes()


def _code_stream(
    ffmpeg: Path, cfg: BaselineConfig, value: float, yuv: bytes, t: int, w: int, h: int, what: str
) -> tuple[bytes, bytes, float, float, list[str]]:
    """One ffmpeg encode (one or two passes) and decode: ``(stream, yuv420p 8-bit, encode s,
    decode s, the last encode command)``."""
    spec = CODECS[cfg.codec]
    if spec.ten_bit:
        yuv = _to_ten_bit(yuv)
    with tempfile.TemporaryDirectory(prefix="plvc-anchor-") as tmp:
        out = Path(tmp) / f"stream.{spec.muxer}"
        stats = Path(tmp) / "ratecontrol.log"
        two_pass = cfg.rate_control == "bpp" and cfg.two_pass and spec.two_pass
        passes: Sequence[int | None] = (1, 2) if two_pass else (None,)
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
                spec.muxer,
                "-i",
                str(out),
                "-f",
                "rawvideo",
                "-pix_fmt",
                "yuv420p10le" if spec.ten_bit else "yuv420p",
                "pipe:1",
            ],
            None,
            cfg.timeout_s,
            what + " (decode)",
        )
        decode_s = time.perf_counter() - start
    if spec.ten_bit:
        raw = _from_ten_bit(raw)
    return bitstream, raw, encode_s, decode_s, cmd


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
    if cfg.external is not None:
        return _encode_decode_external(frames, cfg, cfg.external, value, matrix)
    spec = CODECS[cfg.codec]
    ffmpeg = find_ffmpeg(cfg.ffmpeg)
    if spec.encoder not in ffmpeg_encoders(ffmpeg):
        raise FFmpegNotFoundError(
            f"{ffmpeg} has no {spec.encoder} encoder: set {_PARAM} to an ffmpeg built with "
            f"{spec.encoder} (the imageio-ffmpeg wheel's has libx264, libx265, libvvenc and "
            "libsvtav1)"
        )
    t = frames.shape[0]
    what = f"{cfg.codec} {cfg.rate_control}={value:g}"
    step = cfg.gop_size if spec.gop_per_stream else t
    streams, decoded, encode_s, decode_s, cmd = [], [], 0.0, 0.0, []
    for first in range(0, t, step):
        chunk = frames[first : first + step]
        yuv, w, h = yuv420_bytes(chunk, matrix)
        stream, raw, enc_s, dec_s, cmd = _code_stream(
            ffmpeg, cfg, value, yuv, chunk.shape[0], w, h, what
        )
        streams.append(stream)
        decoded.append(_from_yuv420(raw, chunk.shape[0], w, h, matrix, what))
        encode_s += enc_s
        decode_s += dec_s
    bitstream = b"".join(streams)
    _, _, h, w = frames.shape
    return BaselineResult(
        codec=cfg.codec,
        rate_control=cfg.rate_control,
        value=float(value),
        bitstream=bitstream,
        decoded=torch.cat(decoded),
        bpp=bits_per_pixel(len(bitstream), t, h, w),
        encode_s=encode_s,
        decode_s=decode_s,
        command=cmd,
    )


def _encode_decode_external(
    frames: Tensor, cfg: BaselineConfig, commands: ExternalCommands, value: float, matrix: str
) -> BaselineResult:
    t, _, h, w = frames.shape
    yuv, w, h = yuv420_bytes(frames, matrix)
    stream, raw, encode_s, decode_s, cmd = code_external(
        commands,
        yuv,
        frames=t,
        width=w,
        height=h,
        fps=cfg.fps,
        value=value,
        gop=cfg.gop_size,
        timeout=cfg.timeout_s,
    )
    what = f"{commands.name} {cfg.rate_control}={value:g}"
    return BaselineResult(
        codec=commands.name,
        rate_control=cfg.rate_control,
        value=float(value),
        bitstream=stream,
        decoded=_from_yuv420(raw, t, w, h, matrix, what),
        bpp=bits_per_pixel(len(stream), t, h, w),
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
