"""The networks PLVC's phases train, as the runner sees them: the generator run over a whole
clip (:class:`ClipGenerator`, recurrent states carried frame to frame, eq. 3) and the
recurrent conditional discriminator over a clip (:class:`ClipDiscriminator`), their configs,
per-frame logging helpers and the discriminator's weights file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.images import temporal_profile, to_uint8_image
from pipeline.train.phase import (
    RunnerError,
)
from plvc.discriminator import DiscriminatorConfig, RecurrentConditionalDiscriminator
from plvc.generator import PLVC, PLVCConfig
from plvc.losses import (
    flow_warp_loss,
)

__all__ = [
    "DISCRIMINATOR_FORMAT",
    "WARMUP_STAGES",
    "ClipBatch",
    "ClipDiscriminator",
    "ClipGenerator",
    "clip_temporal_profiles",
    "discriminator_config",
    "load_discriminator",
    "model_config",
    "per_frame_scalars",
    "rpm_parameters",
]

#: the single-P warm-up's sub-phases in order (official code: flow, then MC, then all)
WARMUP_STAGES = ("flow", "mc", "full")


#: format tag of an exported ``discriminator.pt``
DISCRIMINATOR_FORMAT = "plvc-discriminator"


class ClipBatch(NamedTuple):
    """A prepared batch: ``frames`` [B, T, 3, h, w] (T = 1 + P-frames, index 0 = the
    original I-frame) and ``iframe`` [B, 3, h, w] (its decoded image), float in [0, 1]."""

    frames: Tensor
    iframe: Tensor


class ClipGenerator(nn.Module):
    """PLVC with a whole training step in ONE forward call, which is what DDP syncs.

    ``mode="clip"``: every P-frame of ``frames`` (eqs. 5-6). ``"flow"``, ``"mc"``,
    ``"full"``: the first P-frame only (eq. 4 and its warm-up sub-phases). Outputs hold
    with a graph only what that mode's loss uses (the rest is detached), so DDP's
    ``find_unused_parameters`` search from the outputs finds exactly the trained weights.
    The state dict is PLVC's under the prefix ``plvc.``.
    """

    def __init__(self, config: PLVCConfig) -> None:
        super().__init__()
        self.plvc = PLVC(config)

    def aux_loss(self) -> Tensor:
        """CompressAI's entropy-bottleneck quantile loss (the runner's aux optimizer)."""
        return self.plvc.aux_loss()

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        # through PLVC.load_state_dict, which resizes the CDF tables to the saved ones
        foreign = [k for k in state_dict if not k.startswith("plvc.")]
        if foreign and strict:
            raise RuntimeError(f"unexpected key(s) in ClipGenerator state dict: {foreign[:3]}")
        inner = {k.removeprefix("plvc."): v for k, v in state_dict.items() if k.startswith("plvc.")}
        return self.plvc.load_state_dict(inner, strict=strict, assign=assign)

    def forward(self, frames: Tensor, iframe: Tensor, mode: str = "clip") -> dict[str, Any]:
        if mode == "clip":
            out = self.plvc(frames, iframe)
            return {k: out[k] for k in ("x_hat", "likelihoods", "y", "flow")}
        if mode not in WARMUP_STAGES:
            raise ValueError(f"mode must be 'clip' or one of {WARMUP_STAGES}, got {mode!r}")
        x = frames[:, 1]
        out = self.plvc.forward_pframe(x, iframe, None)
        motion, residual = out["likelihoods"]["motion"], out["likelihoods"]["residual"]
        trained = {
            "flow": {"motion", "x_warp"},
            "mc": {"motion", "x_mc"},
            "full": {"motion", "residual", "x_hat"},
        }[mode]

        def keep(name: str, t: Tensor) -> Tensor:
            return t if name in trained else t.detach()

        result: dict[str, Any] = {
            "x_hat": keep("x_hat", out["x_hat"]).unsqueeze(1),
            "likelihoods": [{"motion": motion, "residual": keep("residual", residual)}],
            "x_warp": keep("x_warp", out["x_warp"]),
            "x_mc": keep("x_mc", out["x_mc"]),
        }
        if mode == "flow":
            # self-supervised pyramid loss of the flow network (official ``motion.loss``)
            result["flow_pyramid"] = flow_warp_loss(self.plvc.motion_estimation, iframe, x)
        return result


class ClipDiscriminator(nn.Module):
    """The recurrent conditional D over a whole clip in ONE forward call (one DDP sync):
    per P-frame one call on real and fake together, each with its own recurrent state
    (:meth:`RecurrentConditionalDiscriminator.forward_clip`). State dict under ``d.``."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.d = RecurrentConditionalDiscriminator(config)

    def forward(
        self,
        frames: Tensor,
        iframe: Tensor,
        x_hat: Tensor,
        flows: list[Tensor],
        ys: list[Tensor],
        fake_only: bool = False,
    ) -> dict[str, list[Tensor]]:
        return self.d.forward_clip(frames, iframe, x_hat, flows, ys, fake_only=fake_only)


