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


# -- pretrained SpyNet -----------------------------------------------------------------------

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _spynet_reference(state: dict, pyramid: PyramidFlow, ref, target) -> torch.Tensor:
    """SpyNet's own level computation on OUR pyramid and warp: ImageNet-normalised images in
    the order [target, warped ref, flow], each conv on its SpyNet weights (the first one on
    zero-padded [0, 1] images, which is what the folded conv sees at the borders)."""
    levels = pyramid.levels
    first = 6 - levels
    refs, targets = pyramid.pyramid(ref), pyramid.pyramid(target)
    flow = refs[0].new_zeros((ref.shape[0], 2, *refs[0].shape[-2:]))
    for level in range(levels):
        if level > 0:
            flow = 2.0 * torch.nn.functional.interpolate(
                flow, scale_factor=2.0, mode="bilinear", align_corners=False
            )
        warped = warp(refs[level], flow)
        padded = [torch.nn.functional.pad(t, (3, 3, 3, 3)) for t in (targets[level], warped)]
        x = torch.cat(
            [(p - _MEAN) / _STD for p in padded] + [torch.nn.functional.pad(flow, (3, 3, 3, 3))],
            dim=1,
        )
        for rank in range(5):
            key = f"netBasic.{first + level}.netBasic.{2 * rank}"
            x = torch.nn.functional.conv2d(
                x, state[f"{key}.weight"], state[f"{key}.bias"], padding=0 if rank == 0 else 3
            )
            if rank < 4:
                x = torch.relu(x)
        flow = flow + x
    return flow[..., : ref.shape[-2], : ref.shape[-1]]


@pytest.mark.parametrize("levels", [5, 6])
def test_spynet_weights_compute_spynets_flow_on_unnormalised_rgb(
    levels: int, spynet_weights
) -> None:
    """A user starts the flow net from a pretrained SpyNet (train.single_p.flow_weights):
    with the channel order swapped and the normalisation folded in, our network on [0, 1]
    RGB computes exactly what SpyNet computes on its normalised inputs."""
    state = spynet_weights(0)
    net = PyramidFlow(levels=levels)
    net.load_spynet(state)
    torch.manual_seed(1)
    ref, target = torch.rand(1, 3, 48, 80), torch.rand(1, 3, 48, 80)
    with torch.no_grad():
        ours = net(ref, target)
        expected = _spynet_reference(state, net, ref, target)
    assert ours.abs().mean() > 1e-3  # no longer the zero flow of a fresh network
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_spynet_checkpoint_layouts_of_every_port_load_the_same(spynet_weights) -> None:
    """sniklaus's old (moduleBasic) and new (netBasic) keys, BasicSR's wrapped params and
    MMagic's ConvModules (convs numbered 0-4) give the same network."""
    from plvc.flow import spynet_state_dict

    state = spynet_weights(2)
    old = {k.replace("net", "module"): v for k, v in state.items()}
    basicsr = {"params": {k.replace("netBasic", "basic_module"): v for k, v in state.items()}}
    mmagic = {}
    for key, value in state.items():
        level, _, conv, kind = key.split(".")[1:]
        mmagic[f"spynet.basic_module.{level}.basic_module.{int(conv) // 2}.conv.{kind}"] = value
    expected = spynet_state_dict(state, 5)
    for layout in (old, basicsr, mmagic):
        got = spynet_state_dict(layout, 5)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), key


def test_spynet_weights_that_do_not_fit_are_refused_by_name(spynet_weights) -> None:
    from plvc.errors import WeightsError
    from plvc.flow import spynet_state_dict

    tiny = PyramidFlow(levels=3, widths=(8, 16, 8, 8), kernel_size=5)
    with pytest.raises(WeightsError, match=r"level_nets\.0\.net\.0\.weight is \(8, 8, 5, 5\)"):
        tiny.load_spynet(spynet_weights(0))
    with pytest.raises(WeightsError, match=r"not a SpyNet state dict.*conv1\.weight"):
        spynet_state_dict({"conv1.weight": torch.zeros(1)}, 5)
    with pytest.raises(WeightsError, match="have 4 levels; a 5-level"):
        spynet_state_dict(spynet_weights(0, levels=4), 5)
