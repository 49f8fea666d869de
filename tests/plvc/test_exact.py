"""The exact entropy parameters (:mod:`plvc.exact`): the float RPM's values, from
operations every machine computes alike."""

from __future__ import annotations

import math

import torch

from plvc.entropy import RecurrentProbabilityModel, gaussian_indexes
from plvc.exact import exact_entropy_parameters, exact_exp, exact_sigmoid, exact_tanh
from plvc.generator import PLVC, PLVCConfig


def test_exact_functions_match_libm() -> None:
    x = torch.linspace(-40, 40, 20001, dtype=torch.float64)
    assert float(((exact_exp(x) - torch.exp(x)) / torch.exp(x)).abs().max()) < 1e-13
    assert float((exact_sigmoid(x) - torch.sigmoid(x)).abs().max()) < 1e-14
    assert float((exact_tanh(x) - torch.tanh(x)).abs().max()) < 1e-13
    # inputs beyond float64's range are clamped, not turned into inf or nan
    huge = exact_exp(torch.tensor([1e6, -1e6], dtype=torch.float64))
    assert math.isfinite(float(huge[0])) and float(huge[0]) > 1e300 and float(huge[1]) < 1e-300


def test_exact_rpm_gives_the_float_rpm_means_and_indexes() -> None:
    """The paper-width RPM over three recurrent steps: means within 1e-6 of the float32
    RPM's and the same CDF index almost everywhere, so coding with it costs no rate."""
    torch.manual_seed(0)
    model = PLVC(PLVCConfig.paper()).eval()
    model.update(force=True)
    entropy = model.motion_entropy
    assert isinstance(entropy.rpm, RecurrentProbabilityModel)
    latent = torch.round(torch.randn(1, 128, 8, 12) * 4)
    exact_state, float_state = None, None
    for _ in range(3):
        means, indexes, exact_state = exact_entropy_parameters(
            entropy.rpm, entropy.gaussian.scale_table, latent, exact_state
        )
        with torch.no_grad():
            float_means, scales, float_state = entropy.rpm(latent, float_state)
        assert means.dtype == torch.float32 and indexes.dtype == torch.int32
        assert float((means - float_means).abs().max()) < 1e-6
        same = (indexes == gaussian_indexes(entropy.gaussian, scales)).float().mean()
        assert float(same) > 0.999
        latent = torch.round(torch.randn_like(latent) * 4) + means
    # the recurrent state follows the float one too
    assert float((exact_state[1] - float_state[1]).abs().max()) < 1e-6
