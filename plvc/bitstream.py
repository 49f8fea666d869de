"""The PLVC video container: a header, one record per frame, CRC32 checks.

Layout (all integers little-endian; full description in ``docs/bitstream.md``)::

    preamble  magic "PLVC" | u8 version | u16 header body length
    body      u32 width | u32 height | u32 frame count | i32 GOP | u16 pad multiple
              | u16 CPU threads | u32 fps num | u32 fps den | 8 B model fingerprint
              | 8 B intra fingerprint (version >= 2) | u8 coding flags (version 3)
              | u8 len + quality label
              | u8 len + intra codec name | u16 len + intra JSON config
    u32       CRC32 of preamble + body
    records   per frame: u8 (type << 4 | string count) | [P only: varint shape h, w]
              | varint length per string | the strings
    u32       CRC32 of all records

Per-frame lengths are LEB128 varints rather than fixed u32 because PLVC runs at
0.025-0.1 bpp: a 416x240 P-frame is only ~300 bytes, and fixed-width lengths would add
a few percent to the measured rate. Parsing validates every length against the bytes
that remain before slicing, so corrupt or hostile input raises :class:`BitstreamError`
and never allocates more than the input's size.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from plvc.determinism import CodingMode
from plvc.errors import BitstreamError, PLVCError
from plvc.fileio import atomic_write_bytes

__all__ = [
    "FINGERPRINT_BYTES",
    "FORMAT_VERSION",
    "INTRA_LOCAL_KEYS",
    "MAGIC",
    "MAX_DIMENSION",
    "READABLE_VERSIONS",
    "FrameRecord",
    "FrameType",
    "StreamHeader",
    "check_payload_size",
    "decode_container",
    "encode_container",
    "frame_type_for_index",
    "pack_fields",
    "pad_for_rans",
    "read_header",
    "read_stream",
    "unpack_fields",
    "write_stream",
]

MAGIC = b"PLVC"
FORMAT_VERSION = 3
#: versions this build reads; version 1 has no intra fingerprint field, versions 1-2 no
#: coding flags (they were coded as :meth:`CodingMode.legacy`)
READABLE_VERSIONS = (1, 2, 3)
#: largest accepted frame side: bounds what a decoder allocates for a forged header
MAX_DIMENSION = 16384
MAX_STRINGS_PER_FRAME = 15
MAX_FIELDS = 16
_RANS_PAD_FIXED = 4096
FINGERPRINT_BYTES = 8

_PREAMBLE = struct.Struct("<4sBH")  # magic, version, header body length
# w, h, frames, gop, pad, CPU threads, fps num, fps den, model fingerprint
_FIXED_BODY_V1 = struct.Struct("<IIIiHHII8s")
# ... and the intra codec's fingerprint
_FIXED_BODY_V2 = struct.Struct("<IIIiHHII8s8s")
# ... and the coding flags (CodingMode)
_FIXED_BODY = struct.Struct("<IIIiHHII8s8sB")
#: intra config keys that a stream never carries: where a file lay, and the file's digest,
#: which the fixed intra fingerprint field replaces
INTRA_LOCAL_KEYS = ("weights", "weights_sha256")
_CRC = struct.Struct("<I")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")


class FrameType(IntEnum):
    """Frame kinds: an intra-coded frame starts a GOP, a P-frame predicts from the last."""

    I = 0  # noqa: E741 - the standard name of an intra frame
    P = 1


def frame_type_for_index(index: int, gop: int) -> FrameType:
    """Type of frame ``index`` in a stream with I-frame period ``gop`` (-1: only frame 0)."""
    if gop == -1:
        return FrameType.I if index == 0 else FrameType.P
    return FrameType.I if index % gop == 0 else FrameType.P


@dataclass(frozen=True)
class StreamHeader:
    """What a decoder needs before the first frame.

    ``width``/``height`` are the original frame size; frames are coded padded up to a
    multiple of ``pad_multiple`` and cropped back on decode. ``model_fingerprint``
    identifies the generator weights and ``intra_fingerprint`` the intra codec's (first
    bytes of its weights file's SHA-256; zeros for an untrained codec), so decoding with
    other weights fails loudly. ``intra_config`` rebuilds the intra codec's architecture;
    it never names a file (:data:`INTRA_LOCAL_KEYS` are refused).
    """

    width: int
    height: int
    frame_count: int
    gop: int
    pad_multiple: int
    quality: str
    intra_name: str
    intra_config: dict[str, Any] = field(default_factory=dict)
    model_fingerprint: bytes = bytes(FINGERPRINT_BYTES)
    fps: tuple[int, int] | None = None
    cpu_threads: int = 0
    """Intra-op threads of a CPU encoder (0: coded on an accelerator). CPU convolutions
    round differently for each thread count; a CPU decoder uses the same count to
    reproduce the encoder's reconstruction bit for bit."""
    intra_fingerprint: bytes = bytes(FINGERPRINT_BYTES)
    coding_mode: CodingMode = field(default_factory=CodingMode.legacy)
    """How the networks ran (entropy parameters, precision, memory format); a decoder runs
    them the same way. Streams before format 3 carry none: :meth:`CodingMode.legacy`."""
    version: int = FORMAT_VERSION
    """Format version the stream was read with (writers always write :data:`FORMAT_VERSION`)."""

    @property
    def coded_width(self) -> int:
        return -(-self.width // self.pad_multiple) * self.pad_multiple

    @property
    def coded_height(self) -> int:
        return -(-self.height // self.pad_multiple) * self.pad_multiple

    def validate(self) -> None:
        """Raise :class:`BitstreamError` naming the first field that is out of range."""
        checks: list[tuple[bool, str]] = [
            (1 <= self.width <= MAX_DIMENSION, f"width {self.width} not in 1..{MAX_DIMENSION}"),
            (
                1 <= self.height <= MAX_DIMENSION,
                f"height {self.height} not in 1..{MAX_DIMENSION}",
            ),
            (1 <= self.frame_count < 2**32, f"frame count {self.frame_count} not in 1..2^32-1"),
            (self.gop == -1 or 1 <= self.gop < 2**31, f"GOP {self.gop} is neither -1 nor >= 1"),
            (
                1 <= self.pad_multiple <= 1024,
                f"pad multiple {self.pad_multiple} not in 1..1024",
            ),
            (
                len(self.model_fingerprint) == FINGERPRINT_BYTES,
                f"model fingerprint must be {FINGERPRINT_BYTES} bytes",
            ),
            (
                len(self.intra_fingerprint) == FINGERPRINT_BYTES,
                f"intra fingerprint must be {FINGERPRINT_BYTES} bytes",
            ),
            (
                self.fps is None or (0 < self.fps[0] < 2**32 and 0 < self.fps[1] < 2**32),
                f"fps {self.fps} must be None or two positive 32-bit integers",
            ),
            (0 <= self.cpu_threads <= 0xFFFF, f"CPU threads {self.cpu_threads} not in 0..65535"),
            (isinstance(self.coding_mode, CodingMode), "coding mode must be a CodingMode"),
            (bool(self.intra_name), "intra codec name is empty"),
            (isinstance(self.intra_config, dict), "intra config must be a dict"),
            (
                not any(key in self.intra_config for key in INTRA_LOCAL_KEYS),
                f"intra config names {', '.join(INTRA_LOCAL_KEYS)}: a stream carries the "
                "intra codec's fingerprint, never a file",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise BitstreamError(f"invalid stream header: {message}")


@dataclass(frozen=True)
class FrameRecord:
    """One coded frame: an I-frame's intra payload or a P-frame's strings and latent shape."""

    frame_type: FrameType
    strings: tuple[bytes, ...]
    shape: tuple[int, int] | None = None

    @property
    def payload_bytes(self) -> int:
        """Bytes of entropy-coded payload, without the record's own framing."""
        return sum(len(s) for s in self.strings)


# ---------------------------------------------------------------------------------------
# encoding


def _varint(value: int) -> bytes:
    if not 0 <= value < 2**32:
        raise BitstreamError(f"value {value} does not fit a 32-bit varint")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _short_text(text: str, what: str, size: struct.Struct) -> bytes:
    raw = text.encode("utf-8")
    limit = 2 ** (8 * size.size) - 1
    if len(raw) > limit:
        raise BitstreamError(f"{what} is {len(raw)} bytes, the container allows {limit}")
    return size.pack(len(raw)) + raw


def _encode_header(header: StreamHeader) -> bytes:
    header.validate()
    try:
        config_json = json.dumps(header.intra_config, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise BitstreamError(f"intra config is not JSON-serialisable: {exc}") from None
    fps_num, fps_den = header.fps if header.fps is not None else (0, 0)
    body = (
        _FIXED_BODY.pack(
            header.width,
            header.height,
            header.frame_count,
            header.gop,
            header.pad_multiple,
            header.cpu_threads,
            fps_num,
            fps_den,
            header.model_fingerprint,
            header.intra_fingerprint,
            header.coding_mode.to_flags(),
        )
        + _short_text(header.quality, "quality label", _U8)
        + _short_text(header.intra_name, "intra codec name", _U8)
        + _short_text(config_json, "intra config JSON", _U16)
    )
    if len(body) > 0xFFFF:
        raise BitstreamError(f"header body is {len(body)} bytes, the container allows 65535")
    head = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    return head + _CRC.pack(zlib.crc32(head))


def _encode_record(index: int, record: FrameRecord) -> bytes:
    count = len(record.strings)
    if not 1 <= count <= MAX_STRINGS_PER_FRAME:
        raise BitstreamError(
            f"frame {index}: {count} strings, the container holds 1..{MAX_STRINGS_PER_FRAME}"
        )
    out = bytearray([(int(record.frame_type) << 4) | count])
    if record.frame_type is FrameType.P:
        if record.shape is None or len(record.shape) != 2:
            raise BitstreamError(f"frame {index}: a P-frame needs a 2-element latent shape")
        out += _varint(int(record.shape[0])) + _varint(int(record.shape[1]))
    elif count != 1 or record.shape is not None:
        raise BitstreamError(f"frame {index}: an I-frame carries exactly one string, no shape")
    for s in record.strings:
        out += _varint(len(s))
    for s in record.strings:
        out += s
    return bytes(out)


def encode_container(header: StreamHeader, frames: Sequence[FrameRecord]) -> bytes:
    """Serialise ``header`` and ``frames`` (whose types must follow the header's GOP)."""
    header.validate()
    if header.frame_count != len(frames):
        raise BitstreamError(
            f"header says {header.frame_count} frames but {len(frames)} records were given"
        )
    records = bytearray()
    for index, record in enumerate(frames):
        expected = frame_type_for_index(index, header.gop)
        if record.frame_type is not expected:
            raise BitstreamError(
                f"frame {index} is {record.frame_type.name}, GOP {header.gop} needs {expected.name}"
            )
        records += _encode_record(index, record)
    return _encode_header(header) + bytes(records) + _CRC.pack(zlib.crc32(records))


# ---------------------------------------------------------------------------------------
# decoding


class _Reader:
    """Cursor over a buffer; every read checks the remaining length first."""

    def __init__(self, data: bytes | memoryview, start: int = 0, end: int | None = None):
        self.data = memoryview(data)
        self.pos = start
        self.end = len(self.data) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise BitstreamError(
                f"truncated stream: {what} needs {n} bytes at offset {self.pos}, "
                f"only {self.remaining} remain"
            )
        chunk = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return chunk

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size, what))

    def varint(self, what: str) -> int:
        value = 0
        for i in range(5):
            (byte,) = self.take(1, what)
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if i > 0 and byte == 0:
                    raise BitstreamError(f"{what}: non-canonical varint at offset {self.pos - 1}")
                if value >= 2**32:
                    raise BitstreamError(f"{what}: varint exceeds 32 bits")
                return value
        raise BitstreamError(f"{what}: varint longer than 5 bytes at offset {self.pos}")

    def text(self, size: struct.Struct, what: str) -> str:
        (length,) = self.unpack(size, f"{what} length")
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BitstreamError(f"{what} is not valid UTF-8") from None


def read_header(data: bytes | memoryview) -> tuple[StreamHeader, int]:
    """Parse and check the header; return it and the offset where frame records start."""
    reader = _Reader(data)
    if reader.remaining < len(MAGIC) or bytes(reader.data[: len(MAGIC)]) != MAGIC:
        got = bytes(reader.data[: len(MAGIC)])
        raise BitstreamError(f"not a PLVC stream: magic is {got!r}, expected {MAGIC!r}")
    _, version, body_len = reader.unpack(_PREAMBLE, "preamble")
    if version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise BitstreamError(
            f"unsupported format version {version} (this build reads versions {readable})"
        )
    body = _Reader(reader.take(body_len, "header body"))
    (stored_crc,) = reader.unpack(_CRC, "header CRC32")
    actual_crc = zlib.crc32(bytes(reader.data[: reader.pos - _CRC.size]))
    if stored_crc != actual_crc:
        raise BitstreamError(
            f"header CRC32 mismatch (stored {stored_crc:08x}, computed {actual_crc:08x}): "
            "the stream is corrupt"
        )
    layout = {1: _FIXED_BODY_V1, 2: _FIXED_BODY_V2}.get(version, _FIXED_BODY)
    fields = body.unpack(layout, "header fields")
    coding_mode = CodingMode.legacy()
    if version >= 3:
        try:
            coding_mode = CodingMode.from_flags(fields[10])
        except PLVCError as exc:
            raise BitstreamError(f"invalid stream header: {exc}") from None
    width, height, frame_count, gop, pad, threads, fps_num, fps_den, fingerprint = fields[:9]
    quality = body.text(_U8, "quality label")
    intra_name = body.text(_U8, "intra codec name")
    config_text = body.text(_U16, "intra config JSON")
    if body.remaining:
        raise BitstreamError(f"header body has {body.remaining} unexpected trailing bytes")
    try:
        intra_config = json.loads(config_text)
    except (ValueError, RecursionError):
        raise BitstreamError("intra config in the header is not valid JSON") from None
    if not isinstance(intra_config, dict):
        raise BitstreamError("intra config in the header is not a JSON object")
    if version >= 2:
        intra_fingerprint = fields[9]
    else:
        # version 1 named the intra weights file by path and SHA-256: keep the digest as the
        # fingerprint and drop the path, which a decoder never follows
        intra_fingerprint = _v1_intra_fingerprint(intra_config)
        intra_config = {k: v for k, v in intra_config.items() if k not in INTRA_LOCAL_KEYS}
    if (fps_num == 0) != (fps_den == 0):
        raise BitstreamError(f"invalid fps {fps_num}/{fps_den} in header")
    header = StreamHeader(
        width=width,
        height=height,
        frame_count=frame_count,
        gop=gop,
        pad_multiple=pad,
        quality=quality,
        intra_name=intra_name,
        intra_config=intra_config,
        model_fingerprint=fingerprint,
        fps=(fps_num, fps_den) if fps_num else None,
        cpu_threads=threads,
        intra_fingerprint=intra_fingerprint,
        coding_mode=coding_mode,
        version=version,
    )
    header.validate()
    return header, reader.pos


def _v1_intra_fingerprint(config: dict[str, Any]) -> bytes:
    digest = config.get("weights_sha256")
    if digest is None:
        return bytes(FINGERPRINT_BYTES)
    try:
        raw = bytes.fromhex(digest) if isinstance(digest, str) else b""
    except ValueError:
        raw = b""
    if len(raw) < FINGERPRINT_BYTES:
        raise BitstreamError(f"intra config: weights_sha256 {digest!r} is not a SHA-256 digest")
    return raw[:FINGERPRINT_BYTES]


def _decode_record(reader: _Reader, index: int, gop: int) -> FrameRecord:
    what = f"frame {index}"
    (first,) = reader.unpack(_U8, f"{what} type")
    kind, count = first >> 4, first & 0x0F
    if kind not in (FrameType.I, FrameType.P):
        raise BitstreamError(f"{what}: unknown frame type {kind}")
    frame_type = FrameType(kind)
    expected = frame_type_for_index(index, gop)
    if frame_type is not expected:
        raise BitstreamError(f"{what} is {frame_type.name}, GOP {gop} needs {expected.name}")
    if count == 0:
        raise BitstreamError(f"{what}: zero strings")
    shape = None
    if frame_type is FrameType.P:
        shape = (reader.varint(f"{what} latent height"), reader.varint(f"{what} latent width"))
        if not (0 < shape[0] <= MAX_DIMENSION and 0 < shape[1] <= MAX_DIMENSION):
            raise BitstreamError(f"{what}: latent shape {shape} out of range")
    elif count != 1:
        raise BitstreamError(f"{what}: an I-frame carries one string, found {count}")
    lengths = [reader.varint(f"{what} string {k} length") for k in range(count)]
    if sum(lengths) > reader.remaining:
        raise BitstreamError(
            f"truncated stream: {what} declares {sum(lengths)} payload bytes, "
            f"only {reader.remaining} remain"
        )
    strings = tuple(reader.take(n, f"{what} string {k}") for k, n in enumerate(lengths))
    return FrameRecord(frame_type, strings, shape)


def decode_container(data: bytes | memoryview) -> tuple[StreamHeader, list[FrameRecord]]:
    """Parse a whole stream; raises :class:`BitstreamError` on any inconsistency."""
    header, start = read_header(data)
    end = len(data) - _CRC.size
    if end < start:
        raise BitstreamError("truncated stream: the records' CRC32 trailer is missing")
    view = memoryview(data)
    (stored_crc,) = _CRC.unpack(view[end:])
    actual_crc = zlib.crc32(view[start:end])
    if stored_crc != actual_crc:
        raise BitstreamError(
            f"frame data CRC32 mismatch (stored {stored_crc:08x}, computed {actual_crc:08x}): "
            "the stream is corrupt or truncated"
        )
    # each record takes at least 2 bytes: a forged frame count cannot make us loop long
    if header.frame_count * 2 > end - start:
        raise BitstreamError(
            f"header declares {header.frame_count} frames but only {end - start} bytes of "
            "frame data follow"
        )
    reader = _Reader(view, start, end)
    frames = [_decode_record(reader, i, header.gop) for i in range(header.frame_count)]
    if reader.remaining:
        raise BitstreamError(f"{reader.remaining} unexpected bytes after the last frame")
    return header, frames


def pack_fields(ints: Sequence[int], strings: Sequence[bytes]) -> bytes:
    """Frame integers and byte strings: varint n, n varints, varint m, m lengths, m strings.

    Used by codecs for their own payloads (e.g. an intra codec's strings and latent shape).
    """
    if len(ints) > MAX_FIELDS or len(strings) > MAX_FIELDS:
        raise BitstreamError(f"at most {MAX_FIELDS} integers and {MAX_FIELDS} strings per payload")
    out = bytearray(_varint(len(ints)))
    for value in ints:
        out += _varint(int(value))
    out += _varint(len(strings))
    for s in strings:
        out += _varint(len(s))
    for s in strings:
        out += s
    return bytes(out)


def unpack_fields(data: bytes, what: str = "payload") -> tuple[list[int], list[bytes]]:
    """Inverse of :func:`pack_fields`; raises :class:`BitstreamError` naming ``what``."""
    reader = _Reader(data)
    n_ints = reader.varint(f"{what} integer count")
    if n_ints > MAX_FIELDS:
        raise BitstreamError(f"{what}: {n_ints} integers, at most {MAX_FIELDS} allowed")
    ints = [reader.varint(f"{what} integer {i}") for i in range(n_ints)]
    n_strings = reader.varint(f"{what} string count")
    if n_strings > MAX_FIELDS:
        raise BitstreamError(f"{what}: {n_strings} strings, at most {MAX_FIELDS} allowed")
    lengths = [reader.varint(f"{what} string {k} length") for k in range(n_strings)]
    if sum(lengths) != reader.remaining:
        raise BitstreamError(
            f"{what}: strings declare {sum(lengths)} bytes but {reader.remaining} remain"
        )
    return ints, [reader.take(n, f"{what} string {k}") for k, n in enumerate(lengths)]


def check_payload_size(
    what: str, declared: tuple[int, int], expected: tuple[int, int] | None
) -> None:
    """Raise :class:`BitstreamError` when a payload declares another ``(H, W)`` than the
    caller expects. Called before decoding, so what a decoder allocates is bounded by the
    frame size of the stream's header, not by a size a forged payload names."""
    if expected is not None and tuple(declared) != tuple(expected):
        raise BitstreamError(
            f"{what}: declares a {declared[1]}x{declared[0]} image, the stream's frames are "
            f"{expected[1]}x{expected[0]}"
        )


def pad_for_rans(string: bytes, num_symbols: int) -> bytes:
    """Append zero bytes so CompressAI's rANS decoder stays inside the buffer.

    ``compressai.ans`` reads its input without bounds checks: a valid string is consumed
    exactly, but a forged one (the CRCs catch accidental damage) makes it read on, about
    one 32-bit word per remaining symbol plus bypass-coded escapes. The zeros give those
    reads somewhere to land; decoding a valid string is unchanged.
    """
    return bytes(string) + bytes(_RANS_PAD_FIXED + 4 * num_symbols + 4 * len(string))


def write_stream(
    path: str | os.PathLike[str], header: StreamHeader, frames: Sequence[FrameRecord]
) -> int:
    """Write the container atomically (temp file + rename); return the bytes written."""
    data = encode_container(header, frames)
    atomic_write_bytes(path, data)
    return len(data)


def read_stream(path: str | os.PathLike[str]) -> tuple[StreamHeader, list[FrameRecord]]:
    """Read and parse a stream file; errors name the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BitstreamError(f"{path}: cannot read stream: {exc.strerror or exc}") from None
    try:
        return decode_container(data)
    except BitstreamError as exc:
        raise BitstreamError(f"{path}: {exc}") from None
