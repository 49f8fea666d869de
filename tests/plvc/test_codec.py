"""Whole-video coding of a real clip: GOP structure, padding, rate stats, and a decode in
another process that reproduces the encoder's reconstruction bit for bit."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from plvc.bitstream import FrameRecord, decode_container, encode_container
from plvc.codec import (
    EncodeResult,
    decode_video,
    encode_video,
    intra_fingerprint,
    model_fingerprint,
)
from plvc.determinism import CodingMode
from plvc.errors import BitstreamError, IntraCodecError, PLVCError, WeightsError
from plvc.generator import PLVC, PLVCConfig
from plvc.intra import get_intra_codec
from plvc.intra_compressai import CompressAIIntraCodec
from plvc.weights import save_weights

# 100x150: neither side is a multiple of 16 (coded 112x160) nor of the intra's 64
HEIGHT, WIDTH, FRAMES, GOP = 100, 150, 5, 3


def make_codec_pair(
    folder: Path, seed: int = 0, config: PLVCConfig | None = None
) -> tuple[PLVC, CompressAIIntraCodec, Path]:
    """A tiny generator and an intra codec whose payloads depend on the content.

    Freshly initialised networks produce latents that all round to zero, so every frame
    would code to the same bytes; scaling the analysis transforms' last layers makes
    the latents large enough for the strings to carry the picture. The intra codec's
    weights go to a file, as trained ones would, and the generator to a weights file.
    """
    torch.manual_seed(seed)
    model = PLVC(config or PLVCConfig.tiny())
    with torch.no_grad():
        model.motion_encoder.tail[-1].weight.mul_(20.0)
        model.residual_encoder.tail[-1].weight.mul_(20.0)
    model.eval()
    source = get_intra_codec("compressai", quality=1, allow_random_init=True)
    with torch.no_grad():
        source.model.g_a[-1].weight.mul_(5.0)
    intra_weights = folder / "intra.pt"
    torch.save(source.model.state_dict(), intra_weights)
    intra = get_intra_codec(
        "compressai", architecture="bmshj2018-hyperprior", quality=1, weights=str(intra_weights)
    )
    weights = folder / "plvc.pt"
    save_weights(weights, model, intra_name=intra.name, intra_config=intra.config, quality="low")
    return model, intra, weights


@dataclass
class Coded:
    frames: torch.Tensor
    model: PLVC
    intra: CompressAIIntraCodec
    weights: Path
    result: EncodeResult
    folder: Path


@pytest.fixture(scope="module")
def coded(carphone: torch.Tensor, tmp_path_factory: pytest.TempPathFactory) -> Coded:
    folder = tmp_path_factory.mktemp("codec")
    torch.set_num_threads(1)
    model, intra, weights = make_codec_pair(folder)
    frames = carphone[:FRAMES, :, :HEIGHT, :WIDTH].contiguous()
    result = encode_video(
        frames,
        model,
        intra,
        gop=GOP,
        quality="low",
        estimate_bits=True,
        return_reconstruction=True,
    )
    return Coded(frames, model, intra, weights, result, folder)


def test_gop_structure_and_padding(coded: Coded) -> None:
    header, records = decode_container(coded.result.data)
    assert [r.frame_type.name for r in records] == ["I", "P", "P", "I", "P"]
    assert (header.width, header.height, header.frame_count) == (WIDTH, HEIGHT, FRAMES)
    assert (header.coded_width, header.coded_height) == (160, 112)
    assert all(r.shape == (7, 10) for r in records if r.frame_type.name == "P")
    # the stream names the intra codec's architecture and fingerprint, never its file
    assert header.intra_name == "compressai"
    assert header.intra_config == {"architecture": "bmshj2018-hyperprior", "quality": 1}
    digest = coded.intra.config["weights_sha256"]
    assert header.intra_fingerprint == bytes.fromhex(digest)[:8] == intra_fingerprint(coded.intra)
    assert header.model_fingerprint == model_fingerprint(coded.model)
    assert coded.result.reconstruction is not None
    assert coded.result.reconstruction.shape == (FRAMES, 3, HEIGHT, WIDTH)


def test_payloads_carry_the_content(coded: Coded) -> None:
    _, records = decode_container(coded.result.data)
    # frames 0 and 3 are different pictures; so are the P-frames 1 and 4
    assert records[0].strings != records[3].strings
    assert records[1].strings != records[4].strings


def test_rate_statistics(coded: Coded) -> None:
    result = coded.result
    stats = result.frame_stats
    assert [s.frame_type for s in stats] == ["I", "P", "P", "I", "P"]
    _, records = decode_container(result.data)
    assert [s.payload_bytes for s in stats] == [r.payload_bytes for r in records]
    overhead = len(result.data) - sum(s.payload_bytes for s in stats)
    assert 0 < overhead < 200  # header (intra config and fingerprints) + framing
    assert result.bpp == pytest.approx(8 * len(result.data) / (FRAMES * WIDTH * HEIGHT))
    for s in stats:
        assert s.estimated_bits is not None and s.estimated_bits > 0
        # the entropy coder lands near the model's information content; out-of-range
        # symbols are bypass-coded in fewer bits than the likelihood floor charges
        assert 0.7 * s.estimated_bits <= s.bits <= 1.15 * s.estimated_bits + 128, s
    assert result.estimated_bpp is not None and result.payload_bpp > 0


def test_decoder_uses_the_encoders_thread_count(coded: Coded) -> None:
    """CPU convolutions round differently per thread count: the header records the
    encoder's (1 here) and the decoder switches to it."""
    header, _ = decode_container(coded.result.data)
    assert header.cpu_threads == 1
    torch.set_num_threads(2)
    try:
        decoded = decode_video(coded.result.data, coded.model, intra=coded.intra)
        assert torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(1)
    assert torch.equal(decoded, coded.result.reconstruction)


