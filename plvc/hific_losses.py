"""HiFiC training losses (Mentzer et al., "High-Fidelity Generative Image Compression",
NeurIPS 2020).

Encoder/generator objective L_EG::

    L_EG = λ' r(y) + k_M MSE(x, x̂) + k_P LPIPS(x, x̂) − β log D(x̂, ŷ)
    λ'   = λ_a if r(y) > r_t else λ_b                        (λ_a > λ_b)

Discriminator objective L_D (non-saturating): ``L_D = −log(1 − D(x̂, ŷ)) − log D(x, ŷ)``.

Units follow the authors' release (``models/hific/model.py``): r in bits per pixel,
MSE on the [0, 255] scale, LPIPS on images mapped to [-1, 1] by the caller's LPIPS.
The release decides the switch on the *quantised* rate estimate and applies the weight to
the noisy one. For the first 50k steps it doubles the λ that divides the rate (so the rate
weight is halved) and raises the target by 0.20/0.14; these warm-up schedules apply when
a ``step`` is passed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "HIFIC_OPERATING_POINTS",
    "HiFiCLossWeights",
    "LPIPSFn",
    "bits_per_pixel",
    "discriminator_loss",
    "generator_adversarial_loss",
    "hific_generator_loss",
]

LPIPSFn = Callable[[Tensor, Tensor], Tensor]
"""``lpips_fn(x_hat, x)`` on images in [0, 1] -> distances (any shape; the mean is used),
e.g. ``lambda a, b: lpips.LPIPS(net="alex")(a, b, normalize=True)``."""

_K_M = 0.075 * 2**-5  # release: C * CD = 0.1 * 2**-5 * 0.75
_COMMON: dict[str, float | int] = {
    "lambda_b": 2**-4,
    "k_m": _K_M,
    "k_p": 1.0,
    "beta": 0.15,
    "warmup_steps": 50_000,
    "warmup_rate_factor": 0.5,
    "warmup_target_factor": 0.20 / 0.14,
}

# The paper's hyper-parameters (and the authors' release): r_t 0.14 / 0.30 / 0.45 bpp with
# λ_a = 2^1 / 2^0 / 2^-1 and λ_b = 2^-4; k_M = 0.075·2^-5, k_P = 1, β = 0.15.
# They reached 0.129 / 0.250 / 0.374 bpp on CLIC2020 (the rate settles below r_t).
HIFIC_OPERATING_POINTS: dict[str, dict[str, float | int]] = {
    "low": {"target_bpp": 0.14, "lambda_a": 2.0**1, **_COMMON},
    "medium": {"target_bpp": 0.30, "lambda_a": 2.0**0, **_COMMON},
    "high": {"target_bpp": 0.45, "lambda_a": 2.0**-1, **_COMMON},
}


@dataclass(frozen=True)
class HiFiCLossWeights:
    """Weights of :func:`hific_generator_loss`; see :data:`HIFIC_OPERATING_POINTS`."""

    target_bpp: float
    lambda_a: float
    lambda_b: float
    k_m: float = _K_M
    k_p: float = 1.0
    beta: float = 0.15
    warmup_steps: int = 50_000
    warmup_rate_factor: float = 0.5
    warmup_target_factor: float = 0.20 / 0.14

    def __post_init__(self) -> None:
        for name in ("target_bpp", "lambda_b", "warmup_rate_factor", "warmup_target_factor"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"HiFiC loss weight {name} must be > 0, got {value}")
        for name in ("k_m", "k_p", "beta", "warmup_steps"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"HiFiC loss weight {name} must be >= 0, got {value}")
        if not self.lambda_a > self.lambda_b:
            # the switch only pulls the rate down to r_t if exceeding it costs more
            raise ValueError(
                f"HiFiC needs lambda_a > lambda_b, got {self.lambda_a} <= {self.lambda_b}"
            )

    @classmethod
    def operating_point(cls, name: str) -> HiFiCLossWeights:
        """The published weights for ``"low"``, ``"medium"`` or ``"high"``."""
        try:
            return cls.from_dict(HIFIC_OPERATING_POINTS[name])
        except KeyError:
            raise ValueError(
                f"unknown HiFiC operating point {name!r}; "
                f"known: {', '.join(HIFIC_OPERATING_POINTS)}"
            ) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HiFiCLossWeights:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown HiFiC loss key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)

    def _warming_up(self, step: int | None) -> bool:
        return step is not None and step < self.warmup_steps

    def target_at(self, step: int | None = None) -> float:
        """r_t at a training step (raised during warm-up)."""
        return self.target_bpp * (self.warmup_target_factor if self._warming_up(step) else 1.0)

    def rate_weight(self, bpp_quantized: float, step: int | None = None) -> float:
        """λ' of L_EG: λ_a above the target rate, λ_b below (scaled during warm-up)."""
        weight = self.lambda_a if bpp_quantized > self.target_at(step) else self.lambda_b
        return weight * (self.warmup_rate_factor if self._warming_up(step) else 1.0)


