"""The recurrent conditional discriminator D of PLVC (paper Figs. 2, 4 and 13).

``D(x_i, x_{i-1} | y_i, m_i, h^D_{i-1})``: the frame pair, conditioned on the latent
``y_i`` (spatial), the estimated flow ``m_i`` (short-term temporal) and the ConvLSTM
state ``h^D`` (long-term temporal). Layout of the official release
(``hific/archs._DiscriminatorRNN``): ``y_i`` -> conv3x3 to 12 ch + LeakyReLU(0.2) ->
nearest upsampling to full resolution, concatenated with ``[x_{i-1}, x_i, m_i]``;
conv4x4 s2 64 -> ConvLSTM(64, 4x4) -> conv4x4 s2 128 -> conv4x4 s2 256 -> conv4x4 s1 512
-> conv4x4 s1 1; spectral norm on every conv, LeakyReLU(0.2).

The network returns patch *logits*; the sigmoid of the paper is applied inside the
losses as ``logsigmoid`` (:mod:`plvc.losses`), which is exact and cannot overflow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from plvc.errors import PLVCError
from plvc.layers import ConvLSTMCell, LSTMState, cat_states, same_conv2d, split_state

__all__ = ["DiscriminatorConfig", "RecurrentConditionalDiscriminator"]


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Sizes and ablation switches of D (paper Figs. 10-11)."""

    latent_channels: int = 256
    """Channels of the condition ``y_i`` = [ŷ^m, ŷ^r]: 2 x the generator's M."""
    condition_channels: int = 12
    channels: tuple[int, ...] = (64, 128, 256, 512)
    """All but the last use stride 2; the ConvLSTM follows the first; the last is s1."""
    kernel_size: int = 4
    use_hidden_state: bool = True
    """False: "w/o h^D". The ConvLSTM is kept (same capacity) but starts from zeros at
    every frame, so no information flows between frames."""
    use_motion_condition: bool = True
    """False: "w/o m_i". The flow is not an input (6 + 12 input channels instead of 8 + 12)."""
    leaky_slope: float = 0.2
    spectral_norm: bool = True

    def __post_init__(self) -> None:
        widths = tuple(self.channels)
        if len(widths) < 2 or any(not isinstance(c, int) or c < 1 for c in widths):
            raise PLVCError(
                f"DiscriminatorConfig.channels needs >= 2 positive integers, got {widths!r}"
            )
        object.__setattr__(self, "channels", widths)
        for name in ("latent_channels", "condition_channels", "kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PLVCError(
                    f"DiscriminatorConfig.{name} must be a positive integer, got {value!r}"
                )

    @classmethod
    def paper(cls, latent_channels: int = 256) -> DiscriminatorConfig:
        return cls(latent_channels=latent_channels)

    @classmethod
    def tiny(cls, latent_channels: int = 32, **overrides: Any) -> DiscriminatorConfig:
        """Small widths for tests (``latent_channels`` = 2 x PLVCConfig.tiny().latent_channels)."""
        return cls(latent_channels=latent_channels, channels=(8, 16, 16, 16), **overrides)

    @property
    def input_channels(self) -> int:
        """Channels entering the first conv: frames (6) + flow (2, if used) + condition."""
        return 6 + (2 if self.use_motion_condition else 0) + self.condition_channels

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["channels"] = list(self.channels)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiscriminatorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PLVCError(f"unknown DiscriminatorConfig key(s): {', '.join(unknown)}")
        values = dict(data)
        if "channels" in values:
            values["channels"] = tuple(values["channels"])
        return cls(**values)


