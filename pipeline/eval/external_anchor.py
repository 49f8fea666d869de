"""An anchor codec outside ffmpeg: a user's own encoder binary (VTM's ``EncoderApp``, HM,
ECM) driven by a command-line template from ``evaluate.baselines``.

VTM and HM are not packaged for pip or apt, so the project cannot run them itself; a user who
has built them names the commands, e.g. for VTM's low-delay configuration::

    - codec: external
      name: vtm
      rate_control: qp
      points: [27, 32, 37, 42]
      encode: >-
        EncoderApp -c cfg/encoder_lowdelay_vtm.cfg -i {input} -b {stream} -o /dev/null
        -wdt {width} -hgt {height} -f {frames} -fr {fps} -q {value} --IntraPeriod={gop}
        --InputBitDepth=8 --InternalBitDepth=10 --OutputBitDepth=8
      decode: DecoderApp -b {stream} -o {output} -d 8

The encoder reads ``{input}`` (raw YUV 4:2:0, 8-bit, the same frames and colour matrix as
every other method) and writes the bitstream ``{stream}``, whose bytes are the rate. The
decoder writes ``{output}`` as raw 8-bit YUV 4:2:0 of the same size; without a ``decode``
template the encoder must write its reconstruction to ``{output}`` itself.
"""

from __future__ import annotations

import shlex
import shutil
import string
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.eval.metrics import EvaluationError

__all__ = ["PLACEHOLDERS", "ExternalCommands", "check_external_program", "code_external"]

#: what a template may name
PLACEHOLDERS = frozenset(
    {"input", "stream", "output", "width", "height", "frames", "fps", "value", "gop"}
)


@dataclass(frozen=True)
class ExternalCommands:
    """An external anchor's templates (``evaluate.baselines[i].encode`` / ``.decode``)."""

    name: str
    encode: str
    decode: str | None = None

    def __post_init__(self) -> None:
        for field, template in (("encode", self.encode), ("decode", self.decode)):
            if template is None:
                continue
            where = f"evaluate.baselines ({self.name}).{field}"
            try:
                names = {
                    name for _, name, _, _ in string.Formatter().parse(template) if name is not None
                }
                words = shlex.split(template)
            except ValueError as exc:
                raise EvaluationError(f"{where}: not a valid command template: {exc}") from None
            unknown = names - PLACEHOLDERS
            if unknown or "" in names:
                raise EvaluationError(
                    f"{where}: unknown placeholder(s) {sorted(unknown) or ['{}']}; use "
                    f"{', '.join('{' + p + '}' for p in sorted(PLACEHOLDERS))}"
                )
            if not words:
                raise EvaluationError(f"{where}: the command is empty")
        needed = {"input", "stream"} | (set() if self.decode else {"output"})
        given = {n for _, n, _, _ in string.Formatter().parse(self.encode) if n}
        if not needed <= given:
            raise EvaluationError(
                f"evaluate.baselines ({self.name}).encode must name "
                f"{', '.join('{' + n + '}' for n in sorted(needed - given))}"
                + ("" if self.decode else " (without a decode template it writes {output})")
            )
        if self.decode is not None:
            given = {n for _, n, _, _ in string.Formatter().parse(self.decode) if n}
            if not {"stream", "output"} <= given:
                raise EvaluationError(
                    f"evaluate.baselines ({self.name}).decode must name {{stream}} and {{output}}"
                )

    def programs(self) -> list[str]:
        """The binaries the templates run (their first words)."""
        return [shlex.split(t)[0] for t in (self.encode, self.decode) if t is not None]


def check_external_program(commands: ExternalCommands) -> None:
    """Fail before any work when a template's program is not there."""
    for program in commands.programs():
        if shutil.which(program) is None:
            raise EvaluationError(
                f"evaluate.baselines ({commands.name}): {program!r} is not an executable on "
                "PATH; build it (VTM: https://vcgit.hhi.fraunhofer.de/jvet/VVCSoftware_VTM) or "
                "give its full path in the template"
            )


def _run(words: list[str], timeout: float, what: str) -> float:
    import subprocess

    start = time.perf_counter()
    try:
        proc = subprocess.run(words, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EvaluationError(f"{what}: ran past {timeout:g} s") from None
    except OSError as exc:
        raise EvaluationError(f"{what}: cannot run {words[0]}: {exc}") from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-2000:]
        raise EvaluationError(
            f"{what}: exited {proc.returncode}: {err}\ncommand: {shlex.join(words)}"
        )
    return time.perf_counter() - start


def code_external(
    commands: ExternalCommands,
    yuv: bytes,
    *,
    frames: int,
    width: int,
    height: int,
    fps: float,
    value: float,
    gop: int,
    timeout: float,
) -> tuple[bytes, bytes, float, float, list[str]]:
    """Encode raw 8-bit YUV 4:2:0 with the templates and decode it back: ``(stream, decoded
    YUV, encode s, decode s, the encode command)``."""
    what = f"{commands.name} {value:g}"
    with tempfile.TemporaryDirectory(prefix=f"plvc-{commands.name}-") as tmp:
        paths = {k: Path(tmp) / f for k, f in (("input", "in.yuv"), ("stream", "stream.bin"))}
        paths["output"] = Path(tmp) / "decoded.yuv"
        paths["input"].write_bytes(yuv)
        fields = {
            **{k: str(v) for k, v in paths.items()},
            "width": width,
            "height": height,
            "frames": frames,
            "fps": f"{fps:g}",
            "value": f"{value:g}",
            "gop": gop,
        }
        encode = [word.format(**fields) for word in shlex.split(commands.encode)]
        encode_s = _run(encode, timeout, what)
        if not paths["stream"].is_file():
            raise EvaluationError(f"{what}: the encoder wrote no {{stream}} file")
        decode_s = 0.0
        if commands.decode is not None:
            decode = [word.format(**fields) for word in shlex.split(commands.decode)]
            decode_s = _run(decode, timeout, what + " (decode)")
        expected = frames * width * height * 3 // 2
        decoded = paths["output"].read_bytes() if paths["output"].is_file() else b""
        if len(decoded) != expected:
            raise EvaluationError(
                f"{what}: the decoded {{output}} holds {len(decoded)} bytes, {frames} frames of "
                f"8-bit YUV 4:2:0 {width}x{height} are {expected} (a 10-bit output? VTM's "
                "DecoderApp needs -d 8)"
            )
        return paths["stream"].read_bytes(), decoded, encode_s, decode_s, encode
