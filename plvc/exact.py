"""Entropy parameters that come out identical on any machine (the ``"exact"`` mode).

A rANS decoder must pick every symbol's CDF exactly as the encoder did. The CDF of a
P-frame latent element is chosen by the RPM's mean and scale index, computed from the
previous decoded latents. Floating-point convolutions round differently on other CPUs
(oneDNN picks kernels per instruction set), thread counts and accelerators, and ``exp``/
``tanh`` differ between math libraries, so in the portable mode the same build and
instruction set are needed on both sides (measured here: AVX-512 and AVX2 kernels agree on
the latents, the baseline SSE kernels do not).

This module evaluates a trained :class:`~plvc.entropy.RecurrentProbabilityModel` so that
the result depends on nothing but its weights and inputs (in the spirit of Ballé et al.,
"Integer networks for data compression", ICLR 2019, without retraining):

- **Convolutions in exact integer arithmetic.** Before every convolution the input and the
  weights are each rounded to integers on a power-of-two grid (``b`` significant bits of the
  tensor's largest magnitude, ``b`` chosen per layer so that ``2^(2b) * fan-in < 2^52``).
  The convolution then runs in float64 on integer values: every product and partial sum is
  an integer below 2^53, so it is exact whatever the summation order, blocking, thread count
  or instruction set. Scaling back is a multiplication by a power of two (exact); the bias is
  one IEEE addition (correctly rounded, hence the same everywhere).
- **Non-linearities from IEEE basic operations only.** ``exp`` is a fixed range reduction
  and a degree-13 Taylor polynomial evaluated as separate multiplications and additions,
  ``2^k`` is built from its bits; ``sigmoid`` and ``tanh`` derive from it. No libm call.
- **Scale index without softplus or a log.** ``softplus(r) > t`` exactly when
  ``1 + exp(r) > exp(t)``: the index counts the table's ``exp(t_k)`` below ``1 + exp(r)``.

With 20-bit grids the values differ from the float32 RPM's by about 1e-6 relative, so the
rate is the float model's (``tests/plvc/test_exact.py`` measures it). The cost is float64
convolutions on the CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plvc.layers import ConvLSTMCell, LSTMState

__all__ = ["exact_entropy_parameters", "exact_exp", "exact_sigmoid", "exact_tanh"]

_DTYPE = torch.float64
_EXACT_BITS = 52  # integers below 2^53 are exact in float64; one bit of margin
_TAYLOR = [1.0 / math.factorial(n) for n in range(14)]
_LN2 = 0.6931471805599453
_INV_LN2 = 1.4426950408889634


def _power_of_two(k: Tensor) -> Tensor:
    """``2.0 ** k`` for integer-valued float64 ``k`` in [-1022, 1023], built from its bits."""
    return ((k.to(torch.int64) + 1023) << 52).view(_DTYPE)


def exact_exp(x: Tensor) -> Tensor:
    """``exp(x)`` (float64) from IEEE multiplications and additions only, so the same on any
    machine; accurate to a few ulps on [-700, 700] (inputs are clamped to it)."""
    x = x.to(_DTYPE).clamp(-700.0, 700.0)
    k = torch.round(x * _INV_LN2)
    r = x - k * _LN2
    p = torch.full_like(r, _TAYLOR[-1])
    for coefficient in reversed(_TAYLOR[:-1]):
        p = p * r
        p = p + coefficient
    return p * _power_of_two(k)


def exact_sigmoid(x: Tensor) -> Tensor:
    return 1.0 / (1.0 + exact_exp(-x))


def exact_tanh(x: Tensor) -> Tensor:
    return 2.0 * exact_sigmoid(2.0 * x) - 1.0


def _grid(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``x`` rounded onto integers ``q`` with ``x ~= q * 2^e`` and ``|q| <= 2^bits``."""
    largest = x.abs().max()
    if largest == 0:
        return torch.zeros_like(x), torch.zeros((), dtype=_DTYPE)
    _, exponent = torch.frexp(largest)  # largest < 2^exponent, exactly
    e = (exponent - bits).to(_DTYPE)
    return torch.round(x * _power_of_two(-e)), e


def _conv(x: Tensor, conv: nn.Conv2d, padding: tuple[int, int, int, int] | None) -> Tensor:
    """``conv(x)`` with exact integer products and sums (see the module docstring)."""
    weight = conv.weight.detach().to("cpu", _DTYPE)
    fan_in = weight[0].numel()
    bits = int((_EXACT_BITS - math.log2(fan_in)) // 2)
    qx, ex = _grid(x, bits)
    qw, ew = _grid(weight, bits)
    if padding is not None:
        qx = F.pad(qx, padding)
    acc = F.conv2d(qx, qw, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    out = acc * _power_of_two(ex + ew)
    if conv.bias is not None:
        out = out + conv.bias.detach().to("cpu", _DTYPE).view(1, -1, 1, 1)
    return out


def _layer(x: Tensor, layer: nn.Module) -> Tensor:
    if isinstance(layer, nn.Conv2d):
        return _conv(x, layer, None)
    if isinstance(layer, nn.ReLU):
        return x.clamp_min(0.0)
    if isinstance(layer, nn.Sequential) and len(layer) == 2 and isinstance(layer[0], nn.ZeroPad2d):
        return _conv(x, layer[1], tuple(layer[0].padding))  # type: ignore[arg-type]
    raise TypeError(f"no exact evaluation for {type(layer).__name__}")


def _stack(x: Tensor, layers: nn.Sequential) -> Tensor:
    for layer in layers:
        x = _layer(x, layer)
    return x


def _lstm(cell: ConvLSTMCell, x: Tensor, state: LSTMState | None) -> tuple[Tensor, LSTMState]:
    """The ConvLSTM step of :class:`~plvc.layers.ConvLSTMCell` with exact operations."""
    act = exact_tanh if cell.activation == "tanh" else (lambda t: t.clamp_min(0.0))
    if state is None:
        h = c = x.new_zeros((x.shape[0], cell.hidden_channels, *x.shape[-2:]))
    else:
        h, c = (t.to("cpu", _DTYPE) for t in state)
    i, f, o, g = _layer(torch.cat([x, h], dim=1), cell.gates).chunk(4, dim=1)
    c = exact_sigmoid(f) * c + exact_sigmoid(i) * act(g)
    h = exact_sigmoid(o) * act(c)
    return h, (h, c)


def exact_entropy_parameters(
    rpm: nn.Module, scale_table: Tensor, prev_latent: Tensor, state: LSTMState | None
) -> tuple[Tensor, Tensor, LSTMState]:
    """``(means, CDF indexes, new state)`` of the RPM, identical on any machine.

    ``rpm`` is a :class:`~plvc.entropy.RecurrentProbabilityModel` (on any device: its weights
    are read, not moved), ``scale_table`` the Gaussian conditional's table. Means are CPU
    float32, indexes int32 (CompressAI's rule: the number of table scales below the scale),
    the state CPU float64.
    """
    with torch.no_grad(), torch.autocast(device_type="cpu", enabled=False):
        x = prev_latent.detach().to("cpu", _DTYPE)
        hidden, new_state = _lstm(rpm.lstm, _stack(x, rpm.encode), state)
        raw_scales, means = _stack(hidden, rpm.decode).chunk(2, dim=1)
        thresholds = exact_exp(scale_table.detach().to("cpu", _DTYPE)[:-1]).contiguous()
        indexes = torch.searchsorted(thresholds, (1.0 + exact_exp(raw_scales)).contiguous())
    return means.to(torch.float32), indexes.to(torch.int32), new_state
