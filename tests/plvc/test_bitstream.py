"""The PLVC container: exact round trips, and only BitstreamError on damaged input."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plvc.bitstream import (
    FORMAT_VERSION,
    MAGIC,
    FrameRecord,
    FrameType,
    StreamHeader,
    decode_container,
    encode_container,
    frame_type_for_index,
    pack_fields,
    read_header,
    read_stream,
    unpack_fields,
    write_stream,
)
from plvc.determinism import CodingMode
from plvc.errors import BitstreamError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_header(**overrides: object) -> StreamHeader:
    values: dict[str, object] = {
        "width": 176,
        "height": 144,
        "frame_count": 5,
        "gop": 3,
        "pad_multiple": 16,
        "quality": "low",
        "intra_name": "compressai",
        "intra_config": {"architecture": "bmshj2018-hyperprior", "quality": 1, "seed": 0},
        "model_fingerprint": bytes(range(8)),
        "fps": (30000, 1001),
        "cpu_threads": 4,
    }
    values.update(overrides)
    return StreamHeader(**values)  # type: ignore[arg-type]


def make_frames(header: StreamHeader) -> list[FrameRecord]:
    frames = []
    for i in range(header.frame_count):
        if frame_type_for_index(i, header.gop) is FrameType.I:
            frames.append(FrameRecord(FrameType.I, (bytes([i]) * (40 + i),)))
        else:
            # lengths straddling the 1- and 2-byte varint boundary
            frames.append(FrameRecord(FrameType.P, (b"m" * 127, b"r" * (128 + i)), (9, 11)))
    return frames


@pytest.fixture(scope="module")
def valid_stream() -> bytes:
    header = make_header()
    return encode_container(header, make_frames(header))


def test_round_trip_preserves_every_field(valid_stream: bytes) -> None:
    header, frames = decode_container(valid_stream)
    assert header == make_header()
    assert frames == make_frames(header)
    assert header.coded_width == 176 and header.coded_height == 144
    assert valid_stream[:4] == MAGIC and valid_stream[4] == FORMAT_VERSION


@pytest.mark.parametrize(
    "overrides",
    [
        {"gop": -1, "frame_count": 4, "fps": None, "cpu_threads": 0},
        {"gop": 1, "frame_count": 3, "quality": ""},
        {"width": 175, "height": 1, "pad_multiple": 64},
        {"intra_config": {}, "quality": "très haute"},
        {"coding_mode": CodingMode("device", "bfloat16", channels_last=True)},
        {"coding_mode": CodingMode()},
    ],
)
def test_round_trip_variants(overrides: dict[str, object]) -> None:
    header = make_header(**overrides)
    frames = make_frames(header)
    assert decode_container(encode_container(header, frames)) == (header, frames)


def test_coded_size_rounds_up_to_pad_multiple() -> None:
    header = make_header(width=175, height=130, pad_multiple=16)
    assert (header.coded_width, header.coded_height) == (176, 144)


def test_empty_payload_strings_round_trip() -> None:
    header = make_header(frame_count=2, gop=-1)
    frames = [FrameRecord(FrameType.I, (b"",)), FrameRecord(FrameType.P, (b"", b""), (1, 1))]
    assert decode_container(encode_container(header, frames))[1] == frames


def test_per_frame_overhead_is_small() -> None:
    """Framing per P-frame stays a few bytes: it is counted in the measured bpp."""
    header = make_header(frame_count=2, gop=-1)
    payload = (b"x" * 300, b"y" * 200)
    frames = [FrameRecord(FrameType.I, (b"i",)), FrameRecord(FrameType.P, payload, (15, 26))]
    one = len(encode_container(make_header(frame_count=1, gop=-1), frames[:1]))
    two = len(encode_container(header, frames))
    assert two - one - 500 <= 7  # 1 type byte + 2 shape bytes + 2x2 length bytes


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"width": 0}, "width"),
        ({"height": 20000}, "height"),
        ({"gop": 0}, "GOP"),
        ({"gop": -2}, "GOP"),
        ({"pad_multiple": 0}, "pad multiple"),
        ({"model_fingerprint": b"short"}, "fingerprint"),
        ({"fps": (0, 1)}, "fps"),
        ({"cpu_threads": 70000}, "CPU threads"),
        ({"intra_name": ""}, "intra codec name"),
        ({"quality": "q" * 300}, "quality label"),
        ({"intra_config": {"x": object()}}, "JSON"),
    ],
)
def test_invalid_header_is_rejected_on_encode(overrides: dict[str, object], message: str) -> None:
    header = make_header(**overrides)
    with pytest.raises(BitstreamError, match=message):
        encode_container(header, make_frames(make_header()))


def test_frame_types_must_follow_gop() -> None:
    header = make_header(frame_count=2, gop=-1)
    frames = [FrameRecord(FrameType.I, (b"a",)), FrameRecord(FrameType.I, (b"b",))]
    with pytest.raises(BitstreamError, match="frame 1 is I, GOP -1 needs P"):
        encode_container(header, frames)


def test_frame_count_must_match_records() -> None:
    header = make_header()
    with pytest.raises(BitstreamError, match="5 frames but 4 records"):
        encode_container(header, make_frames(header)[:4])


def test_p_frame_needs_shape_and_i_frame_one_string() -> None:
    header = make_header(frame_count=2, gop=-1)
    with pytest.raises(BitstreamError, match="latent shape"):
        encode_container(
            header, [FrameRecord(FrameType.I, (b"a",)), FrameRecord(FrameType.P, (b"m", b"r"))]
        )
    with pytest.raises(BitstreamError, match="exactly one string"):
        encode_container(make_header(frame_count=1), [FrameRecord(FrameType.I, (b"a", b"b"))])


# -- damaged input -------------------------------------------------------------------------


def test_foreign_data_names_the_magic() -> None:
    with pytest.raises(BitstreamError, match=r"not a PLVC stream: magic is b'\\x89PNG'"):
        decode_container(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(BitstreamError, match="not a PLVC stream"):
        decode_container(b"")


def test_unsupported_version_is_named(valid_stream: bytes) -> None:
    data = bytearray(valid_stream)
    data[4] = FORMAT_VERSION + 1
    with pytest.raises(BitstreamError, match=f"unsupported format version {FORMAT_VERSION + 1}"):
        decode_container(bytes(data))


def test_every_truncation_is_detected(valid_stream: bytes) -> None:
    for length in range(len(valid_stream)):
        with pytest.raises(BitstreamError):
            decode_container(valid_stream[:length])


def test_header_corruption_reports_header_crc(valid_stream: bytes) -> None:
    data = bytearray(valid_stream)
    data[10] ^= 0x01  # inside the width field
    with pytest.raises(BitstreamError, match="header CRC32 mismatch"):
        decode_container(bytes(data))


def test_payload_corruption_reports_frame_crc(valid_stream: bytes) -> None:
    data = bytearray(valid_stream)
    data[-10] ^= 0x80  # inside the last frame's payload
    with pytest.raises(BitstreamError, match="frame data CRC32 mismatch"):
        decode_container(bytes(data))


def test_trailing_bytes_are_rejected(valid_stream: bytes) -> None:
    _, start = read_header(valid_stream)
    records = valid_stream[start:-4] + b"\x00"
    data = valid_stream[:start] + records + struct.pack("<I", zlib.crc32(records))
    with pytest.raises(BitstreamError, match="1 unexpected bytes after the last frame"):
        decode_container(data)


def test_forged_frame_count_cannot_make_decoder_loop(valid_stream: bytes) -> None:
    _, frames = decode_container(valid_stream)
    forged = encode_container(make_header(frame_count=1, gop=-1), frames[:1])
    # rewrite the frame count to 2^32-1 and fix the header CRC: a forged, self-consistent header
    _, start = read_header(forged)
    head = bytearray(forged[: start - 4])
    struct.pack_into("<I", head, 7 + 8, 2**32 - 1)
    data = bytes(head) + struct.pack("<I", zlib.crc32(head)) + forged[start:]
    with pytest.raises(BitstreamError, match="declares 4294967295 frames"):
        decode_container(data)


def test_unknown_coding_flags_are_refused(valid_stream: bytes) -> None:
    """Bits of the coding-flags byte this build does not know mean a stream coded in a way
    it cannot reproduce: refused by name, not decoded into garbage."""
    _, start = read_header(valid_stream)
    head = bytearray(valid_stream[: start - 4])
    flags_offset = 7 + struct.calcsize("<IIIiHHII8s8s")
    assert head[flags_offset] == CodingMode.legacy().to_flags()
    head[flags_offset] = 0x40
    data = bytes(head) + struct.pack("<I", zlib.crc32(head)) + valid_stream[start:]
    with pytest.raises(BitstreamError, match="coding flags 0x40 use bits this build does not"):
        decode_container(data)


def _with_fixed_crcs(data: bytes) -> bytes | None:
    """Recompute both CRCs of a (damaged) stream so the parser's structure checks run."""
    if len(data) < 7 + 4 + 4:
        return None
    body_len = int.from_bytes(data[5:7], "little")
    header_end = 7 + body_len
    if header_end + 8 > len(data):
        return None
    head = data[:header_end]
    records = data[header_end + 4 : -4]
    return (
        head
        + struct.pack("<I", zlib.crc32(head))
        + records
        + struct.pack("<I", zlib.crc32(records))
    )


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_bitstream_error(data: bytes) -> None:
    for candidate in (data, MAGIC + data, MAGIC + bytes([FORMAT_VERSION]) + data):
        with pytest.raises(BitstreamError):
            decode_container(candidate)


