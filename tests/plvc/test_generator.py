from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from compressai.models.base import get_scale_table

from plvc.errors import BitstreamError, PLVCError
from plvc.generator import PLVC, GeneratorState, PLVCConfig, bits_from_likelihoods

REPO = Path(__file__).resolve().parents[2]

# Estimated (sum of -log2 p) vs actual rANS bits: the coder adds a few bytes per string and
# the Gaussian tables quantise each scale up to the next of 64 table scales (costing a few
# % for sharp distributions); 15% + 8 bytes per string bounds both on a 144x176 frame.
BITS_REL_TOL = 0.15
BITS_OVERHEAD_PER_STRING = 64


def _clip(frames: torch.Tensor, count: int, height: int = 64, width: int = 96) -> torch.Tensor:
    return frames[:count, :, :height, :width].unsqueeze(0)


def test_paper_config_defaults_and_dict_round_trip() -> None:
    paper = PLVCConfig.paper()
    assert (paper.channels, paper.latent_channels, paper.mc_channels) == (128, 128, 64)
    assert (paper.flow_levels, paper.flow_widths, paper.flow_kernel) == (5, (32, 64, 32, 16), 7)
    assert (paper.motion_kernel, paper.residual_kernel) == (3, 5)
    for config in (paper, PLVCConfig.tiny()):
        assert PLVCConfig.from_dict(config.to_dict()) == config
    with pytest.raises(PLVCError, match=r"unknown PLVCConfig key.*widht"):
        PLVCConfig.from_dict({"widht": 3})
    with pytest.raises(PLVCError, match="latent_channels"):
        PLVCConfig(latent_channels=0)
    with pytest.raises(PLVCError, match="quantizer"):
        PLVCConfig(quantizer="round")


def test_forward_pframe_outputs(tiny_model: PLVC, carphone: torch.Tensor) -> None:
    clip = _clip(carphone, 2).expand(2, -1, -1, -1, -1)
    x_ref, x = clip[:, 0], clip[:, 1]
    out = tiny_model.forward_pframe(x, x_ref, None)
    m = tiny_model.config.latent_channels
    assert out["x_hat"].shape == x.shape
    for key in ("flow", "flow_hat"):
        assert out[key].shape == (2, 2, 64, 96)
    for key in ("x_warp", "x_mc"):
        assert out[key].shape == x.shape
    assert out["y_motion"].shape == out["y_residual"].shape == (2, m, 4, 6)
    assert torch.equal(out["y"], torch.cat([out["y_motion"], out["y_residual"]], dim=1))
    assert set(out["likelihoods"]) == {"motion", "residual"}
    assert out["likelihoods"]["motion"].shape == (2, m, 4, 6)
    state = out["state"]
    assert isinstance(state, GeneratorState) and state.frame_index == 1
    assert state.motion_rpm is None  # the first P-frame used the factorized bottleneck
    out2 = tiny_model.forward_pframe(clip[:, 1], out["x_hat"], state)
    assert out2["state"].frame_index == 2 and out2["state"].motion_rpm is not None


def test_gradients_reach_every_generator_part(tiny_model: PLVC, carphone: torch.Tensor) -> None:
    clip = _clip(carphone, 3)
    out = tiny_model(clip, clip[:, 0])
    loss = out["x_hat"].sub(clip[:, 1:]).square().mean() + sum(
        bits_from_likelihoods(lik) for lik in out["likelihoods"]
    )
    loss.backward()
    for name, part in tiny_model.parts().items():
        grads = [p.grad for n, p in part.named_parameters() if not n.endswith("quantiles")]
        assert all(g is not None for g in grads), name
        assert sum(g.abs().sum().item() for g in grads) > 0, name


def test_recurrent_state_carries_gradient_across_frames(
    tiny_model: PLVC, carphone: torch.Tensor
) -> None:
    clip = _clip(carphone, 3)
    first = tiny_model.forward_pframe(clip[:, 1], clip[:, 0], None)
    # the reference is detached: only the recurrent state links the two frames
    second = tiny_model.forward_pframe(clip[:, 2], first["x_hat"].detach(), first["state"])
    loss = second["x_hat"].sub(clip[:, 2]).square().mean() + bits_from_likelihoods(
        second["likelihoods"]
    )
    state = first["state"]
    carried = {
        "motion_encoder.h": state.motion_encoder[0],
        "motion_decoder.h": state.motion_decoder[0],
        "residual_encoder.c": state.residual_encoder[1],
        "residual_decoder.c": state.residual_decoder[1],
        "prev_y_motion": state.prev_y_motion,
        "prev_y_residual": state.prev_y_residual,
    }
    grads = torch.autograd.grad(loss, list(carried.values()))
    for name, grad in zip(carried, grads, strict=True):
        assert grad.abs().sum() > 0, name
    detached = state.detach()
    assert all(t.grad_fn is None for t in detached.tensors())


