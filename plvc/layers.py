"""Building blocks shared by the generator and the discriminator.

- :class:`ConvLSTMCell`: the recurrent cell of the auto-encoders, the RPM and the
  discriminator (paper Figs. 12-13; official code ``rnn_cell.ConvLSTMCell``).
- :class:`PreActResBlock`: the pre-activation residual block of the motion
  compensation network (Fig. 12, "ReLU before Conv").
- :func:`conv` / :func:`deconv`: CompressAI's stride-2 helpers, re-exported.
- :func:`same_conv2d`: TF-style ``"same"`` padding, also for even kernels.
- LSTM-state helpers for batching real and fake samples through one call.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

with warnings.catch_warnings():
    # CompressAI 1.2.8 calls torch.jit.script at import, which torch 2.14 deprecates
    warnings.simplefilter("ignore", FutureWarning)
    from compressai.models.utils import conv, deconv

__all__ = [
    "ACTIVATIONS",
    "ConvLSTMCell",
    "LSTMState",
    "PreActResBlock",
    "cat_states",
    "conv",
    "deconv",
    "detach_state",
    "same_conv2d",
    "split_state",
]

LSTMState = tuple[Tensor, Tensor]
"""``(h, c)`` of a :class:`ConvLSTMCell`, each ``[B, hidden, H, W]``; ``None`` means zeros."""

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"tanh": torch.tanh, "relu": F.relu}

ConvWrapper = Callable[[nn.Conv2d], nn.Module]


def _pad_same(module: nn.Module, kernel_size: int, stride: int) -> nn.Module:
    # TF "same" on inputs divisible by the stride: k - s padding in total, the odd one
    # at the bottom/right
    total = max(kernel_size - stride, 0)
    if total == 0:
        return module
    before, after = total // 2, total - total // 2
    return nn.Sequential(nn.ZeroPad2d((before, after, before, after)), module)


def same_conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    wrap: ConvWrapper | None = None,
) -> nn.Module:
    """A conv with TensorFlow ``"same"`` padding: output = input / stride.

    Needed for the even (4x4) kernels of the discriminator, which PyTorch's own
    ``padding="same"`` does not support with stride 2. Inputs must be divisible by the
    stride. ``wrap`` (e.g. spectral norm) is applied to the conv before padding is added.
    """
    layer: nn.Module = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride)
    if wrap is not None:
        layer = wrap(layer)
    return _pad_same(layer, kernel_size, stride)


class ConvLSTMCell(nn.Module):
    """Convolutional LSTM cell (Shi et al. 2015): one conv over ``[x, h]`` gives the four gates.

    ``forward(x, state) -> (h, (h, c))``; ``state=None`` starts from zeros (a new clip).
    The forget-gate bias starts at 1 so the cell initially keeps its memory (the official
    code adds a constant ``forget_bias=1``; a learnable bias initialised to 1 is the same
    at initialisation). ``activation`` is the cell/output non-linearity: ``"tanh"``
    (standard; RPM and discriminator) or ``"relu"`` (the official PLVC auto-encoders).
    """

    def __init__(
        self,
        input_channels: int,
        hidden_channels: int,
        kernel_size: int = 3,
        activation: str = "tanh",
        wrap: ConvWrapper | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"ConvLSTMCell activation must be one of {sorted(ACTIVATIONS)}")
        self.input_channels = input_channels
        self.hidden_channels = hidden_channels
        self.activation = activation
        self._act = ACTIVATIONS[activation]
        gates = nn.Conv2d(input_channels + hidden_channels, 4 * hidden_channels, kernel_size)
        with torch.no_grad():
            gates.bias.zero_()
            gates.bias[hidden_channels : 2 * hidden_channels].fill_(1.0)
        self.gates = _pad_same(wrap(gates) if wrap is not None else gates, kernel_size, 1)

    def initial_state(self, x: Tensor) -> LSTMState:
        """Zero ``(h, c)`` matching ``x``'s batch, size, dtype and device."""
        b, _, h, w = x.shape
        zeros = x.new_zeros((b, self.hidden_channels, h, w))
        return zeros, zeros

    def forward(self, x: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        if state is None:
            state = self.initial_state(x)
        h, c = state
        if h.shape[0] != x.shape[0] or h.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"ConvLSTM state of shape {tuple(h.shape)} does not fit input {tuple(x.shape)}"
            )
        i, f, o, g = self.gates(torch.cat([x, h.to(x.dtype)], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * self._act(g)
        h = torch.sigmoid(o) * self._act(c)
        return h, (h, c)


class PreActResBlock(nn.Module):
    """``x + conv(relu(conv(relu(x))))`` with 3x3 convs (official ``MC_network.resblock``)."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def cat_states(states: Sequence[LSTMState | None], like: Sequence[Tensor]) -> LSTMState | None:
    """Concatenate LSTM states along the batch (e.g. real and fake for one D call).

    ``like[k]`` is the input the k-th state belongs to; a ``None`` state is replaced by
    zeros shaped after it only when some other state is not ``None``.
    """
    if all(s is None for s in states):
        return None
    filled: list[LSTMState] = []
    for state, ref in zip(states, like, strict=True):
        if state is None:
            raise ValueError("cannot mix a None state with a non-None state; pass zeros instead")
        if state[0].shape[0] != ref.shape[0]:
            raise ValueError("state batch size does not match its input")
        filled.append(state)
    return torch.cat([s[0] for s in filled]), torch.cat([s[1] for s in filled])


def split_state(state: LSTMState | None, sizes: Sequence[int]) -> list[LSTMState | None]:
    """Inverse of :func:`cat_states`: split ``(h, c)`` along the batch into ``sizes``."""
    if state is None:
        return [None] * len(sizes)
    hs = torch.split(state[0], list(sizes))
    cs = torch.split(state[1], list(sizes))
    return list(zip(hs, cs, strict=True))


def detach_state(state: LSTMState | None) -> LSTMState | None:
    """``(h, c)`` cut from the autograd graph (truncated back-propagation through time)."""
    if state is None:
        return None
    return state[0].detach(), state[1].detach()
