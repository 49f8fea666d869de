from __future__ import annotations

import pytest
import torch

from plvc.flow import PyramidFlow, warp
from plvc.losses import flow_warp_loss


def _constant_flow(
    batch: int, height: int, width: int, dx: float, dy: float, dtype
) -> torch.Tensor:
    flow = torch.empty(batch, 2, height, width, dtype=dtype)
    flow[:, 0] = dx
    flow[:, 1] = dy
    return flow


@pytest.mark.parametrize(("height", "width"), [(48, 80), (64, 96), (37, 23), (144, 176)])
@pytest.mark.parametrize(("dx", "dy"), [(3, -2), (-5, 1), (0, 4)])
def test_integer_shift_moves_content_exactly(height: int, width: int, dx: int, dy: int) -> None:
    torch.manual_seed(0)
    image = torch.rand(2, 3, height, width, dtype=torch.float64)
    out = warp(image, _constant_flow(2, height, width, dx, dy, torch.float64))
    # out[y, x] = image[y + dy, x + dx] wherever the source pixel exists
    ys = slice(max(0, -dy), height - max(0, dy))
    xs = slice(max(0, -dx), width - max(0, dx))
    src_ys = slice(ys.start + dy, ys.stop + dy)
    src_xs = slice(xs.start + dx, xs.stop + dx)
    torch.testing.assert_close(out[..., ys, xs], image[..., src_ys, src_xs], rtol=0, atol=1e-12)
    # float32 too: exact up to float32 rounding of the normalised coordinate
    out32 = warp(image.float(), _constant_flow(2, height, width, dx, dy, torch.float32))
    torch.testing.assert_close(
        out32[..., ys, xs], image[..., src_ys, src_xs].float(), rtol=0, atol=2e-5
    )


def test_half_pixel_shift_interpolates_and_border_replicates() -> None:
    image = torch.arange(6, dtype=torch.float64).view(1, 1, 1, 6).expand(1, 1, 4, 6).contiguous()
    out = warp(image, _constant_flow(1, 4, 6, 0.5, 0.0, torch.float64))
    torch.testing.assert_close(out[0, 0, 0, :5], torch.arange(5, dtype=torch.float64) + 0.5)
    assert out[0, 0, 0, 5].item() == 5.0  # border padding: beyond the edge reads the edge
    far = warp(image, _constant_flow(1, 4, 6, -100.0, 0.0, torch.float64))
    assert torch.all(far == 0.0)


def test_warp_zero_flow_is_identity_and_per_pixel_flow_works() -> None:
    torch.manual_seed(0)
    image = torch.rand(1, 3, 16, 24)
    assert torch.allclose(warp(image, torch.zeros(1, 2, 16, 24)), image, atol=1e-6)
    flow = torch.zeros(1, 2, 16, 24)
    flow[:, 0, :, 12:] = 2.0  # only the right half moves
    out = warp(image, flow)
    torch.testing.assert_close(out[..., :12], image[..., :12], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[..., 12:22], image[..., 14:24], rtol=0, atol=1e-5)


def test_warp_under_bf16_autocast_keeps_full_precision_coordinates() -> None:
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 96)
    flow = _constant_flow(1, 64, 96, 7, 3, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = warp(image, flow)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[..., :61, :89], image[..., 3:, 7:], rtol=0, atol=2e-5)


def test_warp_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="flow"):
        warp(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="differ"):
        warp(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 9))


@pytest.mark.parametrize(("height", "width"), [(64, 96), (50, 70)])
def test_pyramid_flow_shapes_padding_and_zero_start(height: int, width: int) -> None:
    torch.manual_seed(0)
    net = PyramidFlow(levels=3, widths=(8, 8), kernel_size=3)
    ref, target = torch.rand(2, 3, height, width), torch.rand(2, 3, height, width)
    flows = net.forward_pyramid(ref, target)
    assert len(flows) == 3
    assert flows[-1].shape == (2, 2, height, width)
    # the untrained network predicts no motion instead of a random warp
    assert torch.equal(flows[-1], torch.zeros_like(flows[-1]))


def test_pyramid_flow_learns_a_global_shift() -> None:
    """Self-supervised warping loss (official code's flow training) recovers a real motion."""
    torch.manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 40, 56), 3, 1, 1)
    ref = base[..., 4:36, 4:52]
    target = base[..., 4:36, 5:53]  # target[x] = ref[x + 1]: the flow should be dx = +1
    net = PyramidFlow(levels=2, widths=(8, 8), kernel_size=5)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(80):
        loss = flow_warp_loss(net, ref, target)["loss"]
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flow = net(ref, target).detach()
    assert loss.item() < first / 3
    interior = flow[..., 4:-4, 4:-4]
    assert abs(interior[:, 0].mean().item() - 1.0) < 0.3
    assert abs(interior[:, 1].mean().item()) < 0.3