def test_clip_forward_backpropagates_to_the_first_pframe(
    tiny_model: PLVC, carphone: torch.Tensor
) -> None:
    clip = _clip(carphone, 4)
    out = tiny_model(clip, clip[:, 0])
    assert out["x_hat"].shape == (1, 3, 3, 64, 96)
    assert len(out["likelihoods"]) == len(out["y"]) == len(out["flow"]) == 3
    assert out["state"].frame_index == 3
    last_frame_loss = out["x_hat"][:, -1].sub(clip[:, -1]).square().mean()
    flow_grad, mc_grad = torch.autograd.grad(last_frame_loss, [out["flow"][0], out["x_mc"][0]])
    assert flow_grad.abs().sum() > 0 and mc_grad.abs().sum() > 0


def test_state_none_resets_the_clip(tiny_model: PLVC, carphone: torch.Tensor) -> None:
    tiny_model.eval()
    clip = _clip(carphone, 3)
    with torch.no_grad():
        a = tiny_model(clip, clip[:, 0])
        b = tiny_model(clip, clip[:, 0])
        fresh = tiny_model.forward_pframe(clip[:, 2], a["x_hat"][:, 0], None)
    assert torch.equal(a["x_hat"], b["x_hat"])  # nothing leaks from one clip to the next
    # frame 2 coded with the carried state differs from frame 2 coded as a first P-frame
    assert not torch.equal(fresh["x_hat"], a["x_hat"][:, 1])


def test_bad_inputs_are_named(tiny_model: PLVC, carphone: torch.Tensor) -> None:
    clip = _clip(carphone, 2)
    with pytest.raises(PLVCError, match="multiple of 16"):
        tiny_model.forward_pframe(clip[:, 1, :, :60], clip[:, 0, :, :60], None)
    with pytest.raises(PLVCError, match="differ"):
        tiny_model.forward_pframe(clip[:, 1], clip[:, 0, :, :48], None)
    state = tiny_model.forward_pframe(clip[:, 1], clip[:, 0], None)["state"]
    big = carphone[:2, :, :128, :128].unsqueeze(0)
    with pytest.raises(PLVCError, match="state=None"):
        tiny_model.forward_pframe(big[:, 1], big[:, 0], state)
    with pytest.raises(PLVCError, match=r"T >= 2"):
        tiny_model(clip[:, :1], clip[:, 0])
    with pytest.raises(PLVCError, match="update"):
        tiny_model.compress_pframe(clip[:, 1], clip[:, 0], None)


def test_parameter_groups_split_main_and_aux(tiny_model: PLVC) -> None:
    groups = tiny_model.parameter_groups()
    aux_ids = {id(p) for p in groups["aux"]}
    main_ids = {id(p) for p in groups["main"]}
    assert len(groups["aux"]) == 2  # one quantiles tensor per bottleneck
    assert not aux_ids & main_ids
    assert aux_ids | main_ids == {id(p) for p in tiny_model.parameters()}
    aux = tiny_model.aux_loss()
    aux.backward()
    assert all(p.grad is not None for p in groups["aux"])


def _encode(
    model: PLVC, clip: torch.Tensor
) -> list[tuple[list[bytes], tuple[int, int], torch.Tensor]]:
    coded, ref, state = [], clip[:, 0], None
    for t in range(1, clip.shape[1]):
        strings, shape, x_hat, state = model.compress_pframe(clip[:, t], ref, state)
        coded.append((strings, shape, x_hat))
        ref = x_hat
    return coded


def test_compress_decompress_is_bit_exact_in_process(
    tiny_model: PLVC, carphone: torch.Tensor
) -> None:
    tiny_model.eval()
    assert tiny_model.update() is True
    assert tiny_model.update() is False  # tables exist; force=True rebuilds them
    clip = _clip(carphone, 4)
    coded = _encode(tiny_model, clip)
    ref, state = clip[:, 0], None
    for strings, shape, expected in coded:
        assert shape == (4, 6) and all(isinstance(s, bytes) and s for s in strings)
        x_hat, state = tiny_model.decompress_pframe(strings, shape, ref, state)
        assert torch.equal(x_hat, expected)
        assert x_hat.min() >= 0 and x_hat.max() <= 1
        ref = x_hat
    assert state.frame_index == 3 and state.motion_encoder is None
    with pytest.raises(BitstreamError, match="latent size"):
        tiny_model.decompress_pframe(coded[0][0], (5, 6), clip[:, 0], None)
    with pytest.raises(BitstreamError, match="two strings"):
        tiny_model.decompress_pframe(coded[0][0][:1], (4, 6), clip[:, 0], None)


