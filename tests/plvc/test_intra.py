"""The CompressAI intra codec: registry, exact round trips across processes, weights files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plvc.bitstream import pack_fields, unpack_fields
from plvc.errors import BitstreamError, IntraCodecError
from plvc.intra import available_intra_codecs, get_intra_codec
from plvc.intra_compressai import CompressAIIntraCodec


@pytest.fixture(scope="module")
def codec() -> CompressAIIntraCodec:
    return get_intra_codec(
        "compressai", architecture="bmshj2018-hyperprior", quality=1, allow_random_init=True
    )


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8), size=(50, 70), mode="bicubic")
    return smooth[0].clamp(0, 1)


def test_registered_and_explicit_about_training(codec: CompressAIIntraCodec) -> None:
    assert "compressai" in available_intra_codecs()
    assert codec.name == "compressai" and codec.stride == 64
    assert codec.trained is False
    assert codec.config == {
        "architecture": "bmshj2018-hyperprior",
        "quality": 1,
        "allow_random_init": True,
        "seed": 0,
    }


def test_round_trip_of_an_odd_size_image(codec: CompressAIIntraCodec, image: torch.Tensor) -> None:
    data = codec.encode(image)
    decoded = codec.decode(data)
    assert decoded.shape == image.shape and decoded.dtype == torch.float32
    assert float(decoded.min()) >= 0.0 and float(decoded.max()) <= 1.0
    assert torch.equal(codec.decode(data), decoded)  # decoding is repeatable
    ints, _ = unpack_fields(data)
    assert ints == [50, 70, 1, 2]  # original size, hyper-latent of the 64x128 padded image


def test_config_rebuilds_the_same_codec(codec: CompressAIIntraCodec, image: torch.Tensor) -> None:
    rebuilt = get_intra_codec("compressai", **codec.config)
    assert rebuilt.encode(image) == codec.encode(image)
    other_seed = get_intra_codec("compressai", **{**codec.config, "seed": 1})
    assert other_seed.encode(image) != codec.encode(image)


@pytest.mark.parametrize("architecture", ["bmshj2018-factorized", "mbt2018"])
def test_other_architecture_families(architecture: str) -> None:
    codec = get_intra_codec(
        "compressai", architecture=architecture, quality=1, allow_random_init=True
    )
    x = torch.rand(3, 32, 40)
    assert codec.decode(codec.encode(x)).shape == x.shape


def test_rate_estimate_matches_coded_size(codec: CompressAIIntraCodec, image: torch.Tensor) -> None:
    estimated = codec.estimate_bits(image)
    _, strings = unpack_fields(codec.encode(image))
    actual = 8 * sum(len(s) for s in strings)
    # rANS codes within a few bytes of the model's information content
    assert 0.95 * estimated <= actual <= 1.1 * estimated + 256


def test_decode_in_another_process_is_bit_exact(tmp_path: Path, image: torch.Tensor) -> None:
    architectures = ["bmshj2018-hyperprior", "mbt2018-mean"]
    for arch in architectures:
        codec = get_intra_codec(
            "compressai", architecture=arch, quality=2, seed=3, allow_random_init=True
        )
        (tmp_path / f"{arch}.bin").write_bytes(codec.encode(image))
        torch.save(codec.decode((tmp_path / f"{arch}.bin").read_bytes()), tmp_path / f"{arch}.pt")
    script = f"""
import sys, torch
from plvc.intra import get_intra_codec
for arch in {architectures!r}:
    codec = get_intra_codec(
        "compressai", architecture=arch, quality=2, seed=3, allow_random_init=True
    )
    decoded = codec.decode(open(sys.argv[1] + "/" + arch + ".bin", "rb").read())
    torch.save(decoded, sys.argv[1] + "/" + arch + ".other.pt")
"""
    subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script, str(tmp_path)], check=True, timeout=300
    )
    for arch in architectures:
        mine = torch.load(tmp_path / f"{arch}.pt")
        theirs = torch.load(tmp_path / f"{arch}.other.pt")
        assert torch.equal(mine, theirs), arch


def test_weights_file_is_loaded_and_verified(tmp_path: Path, image: torch.Tensor) -> None:
    source = get_intra_codec("compressai", quality=1, seed=7, allow_random_init=True)
    path = tmp_path / "intra.pt"
    torch.save(source.model.state_dict(), path)
    trained = get_intra_codec(
        "compressai", architecture="bmshj2018-hyperprior", quality=1, weights=str(path)
    )
    assert trained.trained is True
    assert trained.config["weights"] == str(path) and len(trained.config["weights_sha256"]) == 64
    assert trained.encode(image) == source.encode(image)  # the weights, not seed 0

    torch.save({"state_dict": source.model.state_dict(), "epoch": 3}, path)  # training checkpoint
    with pytest.raises(IntraCodecError, match=r"SHA-256 .* a different file"):
        get_intra_codec("compressai", **trained.config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": "/nonexistent/hific.pt"}, r"'/nonexistent/hific\.pt' \(param 'weights'\)"),
        ({"allow_random_init": False}, "needs trained weights: set its 'weights' param"),
        ({"architecture": "jpeg"}, "unknown CompressAI architecture 'jpeg'"),
        ({"quality": 42, "allow_random_init": True}, "invalid quality 42"),
    ],
)
def test_configuration_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(IntraCodecError, match=message):
        get_intra_codec("compressai", **kwargs)


def test_weights_of_another_architecture_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "factorized.pt"
    other = get_intra_codec(
        "compressai", architecture="bmshj2018-factorized", quality=1, allow_random_init=True
    )
    torch.save(other.model.state_dict(), path)
    with pytest.raises(IntraCodecError, match="do not load into CompressAI bmshj2018-hyperprior"):
        get_intra_codec("compressai", weights=str(path), quality=1)


def test_malformed_payloads_raise_bitstream_error(
    codec: CompressAIIntraCodec, image: torch.Tensor
) -> None:
    ints, strings = unpack_fields(codec.encode(image))
    with pytest.raises(BitstreamError, match="latent shape"):
        codec.decode(pack_fields([50, 70, 9, 9], strings))
    with pytest.raises(BitstreamError, match="expected 4 integers"):
        codec.decode(pack_fields(ints[:3], strings))
    with pytest.raises(BitstreamError, match="1 strings"):
        codec.decode(pack_fields(ints, strings[:1]))
    with pytest.raises(BitstreamError, match="image size"):
        codec.decode(pack_fields([0, 70, 1, 2], strings))


def test_damaged_entropy_strings_decode_without_crashing(
    codec: CompressAIIntraCodec, carphone: torch.Tensor
) -> None:
    """CompressAI's rANS decoder reads past the end of damaged strings: flipping bit 0 of
    this frame's hyper-latent string segfaulted the process before pad_for_rans. Damaged
    strings must decode to some image, not kill the process."""
    frame = carphone[0]
    ints, (y_string, z_string) = unpack_fields(codec.encode(frame))
    flipped = bytes([z_string[0] ^ 1]) + z_string[1:]
    cases = [[y_string, flipped], [y_string, b""], [b"", z_string[:3]], [b"\xff" * 40] * 2]
    for damaged in cases:
        assert codec.decode(pack_fields(ints, damaged)).shape == frame.shape