def model_config(preset: str) -> PLVCConfig:
    """``train.model`` (tiny | paper) as a :class:`PLVCConfig`."""
    presets = {"tiny": PLVCConfig.tiny, "paper": PLVCConfig.paper}
    if preset not in presets:
        raise RunnerError(f"train.model must be one of {sorted(presets)}, got {preset!r}")
    return presets[preset]()


def discriminator_config(
    preset: str, generator: PLVCConfig, *, hidden_state: bool = True, motion_condition: bool = True
) -> DiscriminatorConfig:
    """``train.discriminator`` (tiny | paper) for ``generator``'s latents (2·M channels),
    with the ablation switches of ``train.gan``."""
    presets = {"tiny": DiscriminatorConfig.tiny, "paper": DiscriminatorConfig.paper}
    if preset not in presets:
        raise RunnerError(f"train.discriminator must be one of {sorted(presets)}, got {preset!r}")
    base = presets[preset](latent_channels=2 * generator.latent_channels)
    return dataclasses.replace(
        base, use_hidden_state=hidden_state, use_motion_condition=motion_condition
    )


def per_frame_scalars(terms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Loss dicts of :mod:`plvc.losses` → scalar terms the runner logs: ``x_per_frame``
    vectors become ``x/p1``, ``x/p2``, ... (booleans as 0/1); scalars stay as they are."""
    out: dict[str, Tensor] = {}
    for key, value in terms.items():
        if key.endswith("_per_frame"):
            base = key.removesuffix("_per_frame")
            for i, v in enumerate(value.detach().float().reshape(-1).unbind(0), start=1):
                out[f"{base}/p{i}"] = v
        else:
            out[key] = value if value.dtype.is_floating_point else value.float()
    return out


def clip_temporal_profiles(*clips: Tensor, row: int | None = None, scale: int = 6) -> np.ndarray:
    """Temporal profiles (paper Figs. 1, 6) of clips ``[T, 3, H, W]`` in [0, 1], one block
    per clip, top to bottom (:func:`pipeline.images.temporal_profile` of each). Flicker shows
    as horizontal streaks."""
    if not clips:
        raise ValueError("clip_temporal_profiles needs at least one clip")
    blocks = []
    for clip in clips:
        if clip.dim() != 4 or clip.shape[1] != 3 or clip.shape[1:] != clips[0].shape[1:]:
            raise ValueError(f"clips must be [T, 3, H, W] of one size, got {tuple(clip.shape)}")
        frames = np.stack([to_uint8_image(frame) for frame in clip])
        blocks.append(temporal_profile(frames, row=row, scale=scale))
    gap = np.full((4, blocks[0].shape[1], 3), 255, np.uint8)
    out = [blocks[0]]
    for block in blocks[1:]:
        out += [gap, block]
    return np.concatenate(out)


def rpm_parameters(model: PLVC) -> list[nn.Parameter]:
    return [
        *model.motion_entropy.rpm.parameters(),
        *model.residual_entropy.rpm.parameters(),
    ]


def load_discriminator(path: str | Path) -> RecurrentConditionalDiscriminator:
    """Rebuild D from an exported ``discriminator.pt`` (in eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise RunnerError(f"discriminator weights {path} do not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != DISCRIMINATOR_FORMAT:
        raise RunnerError(f"{path} is not an exported PLVC discriminator ({DISCRIMINATOR_FORMAT})")
    d = RecurrentConditionalDiscriminator(DiscriminatorConfig.from_dict(payload["config"]))
    d.load_state_dict(payload["state_dict"])
    return d.eval()