def bits_per_pixel(likelihoods: Mapping[str, Tensor], num_pixels: int) -> dict[str, Tensor]:
    """Estimated bits per pixel of each latent (mean over the batch), from likelihoods."""
    out = {}
    for name, likelihood in likelihoods.items():
        bits = torch.log(likelihood.float()).sum() / -math.log(2)
        out[name] = bits / (likelihood.size(0) * num_pixels)
    return out


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating G loss ``−log D(x̂)``, mean over patches."""
    return F.softplus(-fake_logits.float()).mean()


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> dict[str, Tensor]:
    """Non-saturating D loss L_D: ``−log D(x) − log(1 − D(x̂))``, means over patches.

    Returns ``loss``, its two halves ``real`` and ``fake``, and the mean probabilities
    ``d_real``/``d_fake`` D assigns (for logging).
    """
    real = F.softplus(-real_logits.float()).mean()
    fake = F.softplus(fake_logits.float()).mean()
    return {
        "loss": real + fake,
        "real": real,
        "fake": fake,
        "d_real": torch.sigmoid(real_logits.detach().float()).mean(),
        "d_fake": torch.sigmoid(fake_logits.detach().float()).mean(),
    }


def hific_generator_loss(
    output: Mapping[str, Any],
    target: Tensor,
    weights: HiFiCLossWeights,
    *,
    lpips_fn: LPIPSFn | None = None,
    fake_logits: Tensor | None = None,
    step: int | None = None,
) -> dict[str, Tensor]:
    """Encoder/generator loss L_EG on a :meth:`plvc.hific.HiFiC.forward` output.

    ``lpips_fn`` is required when ``weights.k_p > 0`` (this module loads no weights).
    Without ``fake_logits`` the GAN term is left out: that is HiFiC's first stage, the
    "MSE+LPIPS" model the GAN stage starts from. Returns the total ``loss`` and every
    term, raw and weighted.
    """
    x_hat = output["x_hat"]
    num_pixels = target.size(-2) * target.size(-1)
    bpp_parts = bits_per_pixel(output["likelihoods"], num_pixels)
    bpp = sum(bpp_parts.values())
    quantized = output.get("likelihoods_quantized", output["likelihoods"])
    with torch.no_grad():
        bpp_quantized = sum(bits_per_pixel(quantized, num_pixels).values())
    rate_weight = weights.rate_weight(float(bpp_quantized), step)

    mse = F.mse_loss(x_hat.float() * 255.0, target.float() * 255.0)
    zero = mse.new_zeros(())
    if weights.k_p > 0:
        if lpips_fn is None:
            raise ValueError("HiFiC loss has k_p > 0 but no lpips_fn: pass one, or set k_p=0")
        lpips_value = lpips_fn(x_hat, target).float().mean()
    else:
        lpips_value = zero
    gan = generator_adversarial_loss(fake_logits) if fake_logits is not None else zero

    terms = {
        "weighted_rate": rate_weight * bpp,
        "weighted_mse": weights.k_m * mse,
        "weighted_lpips": weights.k_p * lpips_value,
        "weighted_gan": weights.beta * gan,
    }
    return {
        "loss": sum(terms.values()),
        **terms,
        "bpp": bpp,
        **{f"bpp_{name}": value for name, value in bpp_parts.items()},
        "bpp_quantized": bpp_quantized,
        "rate_weight": torch.tensor(rate_weight),
        "target_bpp": torch.tensor(weights.target_at(step)),
        "mse": mse,
        "lpips": lpips_value,
        "gan": gan,
    }