DECODER_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from plvc.generator import PLVC, PLVCConfig

    torch.manual_seed(12345)  # a different initialisation: everything must come from the file
    data = torch.load(sys.argv[1], weights_only=True)
    model = PLVC(PLVCConfig.from_dict(data["config"]))
    model.load_state_dict(data["state_dict"])
    model.eval()
    for threads in (1, 2):  # the encoder ran with one intra-op thread
        torch.set_num_threads(threads)
        ref, state = data["i_frame"], None
        for index, (strings, shape, expected) in enumerate(data["frames"]):
            x_hat, state = model.decompress_pframe(list(strings), tuple(shape), ref, state)
            if not torch.equal(x_hat, expected):
                diff = (x_hat - expected).abs().max().item()
                print(f"{threads} threads: P-frame {index + 1} differs, max abs diff {diff}")
                sys.exit(1)
            ref = x_hat
    print("decoded", len(data["frames"]), "P-frames bit-exactly")
    """
)


def test_decoding_in_another_process_is_bit_exact(
    tiny_model: PLVC, carphone: torch.Tensor, tmp_path: Path
) -> None:
    tiny_model.eval()
    tiny_model.update()
    clip = _clip(carphone, 4)
    coded = _encode(tiny_model, clip)
    payload = {
        "config": tiny_model.config.to_dict(),
        "state_dict": tiny_model.state_dict(),
        "i_frame": clip[:, 0].clone(),
        "frames": [(strings, list(shape), x_hat) for strings, shape, x_hat in coded],
    }
    torch.save(payload, tmp_path / "coded.pt")
    (tmp_path / "decode.py").write_text(DECODER_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "decode.py"), str(tmp_path / "coded.pt")],
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bit-exactly" in result.stdout


def test_estimated_bits_match_actual_bytes(tiny_model: PLVC, carphone: torch.Tensor) -> None:
    tiny_model.eval()
    tiny_model.update()
    clip = carphone[:4].unsqueeze(0)  # full 144x176 frames
    ref, state, est_ref, est_state = clip[:, 0], None, clip[:, 0], None
    for t in range(1, clip.shape[1]):
        with torch.no_grad():
            out = tiny_model.forward_pframe(clip[:, t], est_ref, est_state)
        strings, _, x_hat, state = tiny_model.compress_pframe(clip[:, t], ref, state)
        for name, string in zip(("motion", "residual"), strings, strict=True):
            estimated = bits_from_likelihoods(out["likelihoods"][name]).item()
            actual = 8 * len(string)
            assert abs(actual - estimated) <= BITS_REL_TOL * estimated + BITS_OVERHEAD_PER_STRING, (
                t,
                name,
                estimated,
                actual,
            )
        ref, est_ref, est_state = x_hat, out["x_hat"], out["state"]


def test_state_dict_carries_the_entropy_tables(tiny_model: PLVC) -> None:
    tiny_model.update()
    fresh = PLVC(tiny_model.config)
    assert not fresh.motion_entropy.is_updated()
    fresh.load_state_dict(tiny_model.state_dict())
    assert fresh.motion_entropy.is_updated() and fresh.residual_entropy.is_updated()
    for name, buffer in tiny_model.named_buffers():
        assert torch.equal(dict(fresh.named_buffers())[name], buffer), name
    # a model that already built other tables takes the saved ones
    other = PLVC(tiny_model.config)
    other.update(scale_table=get_scale_table(0.2, 64, 16))
    other.load_state_dict(tiny_model.state_dict())
    assert torch.equal(other.residual_entropy.gaussian.scale_table, get_scale_table())


def test_bf16_autocast_training_and_precision_independent_coding(
    tiny_model: PLVC, carphone: torch.Tensor
) -> None:
    clip = _clip(carphone, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(clip, clip[:, 0])
        loss = out["x_hat"].float().sub(clip[:, 1:]).square().mean() + sum(
            bits_from_likelihoods(lik) for lik in out["likelihoods"]
        )
    assert out["likelihoods"][0]["motion"].dtype == torch.float32  # rates stay in float32
    assert torch.isfinite(loss)
    loss.backward()
    tiny_model.eval()
    tiny_model.update()
    plain = tiny_model.compress_pframe(clip[:, 1], clip[:, 0], None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = tiny_model.compress_pframe(clip[:, 1], clip[:, 0], None)
    assert plain[0] == under_autocast[0]
    assert torch.equal(plain[2], under_autocast[2])
