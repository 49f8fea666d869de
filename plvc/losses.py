"""Training losses of PLVC (paper eqs. 4-6, Table 1).

- :func:`single_p_loss`, eq. 4: ``R(y_1) + λ·MSE(x̂_1, x_1)`` (warm-up on the first P-frame);
- :func:`multi_p_loss`, eq. 5: ``Σ_i R(y_i) + λ·MSE(x̂_i, x_i)``;
- :func:`discriminator_loss` / :func:`generator_loss`, eq. 6 (non-saturating GAN):
  ``L_D = Σ_i −log(1 − D(fake_i)) − log D(real_i)`` and
  ``L_G = Σ_i α·R(y_i) + λ'·MSE_i − β·log D(fake_i)``, with ``α = α1`` when
  ``R(y_i) ≥ R_T`` and ``α2`` below (rate-target switching, Table 1).

Rates are in bits per pixel (batch mean), distortion is MSE on [0, 1] images, and D
returns logits: ``log D = logsigmoid(logit)`` and ``log(1 − D) = logsigmoid(−logit)``.

The official release differs from the paper in two ways, both available through
:class:`GeneratorLossOptions` (the paper's choice is the default): it adds an
LPIPS(alex) term with weight 1, and it switches α on the rate *summed over the clip's
P-frames* against R_T (``rate_target_mode="clip_sum"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from plvc.entropy import bpp
from plvc.errors import PLVCError
from plvc.flow import PyramidFlow, warp

__all__ = [
    "RATE_TARGET_MODES",
    "TABLE1",
    "GeneratorLossOptions",
    "LPIPSFn",
    "QualityHyperparameters",
    "discriminator_loss",
    "flow_warp_loss",
    "frame_rates",
    "generator_loss",
    "mse_per_frame",
    "multi_p_loss",
    "psnr_from_mse",
    "rate_weight",
    "single_p_loss",
]

LPIPSFn = Callable[[Tensor, Tensor], Tensor]
"""``lpips_fn(x_hat, x)`` on [0, 1] images ``[B, 3, H, W]``; any shape out, averaged. With
the ``lpips`` package: ``lambda a, b: model(a, b, normalize=True)``."""

RATE_TARGET_MODES = ("per_frame", "clip_sum")


@dataclass(frozen=True)
class QualityHyperparameters:
    """One row of Table 1."""

    rate_target: float
    lmbda: float
    alpha1: float
    alpha2: float
    lmbda_prime: float
    beta: float


TABLE1: dict[str, QualityHyperparameters] = {
    "low": QualityHyperparameters(0.025, 256, 3.0, 0.010, 100, 0.1),
    "medium": QualityHyperparameters(0.050, 512, 1.0, 0.010, 100, 0.1),
    "high": QualityHyperparameters(0.100, 1024, 0.3, 0.001, 100, 0.1),
}


@dataclass(frozen=True)
class GeneratorLossOptions:
    """Weights of eq. 6's generator loss; :meth:`paper` / :meth:`official` use Table 1."""

    rate_target: float
    alpha1: float
    alpha2: float
    lmbda_prime: float = 100.0
    beta: float = 0.1
    lpips_weight: float = 0.0
    rate_target_mode: str = "per_frame"

    def __post_init__(self) -> None:
        if self.rate_target_mode not in RATE_TARGET_MODES:
            raise PLVCError(
                f"rate_target_mode must be one of {RATE_TARGET_MODES}, "
                f"got {self.rate_target_mode!r}"
            )
        for name in ("rate_target", "alpha1", "alpha2", "lmbda_prime", "beta", "lpips_weight"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise PLVCError(f"GeneratorLossOptions.{name} must be >= 0, got {value!r}")

    @classmethod
    def paper(cls, quality: str) -> GeneratorLossOptions:
        """Eq. 6 with Table 1's values for ``quality`` (low / medium / high)."""
        row = _table1(quality)
        return cls(row.rate_target, row.alpha1, row.alpha2, row.lmbda_prime, row.beta)

    @classmethod
    def official(cls, quality: str) -> GeneratorLossOptions:
        """The authors' code: + LPIPS (weight 1), α switched on the clip's summed rate."""
        row = _table1(quality)
        return cls(
            row.rate_target,
            row.alpha1,
            row.alpha2,
            row.lmbda_prime,
            row.beta,
            lpips_weight=1.0,
            rate_target_mode="clip_sum",
        )


def _table1(quality: str) -> QualityHyperparameters:
    try:
        return TABLE1[quality]
    except KeyError:
        raise PLVCError(f"unknown quality {quality!r}; Table 1 has {', '.join(TABLE1)}") from None


# -- terms -----------------------------------------------------------------------------------


def frame_rates(likelihoods: Sequence[Mapping[str, Tensor]], num_pixels: int) -> dict[str, Tensor]:
    """Per-P-frame bpp ``[P]``: ``"total"`` and one entry per latent (``"motion"``, ...)."""
    if not likelihoods:
        raise PLVCError("no P-frame likelihoods given")
    out: dict[str, list[Tensor]] = {"total": []}
    for frame in likelihoods:
        out["total"].append(bpp(frame, num_pixels))
        for name, lik in frame.items():
            out.setdefault(name, []).append(bpp(lik, num_pixels))
    return {name: torch.stack(values) for name, values in out.items()}


def mse_per_frame(x_hat: Tensor, x: Tensor) -> Tensor:
    """MSE of each P-frame ``[P]`` for clips ``[B, P, 3, H, W]`` (mean over batch and pixels)."""
    if x_hat.shape != x.shape or x.dim() != 5:
        raise PLVCError(
            f"reconstruction {tuple(x_hat.shape)} and target {tuple(x.shape)} must both be "
            "[B, P, 3, H, W]"
        )
    return (x_hat.float() - x.float()).pow(2).mean(dim=(0, 2, 3, 4))


def psnr_from_mse(mse: Tensor) -> Tensor:
    """PSNR in dB of [0, 1] images (for logging; detached)."""
    return -10.0 * torch.log10(mse.detach().clamp_min(1e-12))


def rate_weight(
    rate: Tensor, rate_target: float, alpha1: float, alpha2: float
) -> tuple[Tensor, Tensor]:
    """Table 1's switch: ``(α, α1_active)`` with α = α1 where ``rate >= rate_target``, else α2.

    The decision is taken on the detached rate (it selects a weight, it is not a loss).
    """
    active = rate.detach() >= rate_target
    alpha = torch.where(active, torch.full_like(rate, alpha1), torch.full_like(rate, alpha2))
    return alpha.detach(), active


def _clip_terms(out: Mapping[str, Any], frames: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    if frames.dim() != 5:
        raise PLVCError(f"frames must be [B, T, 3, H, W], got {tuple(frames.shape)}")
    x_hat = out["x_hat"]
    targets = frames[:, 1:]
    b, _, _, h, w = targets.shape
    rates = frame_rates(out["likelihoods"], b * h * w)
    return rates, mse_per_frame(x_hat, targets)


def _rd_dict(rates: Mapping[str, Tensor], mse: Tensor, loss: Tensor) -> dict[str, Tensor]:
    out = {
        "loss": loss,
        "rate_bpp": rates["total"].mean().detach(),
        "mse": mse.mean().detach(),
        "psnr": psnr_from_mse(mse).mean(),
        "rate_bpp_per_frame": rates["total"].detach(),
        "mse_per_frame": mse.detach(),
        "psnr_per_frame": psnr_from_mse(mse),
    }
    for name, values in rates.items():
        if name != "total":
            out[f"rate_bpp_{name}_per_frame"] = values.detach()
    return out


def single_p_loss(out: Mapping[str, Any], x: Tensor, lmbda: float) -> dict[str, Tensor]:
    """Eq. 4 for one P-frame: ``out`` from :meth:`PLVC.forward_pframe`, ``x`` its target."""
    if out["x_hat"].shape != x.shape:
        raise PLVCError(f"x_hat {tuple(out['x_hat'].shape)} and x {tuple(x.shape)} differ")
    b, _, h, w = x.shape
    rates = frame_rates([out["likelihoods"]], b * h * w)
    mse = mse_per_frame(out["x_hat"].unsqueeze(1), x.unsqueeze(1))
    loss = rates["total"].sum() + lmbda * mse.sum()
    return _rd_dict(rates, mse, loss)


def multi_p_loss(out: Mapping[str, Any], frames: Tensor, lmbda: float) -> dict[str, Tensor]:
    """Eq. 5 over a clip: ``out`` from :meth:`PLVC.forward`, ``frames`` [B, T, 3, H, W]
    with the I-frame at index 0 (its rate is not G's)."""
    rates, mse = _clip_terms(out, frames)
    loss = rates["total"].sum() + lmbda * mse.sum()
    return _rd_dict(rates, mse, loss)


def discriminator_loss(
    real_logits: Sequence[Tensor], fake_logits: Sequence[Tensor]
) -> dict[str, Tensor]:
    """Eq. 6, L_D = Σ_i mean(−log D(real_i)) + mean(−log(1 − D(fake_i))) (means over patches
    and batch). Pass the fake logits of *detached* reconstructions."""
    if len(real_logits) != len(fake_logits) or not real_logits:
        raise PLVCError("need as many real as fake logits, at least one P-frame")
    real = torch.stack([F.softplus(-r.float()).mean() for r in real_logits])
    fake = torch.stack([F.softplus(f.float()).mean() for f in fake_logits])
    per_frame = real + fake
    return {
        "loss": per_frame.sum(),
        "loss_per_frame": per_frame.detach(),
        "real_term_per_frame": real.detach(),
        "fake_term_per_frame": fake.detach(),
        "d_real": torch.stack([torch.sigmoid(r.detach().float()).mean() for r in real_logits]),
        "d_fake": torch.stack([torch.sigmoid(f.detach().float()).mean() for f in fake_logits]),
    }


def generator_loss(
    out: Mapping[str, Any],
    frames: Tensor,
    fake_logits: Sequence[Tensor],
    options: GeneratorLossOptions,
    lpips_fn: LPIPSFn | None = None,
) -> dict[str, Tensor]:
    """Eq. 6, L_G = Σ_i α_i·R(y_i) + λ'·MSE_i − β·log D(fake_i) [+ w·LPIPS_i].

    ``out`` from :meth:`PLVC.forward`, ``frames`` [B, T, 3, H, W] (I-frame at 0),
    ``fake_logits`` per P-frame from D. Returns the total ``"loss"``, its weighted parts
    (``rate_term``, ``distortion_term``, ``adversarial_term``, ``lpips_term``) and per-frame
    values including ``alpha_per_frame`` and ``alpha1_active_per_frame``.
    """
    rates, mse = _clip_terms(out, frames)
    num_p = mse.shape[0]
    if len(fake_logits) != num_p:
        raise PLVCError(f"{num_p} P-frames but {len(fake_logits)} discriminator outputs")
    if options.rate_target_mode == "per_frame":
        alpha, active = rate_weight(
            rates["total"], options.rate_target, options.alpha1, options.alpha2
        )
    else:
        clip_alpha, clip_active = rate_weight(
            rates["total"].sum(), options.rate_target, options.alpha1, options.alpha2
        )
        alpha, active = clip_alpha.expand(num_p), clip_active.expand(num_p)
    adversarial = torch.stack([F.softplus(-f.float()).mean() for f in fake_logits])

    rate_term = (alpha * rates["total"]).sum()
    distortion_term = options.lmbda_prime * mse.sum()
    adversarial_term = options.beta * adversarial.sum()
    loss = rate_term + distortion_term + adversarial_term
    result = _rd_dict(rates, mse, loss)

    lpips_values = None
    if options.lpips_weight > 0:
        if lpips_fn is None:
            raise PLVCError("lpips_weight > 0 needs an lpips_fn (e.g. an lpips.LPIPS model)")
        x_hat, targets = out["x_hat"], frames[:, 1:]
        lpips_values = torch.stack(
            [lpips_fn(x_hat[:, i], targets[:, i]).float().mean() for i in range(num_p)]
        )
        lpips_term = options.lpips_weight * lpips_values.sum()
        result["loss"] = loss + lpips_term
        result["lpips_term"] = lpips_term.detach()
        result["lpips_per_frame"] = lpips_values.detach()

    result.update(
        rate_term=rate_term.detach(),
        distortion_term=distortion_term.detach(),
        adversarial_term=adversarial_term.detach(),
        adversarial_per_frame=adversarial.detach(),
        alpha_per_frame=alpha.detach(),
        alpha1_active_per_frame=active,
        alpha1_active=active.float().mean(),
    )
    return result


def flow_warp_loss(flow_net: PyramidFlow, ref: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Σ over pyramid levels of MSE(warp(ref_l, flow_l), target_l): the official code's
    self-supervised loss for training the flow network alone (``motion.loss``)."""
    flows = flow_net.forward_pyramid(ref, target)
    refs, targets = flow_net.pyramid(ref), flow_net.pyramid(target)
    h, w = ref.shape[-2:]
    per_level = []
    for level, flow in enumerate(flows):
        r, t = refs[level], targets[level]
        if level == len(flows) - 1:
            r, t = r[..., :h, :w], t[..., :h, :w]
        per_level.append((warp(r, flow) - t).float().pow(2).mean())
    levels = torch.stack(per_level)
    return {"loss": levels.sum(), "mse_per_level": levels.detach()}