class RecurrentConditionalDiscriminator(nn.Module):
    """D of eq. 6. Call once per P-frame with an explicit state; real and fake samples
    keep separate states and may share one call (concatenated along the batch)."""

    def __init__(self, config: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else DiscriminatorConfig.paper()
        self.config = cfg
        wrap = spectral_norm if cfg.spectral_norm else None
        k, slope = cfg.kernel_size, cfg.leaky_slope
        self.latent_conv = same_conv2d(cfg.latent_channels, cfg.condition_channels, 3, wrap=wrap)
        first = cfg.channels[0]
        self.head = same_conv2d(cfg.input_channels, first, k, stride=2, wrap=wrap)
        self.lstm = ConvLSTMCell(first, first, k, activation="tanh", wrap=wrap)
        body: list[nn.Module] = []
        width = first
        for c in cfg.channels[1:-1]:
            body += [same_conv2d(width, c, k, stride=2, wrap=wrap), nn.LeakyReLU(slope)]
            width = c
        body += [same_conv2d(width, cfg.channels[-1], k, wrap=wrap), nn.LeakyReLU(slope)]
        body.append(same_conv2d(cfg.channels[-1], 1, k, wrap=wrap))
        self.body = nn.Sequential(*body)

    @property
    def downsampling(self) -> int:
        """Input side / logit-map side."""
        return 2 ** (len(self.config.channels) - 1)

    def forward(
        self,
        x_cur: Tensor,
        x_prev: Tensor,
        flow: Tensor | None,
        y: Tensor,
        state: LSTMState | None = None,
    ) -> tuple[Tensor, LSTMState | None]:
        """Patch logits ``[B, 1, H/8, W/8]`` and the new state (``None`` when
        ``use_hidden_state`` is off). ``flow`` is ignored when ``use_motion_condition`` is
        off. ``state=None`` starts a clip."""
        cfg = self.config
        if x_cur.dim() != 4 or x_cur.shape[1] != 3 or x_prev.shape != x_cur.shape:
            raise PLVCError(
                f"D expects two frames [B, 3, H, W]; got {tuple(x_cur.shape)} and "
                f"{tuple(x_prev.shape)}"
            )
        h, w = x_cur.shape[-2:]
        if h % self.downsampling or w % self.downsampling:
            raise PLVCError(f"D needs frame sides divisible by {self.downsampling}, got {h}x{w}")
        if y.dim() != 4 or y.shape[0] != x_cur.shape[0] or y.shape[1] != cfg.latent_channels:
            raise PLVCError(
                f"D condition y must be [B, {cfg.latent_channels}, h, w] with B = "
                f"{x_cur.shape[0]}, got {tuple(y.shape)}"
            )
        inputs = [x_prev, x_cur]
        if cfg.use_motion_condition:
            if flow is None or flow.shape != (x_cur.shape[0], 2, h, w):
                raise PLVCError(
                    f"D with use_motion_condition needs flow [B, 2, {h}, {w}], got "
                    f"{None if flow is None else tuple(flow.shape)}"
                )
            inputs.append(flow)
        condition = F.leaky_relu(self.latent_conv(y), cfg.leaky_slope)
        inputs.append(F.interpolate(condition, size=(h, w), mode="nearest"))
        features = F.leaky_relu(self.head(torch.cat(inputs, dim=1)), cfg.leaky_slope)
        features, new_state = self.lstm(features, state if cfg.use_hidden_state else None)
        logits = self.body(features)
        return logits, (new_state if cfg.use_hidden_state else None)

    def forward_real_fake(
        self,
        real: tuple[Tensor, Tensor],
        fake: tuple[Tensor, Tensor],
        flow: Tensor | None,
        y: Tensor,
        real_state: LSTMState | None,
        fake_state: LSTMState | None,
    ) -> tuple[Tensor, Tensor, LSTMState | None, LSTMState | None]:
        """One D call on ``real = (x_cur, x_prev)`` and ``fake = (x̂_cur, x̂_prev)``
        concatenated along the batch, sharing the conditions ``flow`` and ``y``.

        Returns ``(real_logits, fake_logits, real_state, fake_state)``. One call means one
        spectral-norm power iteration and, under DDP, one all-reduce.
        """
        batch = real[0].shape[0]
        state = cat_states([real_state, fake_state], [real[0], fake[0]])
        logits, new_state = self(
            torch.cat([real[0], fake[0]]),
            torch.cat([real[1], fake[1]]),
            None if flow is None else torch.cat([flow, flow]),
            torch.cat([y, y]),
            state,
        )
        real_logits, fake_logits = logits.split([batch, batch])
        real_state, fake_state = split_state(new_state, [batch, batch])
        return real_logits, fake_logits, real_state, fake_state

    def forward_clip(
        self,
        frames: Tensor,
        i_frame_hat: Tensor,
        x_hat: Tensor,
        flows: Sequence[Tensor],
        ys: Sequence[Tensor],
        fake_only: bool = False,
    ) -> dict[str, list[Tensor]]:
        """Run D over a clip, P-frame by P-frame, real and fake with separate states.

        ``frames`` [B, T, 3, H, W] raw (frame 0 = I-frame), ``i_frame_hat`` its decoded
        image, ``x_hat`` [B, T-1, 3, H, W] and ``flows``/``ys`` (T-1 each) from
        :meth:`plvc.generator.PLVC.forward`. Real pair i: (x_{i-1}, x_i); fake pair:
        (x̂_{i-1}, x̂_i) with x̂_0 = ``i_frame_hat``. Detach the generator outputs for the D
        step. ``fake_only`` (the G step) skips the real samples. Returns ``{"real": [...],
        "fake": [...]}`` lists of logits (``"real"`` empty when ``fake_only``).
        """
        num_p = x_hat.shape[1]
        if frames.shape[1] != num_p + 1 or len(flows) != num_p or len(ys) != num_p:
            raise PLVCError(
                f"clip of {frames.shape[1]} frames needs {frames.shape[1] - 1} reconstructions, "
                f"flows and latents; got {num_p}, {len(flows)}, {len(ys)}"
            )
        fakes = [i_frame_hat, *x_hat.unbind(dim=1)]
        real_logits: list[Tensor] = []
        fake_logits: list[Tensor] = []
        real_state: LSTMState | None = None
        fake_state: LSTMState | None = None
        for i in range(1, num_p + 1):
            flow = flows[i - 1] if self.config.use_motion_condition else None
            if fake_only:
                logits, fake_state = self(fakes[i], fakes[i - 1], flow, ys[i - 1], fake_state)
                fake_logits.append(logits)
                continue
            r, f, real_state, fake_state = self.forward_real_fake(
                (frames[:, i], frames[:, i - 1]),
                (fakes[i], fakes[i - 1]),
                flow,
                ys[i - 1],
                real_state,
                fake_state,
            )
            real_logits.append(r)
            fake_logits.append(f)
        return {"real": real_logits, "fake": fake_logits}
