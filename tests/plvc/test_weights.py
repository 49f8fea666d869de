"""Weights files: exact round trip, plain content, clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plvc.codec import model_fingerprint
from plvc.errors import WeightsError
from plvc.generator import PLVC, PLVCConfig
from plvc.weights import (
    WEIGHTS_FORMAT,
    WEIGHTS_VERSION,
    load_codec,
    load_weights,
    save_weights,
)

INTRA = {"architecture": "bmshj2018-hyperprior", "quality": 1, "allow_random_init": True}


@pytest.fixture()
def saved(tmp_path: Path, tiny_model: PLVC) -> Path:
    path = tmp_path / "weights.pt"
    save_weights(
        path,
        tiny_model,
        intra_name="compressai",
        intra_config=INTRA,
        quality="medium",
        extra={"lambda": 512, "step": 1000, "phases": ["single_p", "multi_p"]},
    )
    return path


def test_round_trip_restores_model_and_metadata(saved: Path, tiny_model: PLVC) -> None:
    model, meta = load_weights(saved)
    assert not model.training
    assert meta.config == PLVCConfig.tiny()
    assert (meta.intra_name, meta.intra_config, meta.quality) == ("compressai", INTRA, "medium")
    assert meta.extra == {"lambda": 512, "step": 1000, "phases": ["single_p", "multi_p"]}
    expected = tiny_model.state_dict()
    loaded = model.state_dict()
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)
    assert model_fingerprint(model) == model_fingerprint(tiny_model)


def test_saved_after_update_so_it_can_code_at_once(saved: Path) -> None:
    model, _ = load_weights(saved)
    assert model.motion_entropy.is_updated() and model.residual_entropy.is_updated()
    x = torch.rand(1, 3, 32, 32)
    strings, _, x_hat, _ = model.compress_pframe(x, torch.rand_like(x), None)
    assert len(strings) == 2 and x_hat.shape == x.shape


def test_content_is_plain_and_weights_only_loadable(saved: Path) -> None:
    payload = torch.load(saved, weights_only=True)
    assert payload["format"] == WEIGHTS_FORMAT and payload["version"] == WEIGHTS_VERSION
    assert set(payload) == {
        "format",
        "version",
        "config",
        "state_dict",
        "fingerprint",
        "intra",
        "quality",
        "extra",
    }
    assert all(t.device.type == "cpu" for t in payload["state_dict"].values())


def test_no_temporary_file_is_left(saved: Path) -> None:
    assert [p.name for p in saved.parent.iterdir()] == ["weights.pt"]


def test_extra_must_be_plain(tmp_path: Path, tiny_model: PLVC) -> None:
    with pytest.raises(WeightsError, match=r"extra\.when is a PosixPath"):
        save_weights(
            tmp_path / "w.pt",
            tiny_model,
            intra_name="compressai",
            intra_config=INTRA,
            quality="low",
            extra={"when": Path("/tmp")},
        )
    with pytest.raises(WeightsError, match="JSON-serialisable"):
        save_weights(
            tmp_path / "w.pt", tiny_model, intra_name="x", intra_config={"p": {1, 2}}, quality=""
        )
    assert not (tmp_path / "w.pt").exists()


def _tamper(path: Path, **changes: object) -> None:
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "something-else"}, "not a PLVC weights file"),
        ({"version": 99}, "weights format version 99, this build reads 1, 2"),
        ({"config": {"channels": 16, "colour": 1}}, r"invalid model config: .*colour"),
        ({"config": {**PLVCConfig.tiny().to_dict(), "channels": 32}}, "does not fit the model"),
        ({"intra": {"name": 3}}, "'intra' entry"),
        ({"quality": None}, "entry 'quality' has type NoneType"),
    ],
)
def test_tampered_files_are_rejected(saved: Path, change: dict[str, object], message: str) -> None:
    _tamper(saved, **change)
    with pytest.raises(WeightsError, match=rf"weights\.pt: .*{message}"):
        load_weights(saved)


def test_missing_corrupt_and_foreign_files(tmp_path: Path, saved: Path) -> None:
    with pytest.raises(WeightsError, match=r"absent\.pt: weights file not found"):
        load_weights(tmp_path / "absent.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(saved.read_bytes()[:5000])
    with pytest.raises(WeightsError, match=r"truncated\.pt: cannot read weights file"):
        load_weights(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.zeros(3)}, foreign)
    with pytest.raises(WeightsError, match=r"foreign\.pt: not a PLVC weights file"):
        load_weights(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": WEIGHTS_FORMAT, "obj": object()}, pickled)
    with pytest.raises(WeightsError, match=r"pickled\.pt: cannot read weights file"):
        load_weights(pickled)  # weights_only=True refuses arbitrary pickles


# --------------------------------------------------------------------------- codec bundles


@pytest.fixture()
def intra_file(tmp_path: Path) -> Path:
    """A CompressAI intra codec's weights file, as a trained one would be."""
    from plvc.intra import get_intra_codec

    source = get_intra_codec("compressai", quality=1, seed=3, allow_random_init=True)
    path = tmp_path / "intra_weights" / "intra.pt"
    path.parent.mkdir()
    torch.save(source.model.state_dict(), path)
    return path


