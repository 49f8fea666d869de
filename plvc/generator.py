"""The recurrent generator G of PLVC (paper eq. 3, Figs. 3 and 12).

Per P-frame ``i``: ``x̂_i, y_i = G(x̂_{i-1}, m_i, x_i, h^G_{i-1})``

1. motion estimation ``m_i`` = :class:`~plvc.flow.PyramidFlow` (x̂_{i-1} -> x_i);
2. recurrent motion auto-encoder -> latent ``y^m_i`` (H/16) -> decoded flow ``m̂_i``;
3. motion compensation CNN on ``[m̂_i, x̂_{i-1}, warp(x̂_{i-1}, m̂_i)]`` -> ``x'_i``;
4. recurrent residual auto-encoder on ``x_i - x'_i`` -> ``y^r_i`` -> ``r̂_i``;
5. ``x̂_i = x'_i + r̂_i``; ``y_i = [y^m_i, y^r_i]`` is entropy-coded by
   :class:`~plvc.entropy.LatentEntropyModel` (factorized for the first P-frame, RPM after).

Layouts follow the authors' TF release (``CNN_recurrent.py``, ``MC_network.py``,
``motion.py``); widths and depths are :class:`PLVCConfig` values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

with warnings.catch_warnings():
    # CompressAI 1.2.8 calls torch.jit.script at import, which torch 2.14 deprecates
    warnings.simplefilter("ignore", FutureWarning)
    from compressai.entropy_models import EntropyBottleneck, GaussianConditional
    from compressai.layers import GDN
    from compressai.models import CompressionModel
    from compressai.models.base import get_scale_table

from plvc.determinism import CodingMode, deterministic_coding
from plvc.entropy import QUANTIZERS, LatentEntropyModel, bits_from_likelihoods, bpp
from plvc.errors import BitstreamError, PLVCError
from plvc.flow import PyramidFlow, warp
from plvc.layers import ACTIVATIONS, ConvLSTMCell, LSTMState, PreActResBlock, conv, deconv

__all__ = [
    "PLVC",
    "GeneratorState",
    "MotionCompensation",
    "PLVCConfig",
    "RecurrentAnalysis",
    "RecurrentSynthesis",
    "bits_from_likelihoods",
    "bpp",
]


@dataclass(frozen=True)
class PLVCConfig:
    """Every size of the generator. :meth:`paper` gives the paper's (the default values)."""

    channels: int = 128
    """N: width of both auto-encoders and their ConvLSTMs (at H/4)."""
    latent_channels: int = 128
    """M: channels of each latent, ``y^m`` and ``y^r`` (at H/16)."""
    motion_kernel: int = 3
    residual_kernel: int = 5
    ae_lstm_activation: str = "relu"
    """Cell non-linearity of the auto-encoder ConvLSTMs; the official code passes ReLU."""
    mc_channels: int = 64
    mc_predicts_residual: bool = False
    """False (official ``MC_new``): the MC CNN outputs the prediction itself; True: it
    outputs a correction added to the warped reference."""
    flow_levels: int = 5
    flow_widths: tuple[int, ...] = (32, 64, 32, 16)
    flow_kernel: int = 7
    rpm_channels: int = 128
    rpm_depth: int = 4
    """3x3 convs before and after the RPM's ConvLSTM (official: 4 and 4)."""
    quantizer: str = "noise"
    """Training-time quantiser, see :data:`plvc.entropy.QUANTIZERS`; the paper uses noise."""

    def __post_init__(self) -> None:
        for name in (
            "channels",
            "latent_channels",
            "motion_kernel",
            "residual_kernel",
            "mc_channels",
            "flow_levels",
            "flow_kernel",
            "rpm_channels",
            "rpm_depth",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PLVCError(f"PLVCConfig.{name} must be a positive integer, got {value!r}")
        for name in ("motion_kernel", "residual_kernel", "flow_kernel"):
            if getattr(self, name) % 2 == 0:
                raise PLVCError(f"PLVCConfig.{name} must be odd, got {getattr(self, name)}")
        widths = tuple(self.flow_widths)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise PLVCError(f"PLVCConfig.flow_widths must be positive integers, got {widths!r}")
        object.__setattr__(self, "flow_widths", widths)
        if self.ae_lstm_activation not in ACTIVATIONS:
            raise PLVCError(
                f"PLVCConfig.ae_lstm_activation must be one of {sorted(ACTIVATIONS)}, "
                f"got {self.ae_lstm_activation!r}"
            )
        if self.quantizer not in QUANTIZERS:
            raise PLVCError(
                f"PLVCConfig.quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}"
            )

    @classmethod
    def paper(cls) -> PLVCConfig:
        """The paper's sizes: N = M = 128, MC 64, 5-level flow 32-64-32-16, RPM 128."""
        return cls()

    @classmethod
    def tiny(cls) -> PLVCConfig:
        """A ~0.3 M-parameter model for tests and CPU smoke runs."""
        return cls(
            channels=16,
            latent_channels=16,
            mc_channels=16,
            flow_levels=3,
            flow_widths=(8, 16, 8, 8),
            flow_kernel=5,
            rpm_channels=16,
            rpm_depth=2,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` inverts it."""
        out = dataclasses.asdict(self)
        out["flow_widths"] = list(self.flow_widths)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PLVCConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error naming them."""
        if not isinstance(data, Mapping):
            raise PLVCError(f"PLVCConfig must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PLVCError(f"unknown PLVCConfig key(s): {', '.join(unknown)}")
        values = dict(data)
        if "flow_widths" in values:
            values["flow_widths"] = tuple(values["flow_widths"])
        return cls(**values)


_TABLE_BUFFERS: dict[type, tuple[str, ...]] = {
    EntropyBottleneck: ("_quantized_cdf", "_offset", "_cdf_length"),
    GaussianConditional: ("_quantized_cdf", "_offset", "_cdf_length", "scale_table"),
}


def _detach(state: LSTMState | None) -> LSTMState | None:
    return None if state is None else (state[0].detach(), state[1].detach())


@dataclass
class GeneratorState:
    """Everything G carries from one P-frame to the next (``h^G`` of eq. 3).

    ``None`` in place of a whole state means "first P-frame after an I-frame". The
    encoder-side ConvLSTM states exist only on the encoder; the decoder's state (from
    :meth:`PLVC.decompress_pframe`) has them as ``None``.
    """

    frame_index: int
    """Number of P-frames coded since the I-frame (1 after the first P-frame)."""
    prev_y_motion: Tensor
    """Decoded motion latent ŷ^m of the last P-frame: the RPM's input for the next one."""
    prev_y_residual: Tensor
    motion_rpm: LSTMState | None = None
    residual_rpm: LSTMState | None = None
    motion_encoder: LSTMState | None = None
    motion_decoder: LSTMState | None = None
    residual_encoder: LSTMState | None = None
    residual_decoder: LSTMState | None = None

    def detach(self) -> GeneratorState:
        """A copy cut from the autograd graph (truncated back-propagation through time)."""
        return GeneratorState(
            frame_index=self.frame_index,
            prev_y_motion=self.prev_y_motion.detach(),
            prev_y_residual=self.prev_y_residual.detach(),
            motion_rpm=_detach(self.motion_rpm),
            residual_rpm=_detach(self.residual_rpm),
            motion_encoder=_detach(self.motion_encoder),
            motion_decoder=_detach(self.motion_decoder),
            residual_encoder=_detach(self.residual_encoder),
            residual_decoder=_detach(self.residual_decoder),
        )

    def tensors(self) -> Iterator[Tensor]:
        """Every tensor in the state (for checks and device moves)."""
        yield self.prev_y_motion
        yield self.prev_y_residual
        for s in (
            self.motion_rpm,
            self.residual_rpm,
            self.motion_encoder,
            self.motion_decoder,
            self.residual_encoder,
            self.residual_decoder,
        ):
            if s is not None:
                yield from s


class RecurrentAnalysis(nn.Module):
    """Recurrent encoder (official ``MV_analysis`` / ``Res_analysis``).

    conv s2 N + GDN, conv s2 N + GDN, ConvLSTM(N) at H/4, conv s2 N + GDN, conv s2 M.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        latent_channels: int,
        kernel_size: int,
        lstm_activation: str = "relu",
    ) -> None:
        super().__init__()
        n, k = channels, kernel_size
        self.head = nn.Sequential(conv(in_channels, n, k), GDN(n), conv(n, n, k), GDN(n))
        self.lstm = ConvLSTMCell(n, n, k, activation=lstm_activation)
        self.tail = nn.Sequential(conv(n, n, k), GDN(n), conv(n, latent_channels, k))

    def forward(self, x: Tensor, state: LSTMState | None) -> tuple[Tensor, LSTMState]:
        hidden, state = self.lstm(self.head(x), state)
        return self.tail(hidden), state


class RecurrentSynthesis(nn.Module):
    """Recurrent decoder (official ``MV_synthesis`` / ``Res_synthesis``).

    deconv s2 N + IGDN, deconv s2 N + IGDN, ConvLSTM(N) at H/4, deconv s2 N + IGDN,
    deconv s2 ``out_channels``.
    """

    def __init__(
        self,
        latent_channels: int,
        channels: int,
        out_channels: int,
        kernel_size: int,
        lstm_activation: str = "relu",
    ) -> None:
        super().__init__()
        n, k = channels, kernel_size
        self.head = nn.Sequential(
            deconv(latent_channels, n, k),
            GDN(n, inverse=True),
            deconv(n, n, k),
            GDN(n, inverse=True),
        )
        self.lstm = ConvLSTMCell(n, n, k, activation=lstm_activation)
        self.tail = nn.Sequential(deconv(n, n, k), GDN(n, inverse=True), deconv(n, out_channels, k))

    def forward(self, y: Tensor, state: LSTMState | None) -> tuple[Tensor, LSTMState]:
        hidden, state = self.lstm(self.head(y), state)
        return self.tail(hidden), state


class MotionCompensation(nn.Module):
    """Motion compensation CNN (official ``MC_network.MC_new``, paper Fig. 12).

    ``[m̂, x̂_ref, warp(x̂_ref, m̂)]`` (8 ch) -> conv3x3 C -> pre-activation residual blocks
    around two 2x average-pool downsamplings and two bilinear upsamplings with additive
    skips -> conv3x3 C, ReLU, conv3x3 3. Needs H, W divisible by 4.
    """

    def __init__(self, channels: int = 64, predicts_residual: bool = False) -> None:
        super().__init__()
        c = channels
        self.predicts_residual = predicts_residual
        self.head = nn.Conv2d(8, c, 3, padding=1)
        self.res_full_down = PreActResBlock(c)
        self.res_half_down = PreActResBlock(c)
        self.res_quarter = nn.Sequential(PreActResBlock(c), PreActResBlock(c))
        self.res_half_up = PreActResBlock(c)
        self.res_full_up = PreActResBlock(c)
        self.tail = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 3, 3, padding=1)
        )

    @staticmethod
    def _up(x: Tensor, like: Tensor) -> Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, flow_hat: Tensor, x_ref: Tensor, x_warp: Tensor) -> Tensor:
        full = self.res_full_down(self.head(torch.cat([flow_hat, x_ref, x_warp], dim=1)))
        half = self.res_half_down(F.avg_pool2d(full, 2))
        quarter = self.res_quarter(F.avg_pool2d(half, 2))
        half = self.res_half_up(half + self._up(quarter, half))
        full = self.res_full_up(full + self._up(half, full))
        out = self.tail(full)
        return x_warp + out if self.predicts_residual else out


class PLVC(CompressionModel):
    """The PLVC P-frame generator with its entropy models (a CompressAI model).

    Frames are float ``[B, 3, H, W]`` in [0, 1] with H, W multiples of :attr:`stride`.
    The I-frame is coded elsewhere (:mod:`plvc.intra`); :meth:`forward` takes its decoded
    image. ``update()`` must run (or tables must be loaded) before ``compress_pframe``.
    """

    stride: int = 16

    def __init__(self, config: PLVCConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else PLVCConfig.paper()
        if not isinstance(cfg, PLVCConfig):
            raise PLVCError(f"config must be a PLVCConfig, got {type(cfg).__name__}")
        self.config = cfg
        n, m, act = cfg.channels, cfg.latent_channels, cfg.ae_lstm_activation
        self.motion_estimation = PyramidFlow(cfg.flow_levels, cfg.flow_widths, cfg.flow_kernel)
        self.motion_encoder = RecurrentAnalysis(2, n, m, cfg.motion_kernel, act)
        self.motion_decoder = RecurrentSynthesis(m, n, 2, cfg.motion_kernel, act)
        self.motion_compensation = MotionCompensation(cfg.mc_channels, cfg.mc_predicts_residual)
        self.residual_encoder = RecurrentAnalysis(3, n, m, cfg.residual_kernel, act)
        self.residual_decoder = RecurrentSynthesis(m, n, 3, cfg.residual_kernel, act)
        self.motion_entropy = LatentEntropyModel(m, cfg.rpm_channels, cfg.rpm_depth)
        self.residual_entropy = LatentEntropyModel(m, cfg.rpm_channels, cfg.rpm_depth)

    # -- checks ----------------------------------------------------------------------------

    def _check_frames(self, x: Tensor, x_ref_hat: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise PLVCError(f"P-frame must be [B, 3, H, W], got {tuple(x.shape)}")
        if x_ref_hat.shape != x.shape:
            raise PLVCError(
                f"reference frame {tuple(x_ref_hat.shape)} and P-frame {tuple(x.shape)} differ"
            )
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:
            raise PLVCError(
                f"frame size {h}x{w} is not a multiple of {self.stride}; pad or crop it first"
            )

    @staticmethod
    def _check_state(state: GeneratorState | None, latent_shape: tuple[int, ...]) -> None:
        if state is None:
            return
        if not isinstance(state, GeneratorState):
            raise PLVCError(f"state must be a GeneratorState or None, got {type(state).__name__}")
        expected = (latent_shape[0], *latent_shape[2:])
        got = (state.prev_y_motion.shape[0], *state.prev_y_motion.shape[2:])
        if got != expected:
            raise PLVCError(
                f"state was made for batch/latent size {got}, but this frame needs {expected}; "
                "pass state=None at the start of a new clip or GOP"
            )

    def _latent_shape(self, x: Tensor) -> tuple[int, int, int, int]:
        h, w = x.shape[-2:]
        return (x.shape[0], self.config.latent_channels, h // self.stride, w // self.stride)

    # -- shared decoder path ---------------------------------------------------------------

    def _motion_synthesis(
        self, y_motion_hat: Tensor, x_ref_hat: Tensor, state: LSTMState | None
    ) -> tuple[Tensor, Tensor, Tensor, LSTMState]:
        flow_hat, state = self.motion_decoder(y_motion_hat, state)
        x_warp = warp(x_ref_hat, flow_hat)
        x_mc = self.motion_compensation(flow_hat, x_ref_hat, x_warp)
        return flow_hat, x_warp, x_mc, state

    # -- training / evaluation -------------------------------------------------------------

    def forward_pframe(
        self, x: Tensor, x_ref_hat: Tensor, state: GeneratorState | None = None
    ) -> dict[str, Any]:
        """One P-frame of eq. 3. ``state=None``: first P-frame after the I-frame.

        Returns ``x_hat``, ``likelihoods`` (``{"motion", "residual"}``), ``y`` (= [ŷ^m, ŷ^r],
        the condition of D), ``y_motion``, ``y_residual``, ``flow`` (m_i), ``flow_hat``,
        ``x_warp``, ``x_mc`` and the new ``state``. Training mode quantises with noise
        (or STE, per config); evaluation mode rounds and clamps ``x_hat`` to [0, 1].
        """
        self._check_frames(x, x_ref_hat)
        self._check_state(state, self._latent_shape(x))
        quantizer = self.config.quantizer
        flow = self.motion_estimation(x_ref_hat, x)

        y_motion, motion_enc = self.motion_encoder(flow, state.motion_encoder if state else None)
        y_motion_hat, motion_lik, motion_rpm = self.motion_entropy(
            y_motion,
            state.prev_y_motion if state else None,
            state.motion_rpm if state else None,
            quantizer,
        )
        flow_hat, x_warp, x_mc, motion_dec = self._motion_synthesis(
            y_motion_hat.to(x.dtype), x_ref_hat, state.motion_decoder if state else None
        )

        y_residual, residual_enc = self.residual_encoder(
            x - x_mc, state.residual_encoder if state else None
        )
        y_residual_hat, residual_lik, residual_rpm = self.residual_entropy(
            y_residual,
            state.prev_y_residual if state else None,
            state.residual_rpm if state else None,
            quantizer,
        )
        residual_hat, residual_dec = self.residual_decoder(
            y_residual_hat.to(x.dtype), state.residual_decoder if state else None
        )
        x_hat = x_mc + residual_hat
        if not self.training:
            x_hat = x_hat.clamp(0.0, 1.0)

        new_state = GeneratorState(
            frame_index=(state.frame_index if state else 0) + 1,
            prev_y_motion=y_motion_hat,
            prev_y_residual=y_residual_hat,
            motion_rpm=motion_rpm,
            residual_rpm=residual_rpm,
            motion_encoder=motion_enc,
            motion_decoder=motion_dec,
            residual_encoder=residual_enc,
            residual_decoder=residual_dec,
        )
        return {
            "x_hat": x_hat,
            "likelihoods": {"motion": motion_lik, "residual": residual_lik},
            "y": torch.cat([y_motion_hat, y_residual_hat], dim=1),
            "y_motion": y_motion_hat,
            "y_residual": y_residual_hat,
            "flow": flow,
            "flow_hat": flow_hat,
            "x_warp": x_warp,
            "x_mc": x_mc,
            "state": new_state,
        }

    def forward(self, frames: Tensor, i_frame_hat: Tensor) -> dict[str, Any]:
        """A clip ``[B, T, 3, H, W]`` (frame 0 = the I-frame, already coded as ``i_frame_hat``).

        Runs frames 1..T-1 as P-frames carrying the state and the reconstructed
        reference without detaching (gradients flow across frames, eq. 5). Returns
        ``x_hat`` [B, T-1, 3, H, W] and per-P-frame lists ``likelihoods``, ``y``, ``flow``,
        ``x_mc``, plus the final ``state``.
        """
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise PLVCError(f"clip must be [B, T, 3, H, W], got {tuple(frames.shape)}")
        if frames.shape[1] < 2:
            raise PLVCError("clip needs an I-frame and at least one P-frame (T >= 2)")
        if i_frame_hat.shape != frames[:, 0].shape:
            raise PLVCError(
                f"decoded I-frame {tuple(i_frame_hat.shape)} does not match clip frames "
                f"{tuple(frames[:, 0].shape)}"
            )
        x_ref = i_frame_hat
        state: GeneratorState | None = None
        x_hats, likelihoods, ys, flows, x_mcs = [], [], [], [], []
        for t in range(1, frames.shape[1]):
            out = self.forward_pframe(frames[:, t], x_ref, state)
            x_ref, state = out["x_hat"], out["state"]
            x_hats.append(out["x_hat"])
            likelihoods.append(out["likelihoods"])
            ys.append(out["y"])
            flows.append(out["flow"])
            x_mcs.append(out["x_mc"])
        return {
            "x_hat": torch.stack(x_hats, dim=1),
            "likelihoods": likelihoods,
            "y": ys,
            "flow": flows,
            "x_mc": x_mcs,
            "state": state,
        }

    # -- entropy coding --------------------------------------------------------------------

    def _check_coding(self, x: Tensor) -> None:
        if x.shape[0] != 1:
            raise PLVCError(
                f"compress/decompress code one frame at a time (batch 1), got {x.shape[0]}"
            )
        if not (self.motion_entropy.is_updated() and self.residual_entropy.is_updated()):
            raise PLVCError(
                "entropy-coder tables are missing: call model.update() after training, or "
                "load a state dict saved after update()"
            )

    @contextlib.contextmanager
    def _coding(self, mode: CodingMode, device: torch.device) -> Iterator[None]:
        """No autograd, the mode's memory format for the weights and autocast for the
        transforms (the entropy parameters switch it off again)."""
        self.to(memory_format=mode.memory_format)
        dtype = mode.autocast_dtype
        with (
            torch.no_grad(),
            torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None),
        ):
            yield

    def compress_pframe(
        self,
        x: Tensor,
        x_ref_hat: Tensor,
        state: GeneratorState | None,
        mode: CodingMode | None = None,
    ) -> tuple[list[bytes], tuple[int, int], Tensor, GeneratorState]:
        """Code one P-frame (batch 1) the way ``mode`` says (default :class:`CodingMode`:
        portable entropy parameters, float32, channels-last).

        Returns ``([motion_string, residual_string], (h, w) latent size, x_hat, state)``.
        ``x_hat`` and the decoder-side parts of ``state`` are computed from the decoded
        latents exactly as :meth:`decompress_pframe` computes them, so the decoder
        reproduces ``x_hat`` bit for bit with the same mode (same device type and PyTorch
        build). Puts the weights in the mode's memory format (their values do not change).
        """
        mode = mode if mode is not None else CodingMode()
        with self._coding(mode, x.device):
            fmt = mode.memory_format
            return self._compress_pframe(
                x.contiguous(memory_format=fmt),
                x_ref_hat.contiguous(memory_format=fmt),
                state,
                mode,
            )

    def _compress_pframe(
        self, x: Tensor, x_ref_hat: Tensor, state: GeneratorState | None, mode: CodingMode
    ) -> tuple[list[bytes], tuple[int, int], Tensor, GeneratorState]:
        self._check_frames(x, x_ref_hat)
        self._check_coding(x)
        self._check_state(state, self._latent_shape(x))
        device, dtype = x.device, x.dtype
        flow = self.motion_estimation(x_ref_hat, x)

        y_motion, motion_enc = self.motion_encoder(flow, state.motion_encoder if state else None)
        motion_string, y_motion_hat, motion_rpm = self.motion_entropy.compress(
            y_motion,
            state.prev_y_motion if state else None,
            state.motion_rpm if state else None,
            mode.entropy_parameters,
            device,
        )
        _, _, x_mc, motion_dec = self._motion_synthesis(
            y_motion_hat.to(device, dtype), x_ref_hat, state.motion_decoder if state else None
        )

        y_residual, residual_enc = self.residual_encoder(
            x - x_mc, state.residual_encoder if state else None
        )
        residual_string, y_residual_hat, residual_rpm = self.residual_entropy.compress(
            y_residual,
            state.prev_y_residual if state else None,
            state.residual_rpm if state else None,
            mode.entropy_parameters,
            device,
        )
        x_hat, new_state = self._reconstruct_pframe(
            x_mc,
            y_motion_hat,
            y_residual_hat,
            (motion_rpm, residual_rpm, motion_dec),
            state,
            encoder_states=(motion_enc, residual_enc),
            dtype=dtype,
        )
        latent_size = (int(y_motion.shape[-2]), int(y_motion.shape[-1]))
        return [motion_string, residual_string], latent_size, x_hat, new_state

    def _reconstruct_pframe(
        self,
        x_mc: Tensor,
        y_motion_hat: Tensor,
        y_residual_hat: Tensor,
        decoded_states: tuple[LSTMState | None, LSTMState | None, LSTMState | None],
        state: GeneratorState | None,
        *,
        encoder_states: tuple[LSTMState | None, LSTMState | None] = (None, None),
        dtype: torch.dtype,
    ) -> tuple[Tensor, GeneratorState]:
        """The decoder side of a P-frame after its latents are decoded, shared by
        :meth:`compress_pframe` and :meth:`decompress_pframe` so both reconstruct the same
        ``x_hat`` and state (fig. 2: residual decoder, x̂ = x_mc + r̂, next h^G)."""
        motion_rpm, residual_rpm, motion_dec = decoded_states
        residual_hat, residual_dec = self.residual_decoder(
            y_residual_hat.to(x_mc.device, dtype),
            state.residual_decoder if state else None,
        )
        # in the frames' dtype: a bf16 reference would lose ~8 bits of every pixel
        x_hat = (x_mc.to(dtype) + residual_hat.to(dtype)).clamp(0.0, 1.0)
        new_state = GeneratorState(
            frame_index=(state.frame_index if state else 0) + 1,
            prev_y_motion=y_motion_hat,
            prev_y_residual=y_residual_hat,
            motion_rpm=motion_rpm,
            residual_rpm=residual_rpm,
            motion_encoder=encoder_states[0],
            motion_decoder=motion_dec,
            residual_encoder=encoder_states[1],
            residual_decoder=residual_dec,
        )
        return x_hat, new_state

    def decompress_pframe(
        self,
        strings: list[bytes],
        shape: tuple[int, int],
        x_ref_hat: Tensor,
        state: GeneratorState | None,
        mode: CodingMode | None = None,
    ) -> tuple[Tensor, GeneratorState]:
        """Decode one P-frame from :meth:`compress_pframe`'s strings, coded with ``mode``;
        returns ``(x_hat, state)``.

        ``state`` is this decoder's previous state (``None`` after an I-frame); the
        returned state has no encoder-side ConvLSTM states.
        """
        if not isinstance(x_ref_hat, Tensor):
            raise PLVCError(f"reference frame must be a tensor, got {type(x_ref_hat).__name__}")
        mode = mode if mode is not None else CodingMode()
        with self._coding(mode, x_ref_hat.device):
            x_ref_hat = x_ref_hat.contiguous(memory_format=mode.memory_format)
            return self._decompress_pframe(strings, shape, x_ref_hat, state, mode)

    def _decompress_pframe(
        self,
        strings: list[bytes],
        shape: tuple[int, int],
        x_ref_hat: Tensor,
        state: GeneratorState | None,
        mode: CodingMode,
    ) -> tuple[Tensor, GeneratorState]:
        if not isinstance(strings, list | tuple) or len(strings) != 2:
            raise BitstreamError("a P-frame needs exactly two strings (motion, residual)")
        if not all(isinstance(s, bytes | bytearray) for s in strings):
            raise BitstreamError("P-frame strings must be bytes")
        if len(shape) != 2 or any(int(s) < 1 for s in shape):
            raise BitstreamError(f"invalid latent size {tuple(shape)}")
        if x_ref_hat.dim() != 4 or x_ref_hat.shape[1] != 3:
            raise PLVCError(f"reference frame must be [1, 3, H, W], got {tuple(x_ref_hat.shape)}")
        self._check_coding(x_ref_hat)
        h, w = x_ref_hat.shape[-2:]
        shape = (int(shape[0]), int(shape[1]))
        if (shape[0] * self.stride, shape[1] * self.stride) != (h, w):
            raise BitstreamError(
                f"latent size {shape} does not match the {h}x{w} reference frame "
                f"(expected {(h // self.stride, w // self.stride)})"
            )
        self._check_state(state, (1, self.config.latent_channels, *shape))
        device, dtype = x_ref_hat.device, x_ref_hat.dtype

        y_motion_hat, motion_rpm = self.motion_entropy.decompress(
            bytes(strings[0]),
            shape,
            state.prev_y_motion if state else None,
            state.motion_rpm if state else None,
            mode.entropy_parameters,
            device,
        )
        _, _, x_mc, motion_dec = self._motion_synthesis(
            y_motion_hat.to(device, dtype), x_ref_hat, state.motion_decoder if state else None
        )
        y_residual_hat, residual_rpm = self.residual_entropy.decompress(
            bytes(strings[1]),
            shape,
            state.prev_y_residual if state else None,
            state.residual_rpm if state else None,
            mode.entropy_parameters,
            device,
        )
        return self._reconstruct_pframe(
            x_mc,
            y_motion_hat,
            y_residual_hat,
            (motion_rpm, residual_rpm, motion_dec),
            state,
            dtype=dtype,
        )

    # -- CompressAI plumbing ---------------------------------------------------------------

    def update(
        self,
        scale_table: Tensor | None = None,
        force: bool = False,
        update_quantiles: bool = False,
    ) -> bool:
        """Build the CDF tables of the bottlenecks and the Gaussian conditionals' scale table.

        Computed on the CPU in float32 whatever device the model is on, so the tables
        (saved in the state dict) do not depend on where ``update`` ran. Returns whether
        anything was (re)built; existing tables are kept unless ``force``.
        """
        if scale_table is None:
            scale_table = get_scale_table()
        updated = False
        with deterministic_coding():
            for module in self.modules():
                if not isinstance(module, EntropyBottleneck | GaussianConditional):
                    continue
                device = next(iter(module.buffers())).device
                module.to("cpu")
                try:
                    if isinstance(module, EntropyBottleneck):
                        updated |= module.update(force=force, update_quantiles=update_quantiles)
                    else:
                        updated |= module.update_scale_table(scale_table.cpu(), force=force)
                finally:
                    module.to(device)
        return updated

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load weights *and* CDF tables, resizing the tables to the saved ones.

        CompressAI resizes them only when empty, so loading into a model that already
        ran ``update()`` (with another table size) would fail; here they always follow
        the state dict, since encoder and decoder must use the very same tables.
        """
        for name, module in self.named_modules():
            if not isinstance(module, EntropyBottleneck | GaussianConditional):
                continue
            for buffer_name in _TABLE_BUFFERS[type(module)]:
                key = f"{name}.{buffer_name}"
                if key in state_dict:
                    getattr(module, buffer_name).resize_(state_dict[key].shape)
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{"main": [...], "aux": [...]}``: the aux group is the bottlenecks' ``quantiles``,
        trained by their own optimizer on :meth:`aux_loss` (as in CompressAI's examples)."""
        main, aux = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (aux if name.endswith(".quantiles") else main).append(param)
        return {"main": main, "aux": aux}

    def parts(self) -> dict[str, nn.Module]:
        """Named sub-networks (for parameter counts and per-part learning rates)."""
        return {
            "motion_estimation": self.motion_estimation,
            "motion_encoder": self.motion_encoder,
            "motion_decoder": self.motion_decoder,
            "motion_compensation": self.motion_compensation,
            "residual_encoder": self.residual_encoder,
            "residual_decoder": self.residual_decoder,
            "motion_entropy": self.motion_entropy,
            "residual_entropy": self.residual_entropy,
        }
