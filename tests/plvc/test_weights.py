"""Weights files: exact round trip, plain content, clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plvc.codec import model_fingerprint
from plvc.errors import WeightsError
from plvc.generator import PLVC, PLVCConfig
from plvc.weights import WEIGHTS_FORMAT, WEIGHTS_VERSION, load_weights, save_weights

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
        ({"version": 99}, "weights format version 99, this build reads 1"),
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
