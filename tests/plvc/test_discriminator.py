from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from plvc.discriminator import DiscriminatorConfig, RecurrentConditionalDiscriminator
from plvc.errors import PLVCError


def _inputs(batch: int = 2, height: int = 64, width: int = 96, latent: int = 32):
    torch.manual_seed(0)
    return (
        torch.rand(batch, 3, height, width),
        torch.rand(batch, 3, height, width),
        torch.randn(batch, 2, height, width),
        torch.randn(batch, latent, height // 16, width // 16),
    )


def _d(config: DiscriminatorConfig) -> RecurrentConditionalDiscriminator:
    torch.manual_seed(0)
    return RecurrentConditionalDiscriminator(config)


def _first_conv(d: RecurrentConditionalDiscriminator) -> torch.nn.Conv2d:
    return d.head[-1] if isinstance(d.head, torch.nn.Sequential) else d.head


def test_paper_layout() -> None:
    d = RecurrentConditionalDiscriminator(DiscriminatorConfig.paper())
    assert d.config.input_channels == 20  # 3 + 3 + 2 + 12
    assert _first_conv(d).in_channels == 20 and _first_conv(d).out_channels == 64
    assert d.lstm.hidden_channels == 64
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [12, 64, 256, 128, 256, 512, 1]
    # spectral norm on every conv, LSTM gates included
    assert all(parametrize.is_parametrized(c, "weight") for c in convs)


def test_logits_shape_state_and_gradients(tiny_d_config: DiscriminatorConfig) -> None:
    d = _d(tiny_d_config)
    x_cur, x_prev, flow, y = _inputs()
    x_cur.requires_grad_()
    logits, state = d(x_cur, x_prev, flow, y, None)
    assert logits.shape == (2, 1, 8, 12)
    assert state is not None and state[0].shape == (2, 8, 32, 48)
    logits.mean().backward()
    assert x_cur.grad is not None and x_cur.grad.abs().sum() > 0
    assert all(p.grad is not None for p in d.parameters())


def test_hidden_state_carries_across_frames(tiny_d_config: DiscriminatorConfig) -> None:
    d = _d(tiny_d_config).eval()
    x_cur, x_prev, flow, y = _inputs()
    with torch.no_grad():
        _, state = d(x_prev, x_cur, flow, y, None)
        with_state, _ = d(x_cur, x_prev, flow, y, state)
        fresh, _ = d(x_cur, x_prev, flow, y, None)
    assert not torch.allclose(with_state, fresh)


def test_ablation_without_hidden_state_ignores_the_past(tiny_d_config: DiscriminatorConfig) -> None:
    config = DiscriminatorConfig.tiny(tiny_d_config.latent_channels, use_hidden_state=False)
    d = _d(config).eval()
    x_cur, x_prev, flow, y = _inputs()
    some_state = (torch.randn(2, 8, 32, 48), torch.randn(2, 8, 32, 48))
    with torch.no_grad():
        a, state = d(x_cur, x_prev, flow, y, some_state)
        b, _ = d(x_cur, x_prev, flow, y, None)
    assert state is None
    assert torch.equal(a, b)


def test_ablation_without_motion_condition_changes_inputs(
    tiny_d_config: DiscriminatorConfig,
) -> None:
    config = DiscriminatorConfig.tiny(
        tiny_d_config.latent_channels, use_hidden_state=False, use_motion_condition=False
    )
    assert config.input_channels == 18
    d = _d(config).eval()
    assert _first_conv(d).in_channels == 18
    x_cur, x_prev, flow, y = _inputs()
    with torch.no_grad():
        a, _ = d(x_cur, x_prev, flow, y, None)
        b, _ = d(x_cur, x_prev, None, y, None)  # the flow is not an input at all
    assert torch.equal(a, b)
    with_motion = _d(tiny_d_config).eval()
    with torch.no_grad():
        c, _ = with_motion(x_cur, x_prev, flow, y, None)
        e, _ = with_motion(x_cur, x_prev, flow * 2, y, None)
    assert not torch.allclose(c, e)
    with pytest.raises(PLVCError, match="flow"):
        with_motion(x_cur, x_prev, None, y, None)


def test_latent_condition_matters_and_is_checked(tiny_d_config: DiscriminatorConfig) -> None:
    d = _d(tiny_d_config).eval()
    x_cur, x_prev, flow, y = _inputs()
    with torch.no_grad():
        a, _ = d(x_cur, x_prev, flow, y, None)
        b, _ = d(x_cur, x_prev, flow, y + 1, None)
    assert not torch.allclose(a, b)
    with pytest.raises(PLVCError, match="condition y"):
        d(x_cur, x_prev, flow, y[:, :5], None)


def test_real_and_fake_in_one_call_match_separate_calls(tiny_d_config: DiscriminatorConfig) -> None:
    d = _d(tiny_d_config).eval()  # eval: no power-iteration update between the calls
    x_cur, x_prev, flow, y = _inputs()
    fake_cur, fake_prev = x_cur.flip(-1), x_prev.flip(-1)
    with torch.no_grad():
        real_state = d(x_prev, x_cur, flow, y, None)[1]
        fake_state = d(fake_prev, fake_cur, flow, y, None)[1]
        r, f, r_state, f_state = d.forward_real_fake(
            (x_cur, x_prev), (fake_cur, fake_prev), flow, y, real_state, fake_state
        )
        r_alone, r_state_alone = d(x_cur, x_prev, flow, y, real_state)
        f_alone, _ = d(fake_cur, fake_prev, flow, y, fake_state)
    torch.testing.assert_close(r, r_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f, f_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r_state[0], r_state_alone[0], rtol=1e-5, atol=1e-5)
    assert f_state is not None


def test_forward_clip_runs_real_and_fake_with_separate_states(
    tiny_d_config: DiscriminatorConfig,
) -> None:
    d = _d(tiny_d_config)
    torch.manual_seed(0)
    frames = torch.rand(2, 4, 3, 64, 96)
    i_frame_hat = frames[:, 0] + 0.01
    x_hat = (frames[:, 1:] + 0.05).requires_grad_()
    flows = [torch.randn(2, 2, 64, 96) for _ in range(3)]
    ys = [torch.randn(2, 32, 4, 6) for _ in range(3)]
    both = d.forward_clip(frames, i_frame_hat, x_hat, flows, ys)
    assert len(both["real"]) == len(both["fake"]) == 3
    assert both["real"][0].shape == (2, 1, 8, 12)
    fake_only = d.forward_clip(frames, i_frame_hat, x_hat, flows, ys, fake_only=True)
    assert fake_only["real"] == [] and len(fake_only["fake"]) == 3
    torch.stack([f.mean() for f in fake_only["fake"]]).sum().backward()
    assert x_hat.grad is not None and x_hat.grad[:, 0].abs().sum() > 0
    with pytest.raises(PLVCError, match="reconstructions"):
        d.forward_clip(frames, i_frame_hat, x_hat[:, :2], flows, ys)


def test_config_round_trip_and_validation() -> None:
    config = DiscriminatorConfig.tiny(use_motion_condition=False)
    assert DiscriminatorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(PLVCError, match="unknown"):
        DiscriminatorConfig.from_dict({"hidden": True})
    with pytest.raises(PLVCError, match="channels"):
        DiscriminatorConfig(channels=(64,))