@FUZZ
@given(st.data())
def test_bit_flips_raise_only_bitstream_error(valid_stream: bytes, data: st.DataObject) -> None:
    """CRC32 catches every 1-3 bit error at these lengths (Hamming distance 4)."""
    bits = data.draw(st.sets(st.integers(0, 8 * len(valid_stream) - 1), min_size=1, max_size=3))
    damaged = bytearray(valid_stream)
    for bit in bits:
        damaged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(BitstreamError):
        decode_container(bytes(damaged))


@FUZZ
@given(st.data())
def test_structural_damage_behind_valid_crcs(valid_stream: bytes, data: st.DataObject) -> None:
    """With the CRCs recomputed the parser itself must catch (or accept) every change."""
    damaged = bytearray(valid_stream)
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, len(damaged) - 1))
        damaged[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, 40))
    candidate = _with_fixed_crcs(bytes(damaged[: len(damaged) - cut]))
    if candidate is None:
        return
    try:
        header, frames = decode_container(candidate)
    except BitstreamError:
        return
    assert len(frames) == header.frame_count  # a change that left a valid stream


def test_pack_fields_round_trip() -> None:
    ints, strings = [0, 127, 128, 2**32 - 1], [b"", b"a" * 300, b"\x00"]
    assert unpack_fields(pack_fields(ints, strings)) == (ints, strings)