def _bundle(tmp_path: Path, model: PLVC, intra_file: Path) -> Path:
    from plvc.weights import file_sha256

    path = tmp_path / "bundle.pt"
    config = {
        "architecture": "bmshj2018-hyperprior",
        "quality": 1,
        "weights": str(intra_file),
        "weights_sha256": file_sha256(intra_file),
    }
    save_weights(path, model, intra_name="compressai", intra_config=config, quality="low")
    return path


def test_bundle_embeds_the_intra_weights_and_names_no_file(
    tmp_path: Path, tiny_model: PLVC, intra_file: Path
) -> None:
    from plvc.weights import file_sha256

    bundle_path = _bundle(tmp_path, tiny_model, intra_file)
    digest = file_sha256(intra_file)
    payload = torch.load(bundle_path, weights_only=True)
    assert payload["intra"]["config"] == {
        "architecture": "bmshj2018-hyperprior",
        "quality": 1,
        "weights_sha256": digest,
    }
    assert payload["fingerprint"] == model_fingerprint(tiny_model).hex()
    from plvc.intra import get_intra_codec

    from_file = get_intra_codec("compressai", quality=1, weights=str(intra_file))
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    intra_file.unlink()  # the bundle alone must do
    bundle = load_codec(bundle_path)
    assert bundle.intra.config["weights_sha256"] == digest and "weights" not in bundle.intra.config
    # the embedded weights are the file's: the same image codes to the same bytes
    assert bundle.intra.encode(image) == from_file.encode(image)
    assert model_fingerprint(bundle.model) == model_fingerprint(tiny_model)


def test_bundle_refuses_the_wrong_or_damaged_intra_weights(
    tmp_path: Path, tiny_model: PLVC, intra_file: Path
) -> None:
    with pytest.raises(WeightsError, match=r"intra config says .*a different file"):
        save_weights(
            tmp_path / "x.pt",
            tiny_model,
            intra_name="compressai",
            intra_config={"weights": str(intra_file), "weights_sha256": "0" * 64},
            quality="low",
        )
    assert not (tmp_path / "x.pt").exists()
    bundle_path = _bundle(tmp_path, tiny_model, intra_file)
    payload = torch.load(bundle_path, weights_only=True)
    payload["intra"]["weights"][100] ^= 0xFF
    torch.save(payload, bundle_path)
    with pytest.raises(WeightsError, match=r"bundle\.pt: the embedded intra weights .* damaged"):
        load_codec(bundle_path)


def test_format_1_files_need_their_intra_weights_given_explicitly(
    tmp_path: Path, tiny_model: PLVC, intra_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A format-1 generator file named its intra weights by path: that path is never
    followed; the file is given explicitly, or ``plvc bundle`` converts the pair."""
    from plvc.cli import main
    from plvc.weights import file_sha256

    old = tmp_path / "old.pt"
    tiny_model.update(force=True)
    torch.save(
        {
            "format": WEIGHTS_FORMAT,
            "version": 1,
            "config": tiny_model.config.to_dict(),
            "state_dict": tiny_model.state_dict(),
            "intra": {
                "name": "compressai",
                "config": {
                    "architecture": "bmshj2018-hyperprior",
                    "quality": 1,
                    "weights": str(intra_file),
                    "weights_sha256": file_sha256(intra_file),
                },
            },
            "quality": "low",
            "extra": {},
        },
        old,
    )
    with pytest.raises(WeightsError, match=r"old\.pt: a format-1 weights file .*intra\.pt"):
        load_codec(old)
    explicit = load_codec(old, intra_weights=intra_file)
    assert explicit.intra.config["weights_sha256"] == file_sha256(intra_file)

    converted = tmp_path / "converted.pt"
    assert main(["bundle", str(old), "-o", str(converted)]) == 2
    assert "pass --intra-weights FILE" in capsys.readouterr().err
    assert main(["bundle", str(old), "--intra-weights", str(intra_file), "-o", str(converted)]) == 0
    assert "embedded weights" in capsys.readouterr().out
    intra_file.unlink()
    bundle = load_codec(converted)
    assert bundle.meta.version == WEIGHTS_VERSION
    assert model_fingerprint(bundle.model) == model_fingerprint(explicit.model)
    assert bundle.intra.config["weights_sha256"] == explicit.intra.config["weights_sha256"]
