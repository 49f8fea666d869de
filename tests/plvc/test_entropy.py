from __future__ import annotations

import math

import pytest
import torch
from compressai.entropy_models import GaussianConditional
from compressai.models.base import get_scale_table

from plvc.determinism import deterministic_coding
from plvc.entropy import (
    LatentEntropyModel,
    RecurrentProbabilityModel,
    bits_from_likelihoods,
    bpp,
    gaussian_indexes,
)


def _updated_model(channels: int = 6) -> LatentEntropyModel:
    torch.manual_seed(0)
    model = LatentEntropyModel(channels, rpm_channels=8, rpm_depth=2).eval()
    model.bottleneck.update(force=True)
    model.gaussian.update_scale_table(get_scale_table(), force=True)
    return model


def test_rpm_predicts_mean_and_positive_scale_per_element() -> None:
    torch.manual_seed(0)
    rpm = RecurrentProbabilityModel(6, channels=8, depth=3)
    prev = torch.randn(2, 6, 4, 5)
    means, scales, state = rpm(prev, None)
    assert means.shape == scales.shape == (2, 6, 4, 5)
    assert torch.all(scales > 0)
    means2, _, _ = rpm(prev, state)
    assert not torch.allclose(means, means2)  # the recurrent state matters


def test_training_adds_noise_and_evaluation_rounds_around_the_mean() -> None:
    model = _updated_model()
    y = torch.randn(1, 6, 4, 5) * 3
    prev = torch.randn(1, 6, 4, 5)
    model.train()
    y_noisy, lik, state = model(y, prev, None)
    assert torch.all((y_noisy - y).abs() <= 0.5) and not torch.equal(y_noisy, y)
    assert torch.all((lik > 0) & (lik <= 1)) and state is not None
    model.eval()
    means, _, _ = model.rpm(prev, None)
    y_hat, _, _ = model(y, prev, None)
    torch.testing.assert_close(y_hat, torch.round(y - means) + means)
    y_first, _, first_state = model(y, None, None)
    medians = model.bottleneck._get_medians().reshape(1, -1, 1, 1)
    torch.testing.assert_close(y_first, torch.round(y - medians) + medians)
    assert first_state is None


def test_ste_quantizer_rounds_forward_and_passes_gradients() -> None:
    model = _updated_model().train()
    y = (torch.randn(1, 6, 4, 5) * 3).requires_grad_()
    prev = torch.randn(1, 6, 4, 5)
    y_hat, _, _ = model(y, prev, None, quantizer="ste")
    means, _, _ = model.rpm(prev, None)
    torch.testing.assert_close(y_hat, torch.round(y - means) + means)
    (grad,) = torch.autograd.grad(y_hat.sum(), y)
    assert torch.all(grad == 1)
    with pytest.raises(ValueError, match="quantizer"):
        model(y, prev, None, quantizer="round")


def test_gaussian_indexes_match_compressai() -> None:
    conditional = GaussianConditional(None)
    conditional.update_scale_table(get_scale_table())
    scales = torch.cat([torch.rand(1000) * 300, get_scale_table(), torch.tensor([0.0, 0.05])])
    expected = conditional.build_indexes(scales.view(1, 1, 1, -1))
    assert torch.equal(gaussian_indexes(conditional, scales.view(1, 1, 1, -1)), expected)


@pytest.mark.parametrize("first_frame", [True, False])
def test_compress_decompress_round_trip(first_frame: bool) -> None:
    model = _updated_model()
    torch.manual_seed(1)
    y = torch.randn(1, 6, 5, 7) * 4
    prev = None if first_frame else torch.randn(1, 6, 5, 7)
    with deterministic_coding():
        string, y_hat, state = model.compress(y, prev, None)
        decoded, dec_state = model.decompress(string, (5, 7), prev, None)
    assert isinstance(string, bytes) and len(string) > 0
    assert torch.equal(decoded, y_hat)
    assert torch.all((y_hat - y).abs() <= 0.5 + 1e-5)
    if first_frame:
        assert state is None and dec_state is None
    else:
        assert state is not None and dec_state is not None
        assert torch.equal(state[0], dec_state[0]) and torch.equal(state[1], dec_state[1])


def test_decompress_rejects_a_latent_size_that_does_not_fit_the_prior() -> None:
    model = _updated_model()
    prev = torch.randn(1, 6, 5, 7)
    with deterministic_coding():
        string, _, _ = model.compress(torch.randn(1, 6, 5, 7), prev, None)
        with pytest.raises(ValueError, match="does not match"):
            model.decompress(string, (4, 7), prev, None)


def test_deterministic_coding_restores_threads() -> None:
    torch.set_num_threads(1)
    with deterministic_coding(num_threads=1) as device:
        assert device.type == "cpu"
        assert not torch.is_grad_enabled()
    assert torch.get_num_threads() == 1 and torch.is_grad_enabled()


def test_bits_and_bpp_from_likelihoods() -> None:
    halves = torch.full((2, 4, 3, 3), 0.5)  # 72 symbols of exactly 1 bit
    quarters = torch.full((2, 4, 3, 3), 0.25)  # 72 symbols of 2 bits
    assert bits_from_likelihoods(halves).item() == pytest.approx(72.0)
    both = {"motion": halves, "residual": quarters}
    assert bits_from_likelihoods(both).item() == pytest.approx(216.0)
    assert bits_from_likelihoods([both, both]).item() == pytest.approx(432.0)
    assert bpp(both, num_pixels=2 * 48 * 48).item() == pytest.approx(216 / (2 * 48 * 48))
    assert math.isfinite(bits_from_likelihoods(torch.full((3,), 1e-9)).item())
    with pytest.raises(TypeError):
        bits_from_likelihoods(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        bpp(halves, 0)