def test_bundle_alone_decodes_bit_exactly_in_another_process_and_folder(
    coded: Coded, tmp_path: Path
) -> None:
    """Only the codec bundle and the stream are copied to another folder; the intra codec's
    weights file is moved away meanwhile, so nothing but the bundle can serve."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "clip.plvc").write_bytes(coded.result.data)
    (elsewhere / "bundle.pt").write_bytes(coded.weights.read_bytes())
    intra_file = coded.folder / "intra.pt"
    hidden = coded.folder / "intra.pt.hidden"
    script = (
        "import torch\n"
        "from plvc.codec import decode_video\n"
        "data = open('clip.plvc', 'rb').read()\n"
        "torch.save(decode_video(data, weights='bundle.pt'), 'decoded.pt')\n"
    )
    intra_file.rename(hidden)
    try:
        subprocess.run(
            [sys.executable, "-W", "ignore", "-c", script],
            check=True,
            timeout=300,
            cwd=elsewhere,
        )
    finally:
        hidden.rename(intra_file)
    assert torch.equal(torch.load(elsewhere / "decoded.pt"), coded.result.reconstruction)


def test_other_inputs_code_identically(coded: Coded) -> None:
    """uint8 arrays and frame iterables are the same video as the float tensor."""
    frames = coded.frames[:2]
    as_uint8 = (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    a = encode_video(frames, coded.model, coded.intra, gop=-1)
    b = encode_video(np.ascontiguousarray(as_uint8), coded.model, coded.intra, gop=-1)
    c = encode_video(iter(list(frames)), coded.model, coded.intra, gop=-1)
    assert a.data == c.data
    assert len(b.data) > 0 and decode_container(b.data)[0].frame_count == 2


def test_single_i_frame_and_all_intra(coded: Coded) -> None:
    one = encode_video(coded.frames[:3], coded.model, coded.intra, gop=-1)
    assert [s.frame_type for s in one.frame_stats] == ["I", "P", "P"]
    intra_only = encode_video(
        coded.frames[:2], coded.model, coded.intra, gop=1, return_reconstruction=True
    )
    assert [s.frame_type for s in intra_only.frame_stats] == ["I", "I"]
    assert torch.equal(
        decode_video(intra_only.data, coded.model, intra=coded.intra), intra_only.reconstruction
    )


def test_decoding_with_other_weights_fails_clearly(coded: Coded) -> None:
    torch.manual_seed(1)
    other = PLVC(PLVCConfig.tiny()).eval()
    other.update(force=True)
    with pytest.raises(WeightsError, match="encoded with other generator weights"):
        decode_video(coded.result.data, other)


def test_intra_codec_mismatch_and_separate_weights(coded: Coded, tmp_path: Path) -> None:
    class OtherCodec:
        name, stride, config = "other", 1, {}

    with pytest.raises(IntraCodecError, match="needs intra codec 'compressai', got 'other'"):
        decode_video(coded.result.data, coded.model, intra=OtherCodec())  # type: ignore[arg-type]
    # a stream never names a file: without the bundle, the intra weights are the caller's
    with pytest.raises(IntraCodecError, match="a stream never names a file"):
        decode_video(coded.result.data, coded.model)
    moved = tmp_path / "moved.pt"
    moved.write_bytes((coded.folder / "intra.pt").read_bytes())
    decoded = decode_video(
        coded.result.data,
        coded.model,
        intra_overrides={"weights": str(moved)},
    )
    assert torch.equal(decoded, coded.result.reconstruction)
    # other valid weights of the same architecture: refused by the intra fingerprint
    other = get_intra_codec("compressai", quality=1, seed=5, allow_random_init=True)
    torch.save(other.model.state_dict(), moved)
    with pytest.raises(IntraCodecError, match="another 'compressai' intra codec"):
        decode_video(coded.result.data, coded.model, intra_overrides={"weights": str(moved)})
    moved.write_bytes(b"other")
    with pytest.raises(IntraCodecError, match="do not load"):
        decode_video(coded.result.data, coded.model, intra_overrides={"weights": str(moved)})


def test_damaged_p_frame_strings_raise_or_decode(coded: Coded) -> None:
    """Strings that pass the CRCs but are not the encoder's (forged or buggy streams)
    must not crash the process: they decode to something or raise BitstreamError."""
    header, records = decode_container(coded.result.data)
    for damage in (lambda s: s[: len(s) // 3], lambda s: b"", lambda s: bytes(x ^ 0x5A for x in s)):
        p = records[2]
        forged = list(records)
        forged[2] = FrameRecord(p.frame_type, (damage(p.strings[0]), p.strings[1]), p.shape)
        data = encode_container(header, forged)
        assert data != coded.result.data
        try:
            frames = decode_video(data, coded.model, intra=coded.intra)
        except BitstreamError:
            continue
        assert frames.shape == (FRAMES, 3, HEIGHT, WIDTH)


def test_forged_latent_size_fails_before_any_allocation(coded: Coded) -> None:
    """A P-frame record that declares a huge latent (valid CRCs, a 30 kB file) is rejected
    from the header's frame size alone, before the decoder pads the strings for that size
    (~0.5 GB here; ~137 GB for a 16384x16384 latent) or decodes a frame."""
    import tracemalloc

    header, records = decode_container(coded.result.data)
    p = records[2]
    for shape in ((2000, 2000), (p.shape[0], p.shape[1] + 1), (16384, 16384)):
        forged = list(records)
        forged[2] = FrameRecord(p.frame_type, p.strings, shape)
        data = encode_container(header, forged)
        tracemalloc.start()
        try:
            with pytest.raises(BitstreamError, match=r"frame 2: latent size .* does not match"):
                decode_video(data, coded.model, intra=coded.intra)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a forged latent size"


def test_forged_intra_payload_size_fails_before_decoding(coded: Coded) -> None:
    """An I-frame payload that declares another image size than the stream's frames (with a
    consistent latent shape, so the intra codec alone would decode it) is rejected."""
    from plvc.bitstream import pack_fields, unpack_fields

    header, records = decode_container(coded.result.data)
    ints, strings = unpack_fields(records[0].strings[0])
    h, w, sh, sw = ints
    big = [4 * h, 4 * w, 4 * sh, 4 * sw]
    forged = [FrameRecord(records[0].frame_type, (pack_fields(big, strings),)), *records[1:]]
    with pytest.raises(BitstreamError, match=rf"frame 0: .*declares a {4 * w}x{4 * h} image"):
        decode_video(encode_container(header, forged), coded.model, intra=coded.intra)


def test_stream_cannot_ask_for_a_random_intra_codec_or_name_a_file(coded: Coded) -> None:
    """The stream's intra config is data: a forged ``allow_random_init`` is refused unless
    the caller says so explicitly, and a config that names a file is not a valid stream."""
    import dataclasses

    header, records = decode_container(coded.result.data)
    random = {**header.intra_config, "allow_random_init": True, "seed": 0}
    forged = dataclasses.replace(header, intra_config=random, intra_fingerprint=bytes(8))
    data = encode_container(forged, records)
    with pytest.raises(IntraCodecError, match="randomly initialised intra codec"):
        decode_video(data, coded.model)
    decoded = decode_video(data, coded.model, intra_overrides={"allow_random_init": True})
    assert decoded.shape == (FRAMES, 3, HEIGHT, WIDTH)
    # the bundle's trained intra codec is not the stream's untrained one
    with pytest.raises(IntraCodecError, match="use the codec bundle it was encoded with"):
        decode_video(data, weights=coded.weights)
    for key in ("weights", "weights_sha256"):
        named = dataclasses.replace(header, intra_config={**header.intra_config, key: "x"})
        with pytest.raises(BitstreamError, match="never a file"):
            encode_container(named, records)


def test_format_1_streams_still_decode(coded: Coded) -> None:
    """A version-1 header (no intra fingerprint field; the intra weights named by path and
    SHA-256) decodes through the bundle; its path is never followed. Its frames were coded
    as format 1-2 coded them (``CodingMode.legacy()``: NCHW), which the decoder assumes."""
    import json
    import struct
    import zlib

    legacy = encode_video(
        coded.frames,
        coded.model,
        coded.intra,
        gop=GOP,
        quality="low",
        return_reconstruction=True,
        mode=CodingMode.legacy(),
    )
    header, _ = decode_container(legacy.data)
    assert header.version == 3 and header.coding_mode == CodingMode.legacy()
    body_start = 7
    (body_len,) = struct.unpack_from("<H", legacy.data, 5)
    records = legacy.data[body_start + body_len + 4 :]
    digest = coded.intra.config["weights_sha256"]
    config = {**header.intra_config, "weights": "/nowhere/intra.pt", "weights_sha256": digest}
    fps = header.fps or (0, 0)
    body = struct.pack(
        "<IIIiHHII8s",
        header.width,
        header.height,
        header.frame_count,
        header.gop,
        header.pad_multiple,
        header.cpu_threads,
        *fps,
        header.model_fingerprint,
    )
    for text, size in ((header.quality, "<B"), (header.intra_name, "<B")):
        body += struct.pack(size, len(text)) + text.encode()
    raw = json.dumps(config).encode()
    body += struct.pack("<H", len(raw)) + raw
    head = b"PLVC" + bytes([1]) + struct.pack("<H", len(body)) + body
    v1 = head + struct.pack("<I", zlib.crc32(head)) + records
    old_header, _ = decode_container(v1)
    assert old_header.version == 1 and old_header.intra_fingerprint == header.intra_fingerprint
    assert "weights" not in old_header.intra_config
    assert old_header.coding_mode == CodingMode.legacy()
    assert torch.equal(decode_video(v1, weights=coded.weights), legacy.reconstruction)


def test_bad_input_frames(coded: Coded) -> None:
    with pytest.raises(PLVCError, match="no frames to encode"):
        encode_video(iter([]), coded.model, coded.intra)
    mixed = [coded.frames[0], coded.frames[1, :, :50]]
    with pytest.raises(PLVCError, match=r"frame 1 is 150x50, the video is 150x100"):
        encode_video(mixed, coded.model, coded.intra)
    with pytest.raises(PLVCError, match="GOP must be -1"):
        encode_video(coded.frames, coded.model, coded.intra, gop=0)
    with pytest.raises(PLVCError, match="frame 0: arrays must be RGB uint8"):
        encode_video(np.zeros((1, 8, 8, 3), np.float32), coded.model, coded.intra)