@FUZZ
@given(st.binary(max_size=200))
def test_unpack_fields_rejects_garbage_cleanly(data: bytes) -> None:
    try:
        ints, strings = unpack_fields(data)
    except BitstreamError:
        return
    assert pack_fields(ints, strings) == data  # only canonical encodings parse


def test_varint_must_be_canonical() -> None:
    # one integer, 0 encoded in two bytes (0x80 0x00): rejected
    with pytest.raises(BitstreamError, match="non-canonical"):
        unpack_fields(b"\x01\x80\x00\x00")


# -- files ----------------------------------------------------------------------------------


def test_write_and_read_stream_file(tmp_path: Path) -> None:
    header = make_header()
    path = tmp_path / "clip.plvc"
    written = write_stream(path, header, make_frames(header))
    assert path.stat().st_size == written
    assert read_stream(path) == (header, make_frames(header))
    assert [p.name for p in tmp_path.iterdir()] == ["clip.plvc"]  # no temp file left


def test_failed_write_keeps_the_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "clip.plvc"
    path.write_bytes(b"previous")
    header = make_header()
    with pytest.raises(BitstreamError):
        write_stream(path, header, make_frames(header)[:2])
    assert path.read_bytes() == b"previous"


def test_read_stream_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.plvc"
    path.write_bytes(b"PLVC\x01")
    with pytest.raises(BitstreamError, match=r"broken\.plvc: truncated stream"):
        read_stream(path)
    with pytest.raises(BitstreamError, match=r"missing\.plvc: cannot read"):
        read_stream(tmp_path / "missing.plvc")
