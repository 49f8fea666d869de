from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from plvc.errors import PLVCError
from plvc.losses import (
    TABLE1,
    GeneratorLossOptions,
    discriminator_loss,
    generator_loss,
    multi_p_loss,
    rate_weight,
    single_p_loss,
)

H, W = 16, 16  # 256 pixels: one 1-bit symbol = 1/256 bpp


def _likelihoods(bits_motion: int, bits_residual: int) -> dict[str, torch.Tensor]:
    """Likelihoods costing exactly the given number of bits (p = 1/2 per symbol)."""
    lik = {}
    for name, bits in (("motion", bits_motion), ("residual", bits_residual)):
        values = torch.ones(1, 1, 1, 256)
        values[..., :bits] = 0.5
        lik[name] = values
    return lik


def _clip_output(bits_per_frame: list[int], mse_per_frame: list[float]):
    torch.manual_seed(0)
    frames = torch.rand(1, len(bits_per_frame) + 1, 3, H, W) * 0.5 + 0.25
    x_hat = frames[:, 1:] + torch.tensor(mse_per_frame).sqrt().view(1, -1, 1, 1, 1)
    out = {
        "x_hat": x_hat.requires_grad_(),
        "likelihoods": [_likelihoods(b // 2, b - b // 2) for b in bits_per_frame],
    }
    return out, frames


def test_table1_and_option_presets() -> None:
    assert TABLE1["low"].rate_target == 0.025 and TABLE1["low"].lmbda == 256
    assert TABLE1["medium"].alpha1 == 1.0 and TABLE1["high"].alpha2 == 0.001
    paper = GeneratorLossOptions.paper("medium")
    assert (paper.rate_target, paper.alpha1, paper.alpha2) == (0.05, 1.0, 0.01)
    assert (paper.lmbda_prime, paper.beta, paper.lpips_weight) == (100, 0.1, 0.0)
    assert paper.rate_target_mode == "per_frame"
    official = GeneratorLossOptions.official("high")
    assert official.lpips_weight == 1.0 and official.rate_target_mode == "clip_sum"
    with pytest.raises(PLVCError, match="quality"):
        GeneratorLossOptions.paper("ultra")
    with pytest.raises(PLVCError, match="rate_target_mode"):
        GeneratorLossOptions(0.1, 1, 0.1, rate_target_mode="mean")


@pytest.mark.parametrize(
    ("rate", "expected_alpha", "active"),
    [
        (0.05, 1.0, True),
        (0.0500001, 1.0, True),
        (0.0499999, 0.01, False),
        (0.2, 1.0, True),
        (0.0, 0.01, False),
    ],
)
def test_rate_weight_switches_at_the_target(
    rate: float, expected_alpha: float, active: bool
) -> None:
    alpha, is_active = rate_weight(torch.tensor(rate), 0.05, alpha1=1.0, alpha2=0.01)
    assert alpha.item() == pytest.approx(expected_alpha)
    assert bool(is_active) is active


def test_generator_loss_picks_alpha_per_frame() -> None:
    # R_T = 0.0625 bpp = 16 bits on 256 pixels: frames at, above and below the target
    out, frames = _clip_output([16, 40, 8], [0.01, 0.02, 0.03])
    options = GeneratorLossOptions(
        rate_target=0.0625, alpha1=3.0, alpha2=0.01, lmbda_prime=100, beta=0.1
    )
    fake_logits = [torch.full((1, 1, 2, 2), v) for v in (0.0, 2.0, -2.0)]
    result = generator_loss(out, frames, fake_logits, options)
    assert result["alpha1_active_per_frame"].tolist() == [True, True, False]
    torch.testing.assert_close(result["alpha_per_frame"], torch.tensor([3.0, 3.0, 0.01]))
    rates = torch.tensor([16, 40, 8]) / 256
    torch.testing.assert_close(result["rate_bpp_per_frame"], rates)
    torch.testing.assert_close(result["mse_per_frame"], torch.tensor([0.01, 0.02, 0.03]))
    adversarial = torch.tensor(
        [-math.log(torch.sigmoid(torch.tensor(v)).item()) for v in (0.0, 2.0, -2.0)]
    )
    expected = (
        (torch.tensor([3.0, 3.0, 0.01]) * rates).sum()
        + 100 * torch.tensor([0.01, 0.02, 0.03]).sum()
        + 0.1 * adversarial.sum()
    )
    torch.testing.assert_close(result["loss"], expected)
    assert result["alpha1_active"].item() == pytest.approx(2 / 3)
    result["loss"].backward()
    assert out["x_hat"].grad is not None


def test_generator_loss_official_variant_sums_rate_and_adds_lpips() -> None:
    # every frame is below R_T on its own, but the clip's summed rate is above it
    out, frames = _clip_output([8, 8, 8], [0.01, 0.01, 0.01])
    options = GeneratorLossOptions(0.0625, 3.0, 0.01, lpips_weight=1.0, rate_target_mode="clip_sum")
    logits = [torch.zeros(1, 1, 2, 2)] * 3
    calls = []

    def fake_lpips(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(a.shape)
        return (a - b).abs().mean(dim=(1, 2, 3))

    result = generator_loss(out, frames, logits, options, lpips_fn=fake_lpips)
    assert result["alpha1_active_per_frame"].tolist() == [True, True, True]
    assert len(calls) == 3 and calls[0] == (1, 3, H, W)
    torch.testing.assert_close(result["lpips_per_frame"], torch.full((3,), 0.1))
    assert "lpips_term" in result
    paper = generator_loss(out, frames, logits, GeneratorLossOptions(0.0625, 3.0, 0.01))
    assert paper["alpha1_active_per_frame"].tolist() == [False, False, False]
    with pytest.raises(PLVCError, match="lpips_fn"):
        generator_loss(out, frames, logits, options)
    with pytest.raises(PLVCError, match="discriminator outputs"):
        generator_loss(out, frames, logits[:2], options, lpips_fn=fake_lpips)


def test_discriminator_loss_is_the_non_saturating_gan_loss() -> None:
    real = [torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5]])]
    fake = [torch.tensor([[-3.0, 1.0]]), torch.tensor([[0.0]])]
    result = discriminator_loss(real, fake)

    def nll(p: torch.Tensor) -> torch.Tensor:
        return -torch.log(p).mean()

    expected = sum(
        nll(torch.sigmoid(r)) + nll(1 - torch.sigmoid(f)) for r, f in zip(real, fake, strict=True)
    )
    torch.testing.assert_close(result["loss"], expected)
    assert result["loss_per_frame"].shape == (2,)
    # logits far in the saturated range stay finite (logsigmoid, not log(sigmoid))
    extreme = discriminator_loss([torch.tensor([-200.0])], [torch.tensor([200.0])])
    assert torch.isfinite(extreme["loss"]) and extreme["loss"].item() == pytest.approx(400.0)
    with pytest.raises(PLVCError):
        discriminator_loss(real, fake[:1])


def test_rate_distortion_losses_eq4_and_eq5() -> None:
    out, frames = _clip_output([16, 32], [0.01, 0.04])
    result = multi_p_loss(out, frames, lmbda=256)
    expected = (16 + 32) / 256 + 256 * (0.01 + 0.04)
    assert result["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert result["psnr_per_frame"][0].item() == pytest.approx(20.0, rel=1e-4)
    assert set(result) >= {"rate_bpp_motion_per_frame", "rate_bpp_residual_per_frame"}
    single = single_p_loss(
        {"x_hat": out["x_hat"][:, 0], "likelihoods": out["likelihoods"][0]}, frames[:, 1], lmbda=256
    )
    assert single["loss"].item() == pytest.approx(16 / 256 + 256 * 0.01, rel=1e-5)
    assert F.mse_loss(out["x_hat"][:, 0], frames[:, 1]).item() == pytest.approx(0.01, rel=1e-4)
