from __future__ import annotations

import pytest
import torch

from plvc.layers import (
    ConvLSTMCell,
    PreActResBlock,
    cat_states,
    detach_state,
    same_conv2d,
    split_state,
)


def test_convlstm_shapes_and_zero_state_default() -> None:
    torch.manual_seed(0)
    cell = ConvLSTMCell(5, 7, kernel_size=3)
    x = torch.randn(2, 5, 12, 20)
    out, (h, c) = cell(x, None)
    assert out.shape == h.shape == c.shape == (2, 7, 12, 20)
    assert torch.equal(out, h)
    zeros = torch.zeros(2, 7, 12, 20)
    out_zero, _ = cell(x, (zeros, zeros))
    assert torch.equal(out, out_zero)


def test_convlstm_forget_bias_starts_at_one() -> None:
    cell = ConvLSTMCell(3, 4)
    bias = cell.gates.bias if hasattr(cell.gates, "bias") else cell.gates[-1].bias
    assert torch.equal(bias[4:8], torch.ones(4))
    assert torch.equal(bias[:4], torch.zeros(4))
    assert torch.equal(bias[8:], torch.zeros(8))


@pytest.mark.parametrize("kernel_size", [3, 4, 5])
def test_convlstm_state_carries_information_and_gradient(kernel_size: int) -> None:
    torch.manual_seed(0)
    cell = ConvLSTMCell(3, 4, kernel_size=kernel_size, activation="relu")
    x1 = torch.randn(1, 3, 8, 8, requires_grad=True)
    x2 = torch.randn(1, 3, 8, 8)
    _, state = cell(x1, None)
    carried, _ = cell(x2, state)
    fresh, _ = cell(x2, None)
    assert carried.shape == (1, 4, 8, 8)
    assert not torch.allclose(carried, fresh)
    (grad,) = torch.autograd.grad(carried.sum(), x1)
    assert grad.abs().sum() > 0
    detached = detach_state(state)
    assert detached is not None and detached[0].grad_fn is None


def test_convlstm_rejects_mismatched_state() -> None:
    cell = ConvLSTMCell(3, 4)
    _, state = cell(torch.randn(1, 3, 8, 8), None)
    with pytest.raises(ValueError, match="does not fit"):
        cell(torch.randn(1, 3, 16, 8), state)
    with pytest.raises(ValueError, match="activation"):
        ConvLSTMCell(3, 4, activation="gelu")


def test_preact_resblock_is_residual_and_differentiable() -> None:
    block = PreActResBlock(6)
    for conv in (block.conv1, block.conv2):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    x = torch.randn(2, 6, 10, 14, requires_grad=True)
    assert torch.equal(block(x), x)
    torch.manual_seed(0)
    block = PreActResBlock(6)
    block(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


@pytest.mark.parametrize(
    ("kernel", "stride", "expected"), [(4, 2, (32, 48)), (4, 1, (64, 96)), (3, 1, (64, 96))]
)
def test_same_conv2d_output_size(kernel: int, stride: int, expected: tuple[int, int]) -> None:
    layer = same_conv2d(3, 5, kernel, stride)
    assert layer(torch.randn(1, 3, 64, 96)).shape[-2:] == expected


def test_cat_and_split_states_round_trip() -> None:
    a = (torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5))
    b = (torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5))
    like = [torch.empty(2, 1, 5, 5), torch.empty(3, 1, 5, 5)]
    joined = cat_states([a, b], like)
    assert joined is not None and joined[0].shape[0] == 5
    back_a, back_b = split_state(joined, [2, 3])
    assert back_a is not None and back_b is not None
    assert torch.equal(back_a[0], a[0]) and torch.equal(back_b[1], b[1])
    assert cat_states([None, None], like) is None
    assert split_state(None, [2, 3]) == [None, None]
    with pytest.raises(ValueError, match="mix"):
        cat_states([a, None], like)
