"""Entropy models of the P-frame latents (paper Fig. 2 "P"; RLVC's recurrent probability model).

Each latent (motion ``y^m`` and residual ``y^r``) has its own :class:`LatentEntropyModel`,
as in the official RLVC code (``RPM_..._mv`` / ``RPM_..._res``); the paper's single
"RPM over the concatenation" is the same thing with shared capacity, and separate
models keep each one small and let motion and residual statistics differ.

- First P-frame after an I-frame (no previous latent): CompressAI's factorized
  :class:`~compressai.entropy_models.EntropyBottleneck`.
- Later P-frames: :class:`RecurrentProbabilityModel` predicts a mean and scale per
  element from the previous frame's decoded latent, and CompressAI's
  :class:`~compressai.entropy_models.GaussianConditional` codes ``round(y - mean)``
  (the official code used a discretised logistic; a Gaussian is the accepted substitute).

Coding (``compress``/``decompress``) runs the probability model and the quantisation
through :mod:`plvc.determinism` so encoder and decoder derive bit-identical tables: on the
CPU in float32 on one thread by default (portable), where the frames are (``"device"``) or
exactly (``"exact"``, :mod:`plvc.exact`): the modes of :class:`plvc.determinism.CodingMode`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

with warnings.catch_warnings():
    # CompressAI 1.2.8 calls torch.jit.script at import, which torch 2.14 deprecates
    warnings.simplefilter("ignore", FutureWarning)
    from compressai.entropy_models import EntropyBottleneck, EntropyModel, GaussianConditional
    from compressai.ops import quantize_ste

from plvc.determinism import (
    CODING_DEVICE,
    CODING_DTYPE,
    ENTROPY_PARAMETER_MODES,
    cpu_functional_call,
    deterministic_coding,
    device_coding,
)
from plvc.exact import exact_entropy_parameters
from plvc.layers import ConvLSTMCell, LSTMState

__all__ = [
    "QUANTIZERS",
    "LatentEntropyModel",
    "RecurrentProbabilityModel",
    "bits_from_likelihoods",
    "bpp",
    "gaussian_indexes",
]

QUANTIZERS = ("noise", "ste")
"""Training-time quantisers: additive uniform noise everywhere (Ballé et al. 2017, the
paper's choice), or noise for the likelihoods and straight-through rounding for the
decoder input (``ste``)."""


def _conv_stack(
    in_channels: int, channels: int, out_channels: int, depth: int, kernel_size: int
) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_channels
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, channels, kernel_size, padding=kernel_size // 2), nn.ReLU()]
        width = channels
    layers.append(nn.Conv2d(width, out_channels, kernel_size, padding=kernel_size // 2))
    return nn.Sequential(*layers)


class RecurrentProbabilityModel(nn.Module):
    """RPM (Yang et al. 2021): ``(ŷ_{i-1}, h) -> (mean_i, scale_i, h')`` at H/16.

    ``depth`` 3x3 convs (ReLU between) -> ConvLSTM (tanh) -> ``depth`` 3x3 convs to
    ``2 * latent_channels`` (official ``rec_density``: 4 + LSTM + 4). Scales go through
    softplus (the official code predicted a log-scale); CompressAI lower-bounds them at
    0.11 when computing likelihoods and indexes.
    """

    def __init__(
        self, latent_channels: int, channels: int = 128, depth: int = 4, kernel_size: int = 3
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("RPM depth must be >= 1")
        self.latent_channels = latent_channels
        self.encode = _conv_stack(latent_channels, channels, channels, depth, kernel_size)
        self.lstm = ConvLSTMCell(channels, channels, kernel_size, activation="tanh")
        self.decode = _conv_stack(channels, channels, 2 * latent_channels, depth, kernel_size)

    def forward(
        self, prev_latent: Tensor, state: LSTMState | None = None
    ) -> tuple[Tensor, Tensor, LSTMState]:
        hidden, state = self.lstm(self.encode(prev_latent), state)
        raw_scales, means = self.decode(hidden).chunk(2, dim=1)
        return means, F.softplus(raw_scales), state


def gaussian_indexes(gaussian: GaussianConditional, scales: Tensor) -> Tensor:
    """CDF-table indexes for ``scales``: same rule as ``GaussianConditional.build_indexes``
    (the smallest table scale >= the lower-bounded scale), computed on ``scales``' device
    from a copy of the table, so it also works when the module lives on a GPU."""
    if gaussian.scale_table.numel() == 0:
        raise ValueError("GaussianConditional has no scale table; call update() first")
    table = gaussian.scale_table.detach().to(scales.device, scales.dtype)
    bound = gaussian.lower_bound_scale.bound.detach().to(scales.device, scales.dtype)
    scales = torch.maximum(scales, bound)
    return torch.searchsorted(table[:-1].contiguous(), scales.contiguous()).to(torch.int32)


def _channel_indexes(channels: int, shape: tuple[int, int]) -> Tensor:
    idx = torch.arange(channels, dtype=torch.int32).view(1, channels, 1, 1)
    return idx.expand(1, channels, *shape).contiguous()


def _medians(bottleneck: EntropyBottleneck) -> Tensor:
    medians = bottleneck.quantiles[:, 0, 1].detach().to(CODING_DEVICE, CODING_DTYPE)
    return medians.view(1, -1, 1, 1)


class LatentEntropyModel(nn.Module):
    """Rate model and coder of one latent stream (motion or residual) across a GOP.

    ``prev_latent=None`` marks the first P-frame after an I-frame (factorized prior);
    otherwise the RPM conditions on ``prev_latent`` (the previous decoded latent) and
    its own recurrent state.
    """

    def __init__(self, latent_channels: int, rpm_channels: int = 128, rpm_depth: int = 4) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.bottleneck = EntropyBottleneck(latent_channels)
        self.rpm = RecurrentProbabilityModel(latent_channels, rpm_channels, rpm_depth)
        self.gaussian = GaussianConditional(None)

    # -- training / evaluation -------------------------------------------------------------

    def forward(
        self,
        y: Tensor,
        prev_latent: Tensor | None,
        rpm_state: LSTMState | None,
        quantizer: str = "noise",
    ) -> tuple[Tensor, Tensor, LSTMState | None]:
        """Returns ``(y_hat, likelihoods, new_rpm_state)``.

        Training: ``y_hat`` is ``y`` + uniform noise (or straight-through rounded with
        ``quantizer="ste"``). Evaluation: ``round(y - mean) + mean``. Runs in float32
        with autocast off (likelihoods in bf16 would be useless).
        """
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        with torch.autocast(device_type=y.device.type, enabled=False):
            y = y.float()
            if prev_latent is None:
                y_hat, likelihoods = self.bottleneck(y)
                means: Tensor | None = self.bottleneck._get_medians().reshape(1, -1, 1, 1)
                new_state = None
            else:
                state = None if rpm_state is None else (rpm_state[0].float(), rpm_state[1].float())
                means, scales, new_state = self.rpm(prev_latent.float(), state)
                y_hat, likelihoods = self.gaussian(y, scales, means)
            if self.training and quantizer == "ste":
                y_hat = quantize_ste(y - means) + means
        return y_hat, likelihoods, new_state

    # -- entropy coding (batch 1, deterministic) -------------------------------------------

    def _entropy_parameters(
        self, prev_latent: Tensor, rpm_state: LSTMState | None, device: torch.device | None
    ) -> tuple[Tensor, Tensor, LSTMState]:
        if device is None:
            # portable: CPU float32 NCHW copies, whatever the latent's device and format
            prev = prev_latent.detach().to(CODING_DEVICE, CODING_DTYPE).contiguous()
            state = None
            if rpm_state is not None:
                state = tuple(
                    t.detach().to(CODING_DEVICE, CODING_DTYPE).contiguous() for t in rpm_state
                )
            means, scales, new_state = cpu_functional_call(self.rpm, prev, state)  # type: ignore[misc]
            return means, scales, new_state
        prev = prev_latent.detach().to(device, torch.float32)
        if rpm_state is not None:
            rpm_state = (
                rpm_state[0].to(device, torch.float32),
                rpm_state[1].to(device, torch.float32),
            )
        return self.rpm(prev, rpm_state)

    def _coding_model(
        self,
        shape: tuple[int, int],
        prev_latent: Tensor | None,
        rpm_state: LSTMState | None,
        entropy_parameters: str,
        device: torch.device | None,
    ) -> tuple[EntropyModel, Tensor, Tensor, LSTMState | None]:
        """``(entropy model, CDF indexes, means, new RPM state)`` of a latent of ``shape``."""
        on_device = device if entropy_parameters == "device" else None
        if prev_latent is None:
            where = CODING_DEVICE if on_device is None else on_device
            means = _medians(self.bottleneck).to(where)
            indexes = _channel_indexes(self.latent_channels, shape).to(where)
            return self.bottleneck, indexes, means, None
        if entropy_parameters == "exact":
            means, indexes, new_state = exact_entropy_parameters(
                self.rpm, self.gaussian.scale_table, prev_latent, rpm_state
            )
            self._check_shape(means, shape)
            return self.gaussian, indexes, means, new_state
        means, scales, new_state = self._entropy_parameters(prev_latent, rpm_state, on_device)
        self._check_shape(scales, shape)
        return self.gaussian, gaussian_indexes(self.gaussian, scales), means, new_state

    @staticmethod
    def _check_shape(parameters: Tensor, shape: tuple[int, int]) -> None:
        if tuple(parameters.shape[-2:]) != tuple(shape):
            raise ValueError(
                f"latent shape {tuple(shape)} does not match the previous latent "
                f"{tuple(parameters.shape[-2:])}"
            )

    @staticmethod
    def _coding(entropy_parameters: str, device: torch.device | None) -> AbstractContextManager:
        """Where and how the entropy parameters run (:class:`plvc.determinism.CodingMode`)."""
        if entropy_parameters not in ENTROPY_PARAMETER_MODES:
            raise ValueError(
                f"entropy_parameters must be one of {ENTROPY_PARAMETER_MODES}, "
                f"got {entropy_parameters!r}"
            )
        if entropy_parameters == "device":
            if device is None:
                raise ValueError('entropy_parameters="device" needs the device')
            return device_coding(device)
        if entropy_parameters == "exact":
            return device_coding(CODING_DEVICE)
        return deterministic_coding()

    def compress(
        self,
        y: Tensor,
        prev_latent: Tensor | None,
        rpm_state: LSTMState | None,
        entropy_parameters: str = "portable",
        device: torch.device | None = None,
    ) -> tuple[bytes, Tensor, LSTMState | None]:
        """Code ``y`` [1, C, h, w]; returns ``(string, y_hat, new_rpm_state)``.

        ``entropy_parameters``: ``"portable"`` runs them on the CPU (float32, one thread)
        and ``y_hat`` is a CPU float32 tensor; ``"device"`` runs them on ``device``
        (deterministic algorithms) and ``y_hat`` stays there; ``"exact"`` runs
        :func:`plvc.exact.exact_entropy_parameters` on the CPU (any machine derives the
        same). ``y_hat`` is exactly what :meth:`decompress` returns: both compute
        ``float(symbol) + mean`` with the same mean.
        """
        with self._coding(entropy_parameters, device):
            where = device if entropy_parameters == "device" else CODING_DEVICE
            y = y.detach().to(where, CODING_DTYPE).contiguous()
            model, indexes, means, new_state = self._coding_model(
                tuple(y.shape[-2:]), prev_latent, rpm_state, entropy_parameters, device
            )
            string = EntropyModel.compress(model, y, indexes, means)[0]
            y_hat = model.quantize(y, "dequantize", means)
        return string, y_hat, new_state

    def decompress(
        self,
        string: bytes,
        shape: tuple[int, int],
        prev_latent: Tensor | None,
        rpm_state: LSTMState | None,
        entropy_parameters: str = "portable",
        device: torch.device | None = None,
    ) -> tuple[Tensor, LSTMState | None]:
        """Decode a latent of spatial ``shape``; returns ``(y_hat, new_rpm_state)``, where
        :meth:`compress` puts them for the same ``entropy_parameters``."""
        with self._coding(entropy_parameters, device):
            model, indexes, means, new_state = self._coding_model(
                tuple(shape), prev_latent, rpm_state, entropy_parameters, device
            )
            # symbols come back on the tables' device (the module's); the mean is added where
            # the entropy parameters are, the same float addition as compress's dequantize
            symbols = EntropyModel.decompress(model, [string], indexes, CODING_DTYPE)
            y_hat = symbols.to(means.device) + means
        return y_hat, new_state

    def is_updated(self) -> bool:
        """Whether the CDF tables exist (``update()`` was called or they were loaded)."""
        return self.bottleneck._offset.numel() > 0 and self.gaussian._offset.numel() > 0


def _iter_likelihoods(likelihoods: object) -> list[Tensor]:
    if isinstance(likelihoods, Tensor):
        return [likelihoods]
    if isinstance(likelihoods, Mapping):
        return [t for v in likelihoods.values() for t in _iter_likelihoods(v)]
    if isinstance(likelihoods, Sequence) and not isinstance(likelihoods, str | bytes):
        return [t for v in likelihoods for t in _iter_likelihoods(v)]
    raise TypeError(f"expected likelihood tensors, got {type(likelihoods).__name__}")


def bits_from_likelihoods(likelihoods: Tensor | Mapping | Sequence) -> Tensor:
    """Estimated bits, ``sum(-log2 p)`` over every tensor in ``likelihoods`` (a tensor, a
    ``{"motion": ..., "residual": ...}`` dict, or a list of those), summed over the batch."""
    tensors = _iter_likelihoods(likelihoods)
    if not tensors:
        raise ValueError("no likelihoods given")
    return sum(torch.log(t.float()).sum() for t in tensors) / -math.log(2.0)


def bpp(likelihoods: Tensor | Mapping | Sequence, num_pixels: int) -> Tensor:
    """Estimated bits per pixel: :func:`bits_from_likelihoods` / ``num_pixels``
    (``num_pixels = batch * H * W`` gives the batch-mean bpp, as CompressAI's losses do)."""
    if num_pixels <= 0:
        raise ValueError("num_pixels must be positive")
    return bits_from_likelihoods(likelihoods) / num_pixels
