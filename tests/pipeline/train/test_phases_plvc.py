"""PLVC's training phases (eqs. 4-6): Ray Train runs with 2 CPU workers (single-P with its
warm-up sub-phases, then GAN from its export; multi-P runs in the stage test) on tiny
models, and one-process checks of what each phase computes."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import (
    GanConfig,
    Params,
    RunnerConfig,
    SinglePConfig,
    TrackingConfig,
    TrainConfig,
)
from pipeline.tracking import stage_run
from pipeline.train import worker as worker_module
from pipeline.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from pipeline.train.phase import DataError, RunnerError
from pipeline.train.phases.plvc import GanPhase, MultiPPhase, SinglePPhase, build_phase
from pipeline.train.phases.plvc_models import (
    ClipBatch,
    clip_temporal_profiles,
    discriminator_config,
    load_discriminator,
)
from pipeline.train.runner import run_phase
from pipeline.train.stepper import PhaseStepper
from pipeline.train.worker import autocast_dtype
from plvc.generator import PLVC, PLVCConfig
from plvc.losses import frame_rates, mse_per_frame
from plvc.weights import load_weights

SIZE, CLIPS = 32, 12
TINY = PLVCConfig.tiny()
TINY_D = discriminator_config("tiny", TINY).to_dict()


def _clip_arrays(seed: int, frames: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A textured square moving one pixel per frame, and a noisy copy of frame 1 as the
    'decoded' I-frame."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, size=(SIZE + frames, SIZE + frames, 3))
    clip = np.stack([texture[t : t + SIZE, t : t + SIZE] for t in range(frames)])
    iframe = np.clip(clip[0] + rng.integers(-6, 7, size=clip[0].shape), 0, 255)
    return clip.astype(np.uint8), iframe.astype(np.uint8)


def _rows() -> list[dict[str, Any]]:
    rows = []
    for i in range(CLIPS):
        frames, iframe = _clip_arrays(i)
        rows.append({"clip_id": f"{i:05d}/0001", "frames": frames, "iframe": iframe})
    return rows


def _batch(batch: int = 2, frames: int = 4, seed: int = 0) -> ClipBatch:
    arrays = [_clip_arrays(seed + i, frames) for i in range(batch)]
    phase = MultiPPhase(crop=SIZE, num_pframes=frames - 1)
    return phase.prepare_batch(
        {"frames": np.stack([a[0] for a in arrays]), "iframe": np.stack([a[1] for a in arrays])},
        torch.device("cpu"),
    )


def _params(tmp_path: Path, **train: Any) -> Params:
    return Params(
        tracking=TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="phases"),
        runner=RunnerConfig(
            num_workers=2,
            cpus_per_worker=0.5,
            storage_path=str(tmp_path / "ray_results"),
            checkpoint_every=2,
            log_every=2,
            image_every=2,
        ),
        train=TrainConfig(model="tiny", discriminator="tiny", **train),
    )


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.named_parameters() if not torch.equal(before[k], v)}


# ----------------------------------------------------------------------------- with Ray


@pytest.fixture
def own_mlflow_store() -> Any:
    """stage_run points MLflow (and MLFLOW_TRACKING_URI, which mlflow sets) at the test's
    store; later tests must not inherit it."""
    yield
    mlflow.set_tracking_uri(None)


@pytest.mark.ray
def test_phases_chain_on_two_workers_and_export_loadable_weights(
    tmp_path: Path, ray_local: None, own_mlflow_store: None
) -> None:
    import ray.data

    params = _params(tmp_path)
    datasets = {"train": ray.data.from_items(_rows())}
    common = {"crop": SIZE, "batch_size": 2, "lr": 1e-3, "model": TINY.to_dict()}
    models = tmp_path / "models"

    # eq. 4 with both warm-up sub-phases: DDP must cope with weights that get no gradient
    single = SinglePPhase(**common, flow_steps=1, mc_steps=1)
    first = run_phase(
        single,
        params,
        stage="train_single_p",
        run_name="single-low",
        datasets=datasets,
        max_steps=3,
        init_weights=None,
        export_dir=models / "single_p",
    )
    assert first["steps"] == 3 and first["world_size"] == 2
    model, meta = load_weights(models / "single_p" / "generator.pt")
    assert meta.config == TINY and meta.extra["phase"] == "single_p"
    assert model.motion_entropy.is_updated()  # tables saved: the weights can code video
    assert {"train/warmup/full", "train/rate_bpp", "train/psnr"} <= set(first["final_metrics"])

    # eq. 5 reads the single-P export (its Ray run is in the stage test)
    multi = MultiPPhase(**common, num_pframes=3)
    fresh = multi.build_models()
    multi.apply_init_weights(fresh, multi.read_init_weights(models / "single_p"))
    loaded = fresh.generator.plvc.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())

    # eq. 6 (the same generator format: here straight from the single-P export), into an
    # MLflow run
    gan = GanPhase(**common, num_pframes=3, discriminator=TINY_D, lr_d=1e-3)
    with stage_run("train_gan", params, run_name="train_gan-low") as run:
        third = run_phase(
            gan,
            params,
            stage="train_gan",
            run_name="gan-low",
            datasets=datasets,
            max_steps=2,
            init_weights=models / "single_p",
            export_dir=models / "gan",
        )
    files = sorted(p.name for p in (models / "gan").iterdir())
    assert files == ["discriminator.pt", "generator.pt", "result.json"]
    load_weights(models / "gan" / "generator.pt")
    d = load_discriminator(models / "gan" / "discriminator.pt")
    assert d.config.use_hidden_state and d.config.latent_channels == 2 * TINY.latent_channels
    final = third["final_metrics"]
    for key in (
        "train/d_loss",
        "train/d_real",
        "train/d_fake",
        "train/d_real/p3",
        "train/d_fake/p1",
        "train/alpha1_active",
        "train/alpha1_active/p2",
        "train/adversarial/p3",
        "train/rate_term",
        "train/distortion_term",
        "train/adversarial_term",
        "lr/discriminator",
        "perf/clips_per_s_per_worker",
    ):
        assert key in final, key
    assert 0.0 <= final["train/d_real"] <= 1.0 and 0.0 <= final["train/alpha1_active"] <= 1.0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/d_fake/p2")]
    assert steps == [2]
    images = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert any("temporal_profile" in p for p in images), images
    assert any("reconstruction" in p for p in images), images
    result = json.loads((models / "gan" / "result.json").read_text())
    assert result["phase_config"]["num_pframes"] == 3


# ----------------------------------------------------------------------------- one process


def test_single_p_warmup_trains_only_its_sub_phase_weights() -> None:
    torch.manual_seed(0)
    phase = SinglePPhase(crop=SIZE, batch_size=2, lr=1e-3, flow_steps=1, mc_steps=1)
    assert [phase.warmup_stage(s) for s in (1, 2, 3, 9)] == ["flow", "mc", "full", "full"]
    models = phase.build_models()
    stepper = PhaseStepper(phase, models, phase.build_optimizers(models), grad_clip=None)
    plvc = models.generator.plvc
    batch = _batch(frames=2)

    def parts_changed(step: int) -> set[str]:
        before = _snapshot(plvc)
        terms = stepper.step(batch, step)
        assert terms[f"warmup/{phase.warmup_stage(step)}"] == 1.0
        return {k.split(".")[0] for k in _changed(before, plvc) if not k.endswith("quantiles")}

    flow_parts = {"motion_estimation", "motion_encoder", "motion_decoder", "motion_entropy"}
    assert parts_changed(1) == flow_parts
    assert parts_changed(2) == flow_parts | {"motion_compensation"}
    changed = parts_changed(3)
    assert {"residual_encoder", "residual_decoder", "residual_entropy"} <= changed
    # the RPMs cannot learn from one P-frame: frozen, never updated
    assert not any(p.requires_grad for p in plvc.motion_entropy.rpm.parameters())


def test_single_p_starts_its_flow_net_from_spynet_weights(tmp_path: Path, spynet_weights) -> None:
    """train.single_p.flow_weights: the paper model's flow net starts from a pretrained
    SpyNet. The weights are read on the driver and travel with the pickled phase (a worker on
    another node never opens the file); a missing file or a model they do not fit is a
    RunnerError naming the param."""
    from plvc.flow import spynet_state_dict

    file = tmp_path / "network-sintel-final.pytorch"
    torch.save(spynet_weights(0), file)
    single_p = SinglePConfig(steps=10, lr=1e-4, flow_steps=2, flow_weights=file)
    phase = build_phase(
        "single_p", Params(train=TrainConfig(model="paper", single_p=single_p)), "low"
    )
    file.unlink()  # what a worker sees: no file, only the pickled phase
    worker_phase = pickle.loads(pickle.dumps(phase))
    flow = worker_phase.build_models().generator.plvc.motion_estimation
    expected = spynet_state_dict(spynet_weights(0), levels=5)
    assert flow.state_dict().keys() == expected.keys()
    for key, value in flow.state_dict().items():
        assert torch.equal(value, expected[key]), key
    ref = torch.rand(1, 3, 64, 64)
    assert flow(ref, ref.roll(2, dims=-1)).abs().mean() > 1e-3  # not the untrained zero flow

    with pytest.raises(RunnerError, match=r"train\.single_p\.flow_weights = .*no such file"):
        build_phase("single_p", Params(train=TrainConfig(model="paper", single_p=single_p)), "low")
    torch.save(spynet_weights(0), file)
    tiny = TrainConfig(model="tiny", single_p=single_p)
    with pytest.raises(RunnerError, match=r"train\.single_p\.flow_weights = .*do not fit"):
        build_phase("single_p", Params(train=tiny), "low")


def test_bf16_autocast_follows_the_models_device() -> None:
    """runner.bf16 on a GPU, or benchmarks.bf16_gap on the CPU: the stepper autocasts on the
    device the models are on; the rate stays float32 (entropy models outside autocast)."""
    batch = _batch(frames=2)
    for dtype, expected in ((None, torch.float32), (torch.bfloat16, torch.bfloat16)):
        torch.manual_seed(0)
        phase = SinglePPhase(crop=SIZE, batch_size=2, lr=1e-3)
        models = phase.build_models()
        stepper = PhaseStepper(
            phase, models, phase.build_optimizers(models), grad_clip=None, autocast_dtype=dtype
        )
        outputs = stepper.forward(batch, 1)
        assert outputs["x_hat"].dtype == expected
        assert all(lik.dtype == torch.float32 for lik in outputs["likelihoods"][0].values())
        terms = stepper.step(batch, 1)
        assert torch.isfinite(terms["loss"])


def test_training_autocast_follows_the_device_and_the_cpus_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """runner.bf16 acts on GPUs; runner.cpu_bf16 on CPUs with native bf16 only (emulated bf16
    would be slower than float32)."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype(gpu, gpu_bf16=True, cpu_bf16=False) is torch.bfloat16
    assert autocast_dtype(gpu, gpu_bf16=False, cpu_bf16=True) is None
    assert autocast_dtype(cpu, gpu_bf16=True, cpu_bf16=False) is None
    monkeypatch.setattr(worker_module, "native_cpu_bf16", lambda: True)
    assert autocast_dtype(cpu, gpu_bf16=False, cpu_bf16=True) is torch.bfloat16
    monkeypatch.setattr(worker_module, "native_cpu_bf16", lambda: False)
    assert autocast_dtype(cpu, gpu_bf16=True, cpu_bf16=True) is None


def test_channels_last_and_bf16_training_learn_like_float32() -> None:
    """The sample's runner.channels_last and runner.cpu_bf16: the loss falls as in float32
    NCHW (channels-last float32: the same numbers up to rounding), and channels-last weights
    load into a plain model that reconstructs alike."""
    batch = _batch(frames=2)
    losses: dict[str, list[float]] = {}
    trained: dict[str, torch.nn.Module] = {}
    settings = {
        "float32": (torch.contiguous_format, None),
        "channels_last": (torch.channels_last, None),
        "channels_last_bf16": (torch.channels_last, torch.bfloat16),
    }
    for name, (layout, dtype) in settings.items():
        torch.manual_seed(0)
        phase = SinglePPhase(crop=SIZE, batch_size=2, lr=1e-3)
        models = phase.build_models()
        models.generator.to(memory_format=layout)
        stepper = PhaseStepper(
            phase, models, phase.build_optimizers(models), grad_clip=1.0, autocast_dtype=dtype
        )
        losses[name] = [float(stepper.step(batch, step)["loss"]) for step in range(1, 13)]
        trained[name] = models.generator.plvc
    for name, curve in losses.items():
        assert np.mean(curve[-3:]) < 0.7 * np.mean(curve[:3]), (name, curve)
    np.testing.assert_allclose(losses["channels_last"], losses["float32"], rtol=1e-3)

    restored = PLVC(PLVCConfig.tiny())
    restored.load_state_dict(trained["channels_last"].state_dict())
    with torch.no_grad():
        ref = batch.iframe
        out = restored.eval().forward_pframe(batch.frames[:, 1], ref)["x_hat"]
        expected = trained["channels_last"].eval().forward_pframe(batch.frames[:, 1], ref)["x_hat"]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_multi_p_gradient_of_the_last_frame_reaches_the_first_frame() -> None:
    """Eq. 5 trains through the recurrence: the LAST P-frame's loss depends on the FIRST
    P-frame's input (only through x̂_1 and the ConvLSTM/RPM states carried from it)."""
    torch.manual_seed(0)
    phase = MultiPPhase(crop=SIZE, num_pframes=3)
    models = phase.build_models()
    batch = _batch(frames=4)
    x1 = batch.frames[:, 1].clone().requires_grad_(True)
    frames = torch.cat([batch.frames[:, :1], x1[:, None], batch.frames[:, 2:]], dim=1)

    out = phase.forward(models, ClipBatch(frames, batch.iframe), step=1)
    b, _, _, h, w = frames.shape
    last = (
        frame_rates(out["likelihoods"], b * h * w)["total"][-1]
        + phase.lmbda * (mse_per_frame(out["x_hat"], frames[:, 1:])[-1])
    )
    last.backward()
    assert x1.grad is not None and x1.grad.abs().sum() > 0

    # the same frames with the state and reference cut after frame 1 (truncated BPTT):
    # no gradient reaches x_1, so the check above can tell the difference
    plvc = models.generator.plvc
    x1.grad = None
    first = plvc.forward_pframe(x1, batch.iframe)
    ref, state = first["x_hat"].detach(), first["state"].detach()
    for t in (2, 3):
        step = plvc.forward_pframe(batch.frames[:, t], ref, state)
        ref, state = step["x_hat"], step["state"]
    loss = sum(-torch.log2(v).sum() for v in step["likelihoods"].values()) + step["x_hat"].sum()
    loss.backward()
    assert x1.grad is None


def _craft_outputs(phase: GanPhase, batch: ClipBatch, rates: list[float]) -> dict[str, Any]:
    """Generator outputs whose P-frame i costs exactly ``rates[i]`` bpp (motion latent)."""
    b, _, _, h, w = batch.frames.shape
    m = TINY.latent_channels
    likelihoods = []
    for r in rates:
        n = b * m * (h // 16) * (w // 16)
        p = torch.full((b, m, h // 16, w // 16), 2.0 ** (-r * b * h * w / n), dtype=torch.float64)
        likelihoods.append({"motion": p.float(), "residual": torch.ones(b, m, h // 16, w // 16)})
    num_p = len(rates)
    return {
        "x_hat": (batch.frames[:, 1:] * 0.9).requires_grad_(True),
        "likelihoods": likelihoods,
        "y": [torch.randn(b, 2 * m, h // 16, w // 16) for _ in range(num_p)],
        "flow": [torch.randn(b, 2, h, w) for _ in range(num_p)],
    }


def test_gan_loss_switches_alpha_at_the_rate_target(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gan = GanPhase(
        crop=SIZE,
        num_pframes=3,
        discriminator=TINY_D,
        r_target=0.05,
        alpha1=3.0,
        alpha2=0.01,
        lmbda_gan=100.0,
        beta=0.1,
    )
    models = gan.build_models()
    batch = _batch(frames=4)
    rates = [2 * 0.05, 0.5 * 0.05, 1.01 * 0.05]  # above, below, just above R_T
    terms = gan.generator_loss(models, batch, _craft_outputs(gan, batch, rates), step=1)
    assert [terms[f"rate_bpp/p{i}"].item() for i in (1, 2, 3)] == pytest.approx(rates, rel=1e-4)
    assert [terms[f"alpha/p{i}"].item() for i in (1, 2, 3)] == pytest.approx([3.0, 0.01, 3.0])
    assert terms["alpha1_active"].item() == pytest.approx(2 / 3)
    expected_rate_term = 3.0 * rates[0] + 0.01 * rates[1] + 3.0 * rates[2]
    assert terms["rate_term"].item() == pytest.approx(expected_rate_term, rel=1e-4)
    assert terms["loss"].item() == pytest.approx(
        (terms["rate_term"] + terms["distortion_term"] + terms["adversarial_term"]).item(),
        rel=1e-5,
    )

    # the official loss: α from the rate summed over the clip, plus LPIPS(alex)
    with pytest.raises(RunnerError, match=r"train\.gan\.lpips_backbone"):
        dataclasses.replace(gan, loss="official")
    import torchvision

    alexnet = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), alexnet)  # random trunk: a test
    official = dataclasses.replace(gan, loss="official", lpips_backbone=str(alexnet))
    alexnet.unlink()  # read on the driver: the trunk travels with the pickled phase
    official = pickle.loads(pickle.dumps(official))
    official.setup(torch.device("cpu"))
    below = [0.01, 0.01, 0.01]  # each below R_T, the sum (0.03) too
    terms = official.generator_loss(models, batch, _craft_outputs(gan, batch, below), step=1)
    assert [terms[f"alpha/p{i}"].item() for i in (1, 2, 3)] == pytest.approx([0.01] * 3)
    terms = official.generator_loss(
        models, batch, _craft_outputs(gan, batch, [0.02, 0.02, 0.02]), step=1
    )  # each below R_T, the sum (0.06) above: α1 on every frame
    assert [terms[f"alpha/p{i}"].item() for i in (1, 2, 3)] == pytest.approx([3.0] * 3)
    assert terms["lpips_term"].item() > 0 and "lpips/p3" in terms


def _d_outputs(phase: GanPhase, batch: ClipBatch, outputs: dict[str, Any]) -> list[torch.Tensor]:
    models = phase.build_models()
    assert models.discriminator is not None
    models.discriminator.eval()
    with torch.no_grad():
        return models.discriminator(
            batch.frames, batch.iframe, outputs["x_hat"].detach(), outputs["flow"], outputs["y"]
        )["real"]


def test_ablation_switches_change_what_the_discriminator_sees() -> None:
    batch = _batch(frames=3)

    def phase(**gan: Any) -> GanPhase:
        params = Params(
            train=TrainConfig(
                model="tiny",
                discriminator="tiny",
                gan=GanConfig(steps=1, lr=1e-4, crop=SIZE, num_pframes=2, **gan),
            )
        )
        built = build_phase("gan", params, "low")
        assert isinstance(built, GanPhase)
        return built

    torch.manual_seed(0)
    outputs = _craft_outputs(phase(), batch, [0.1, 0.1])
    other_flow = {**outputs, "flow": [f + 3.0 for f in outputs["flow"]]}
    # only the first real pair (x_1, x_0) differs; pair 2 is (x_2, x_1) in both
    changed_first = ClipBatch(
        torch.cat([batch.frames[:, :1].flip(-1), batch.frames[:, 1:]], 1), batch.iframe
    )

    def d(p: GanPhase, b: ClipBatch, out: dict[str, Any]) -> list[torch.Tensor]:
        torch.manual_seed(1)  # the same D weights for every call
        return _d_outputs(p, b, out)

    full = phase()
    base = d(full, batch, outputs)
    assert not torch.allclose(base[0], d(full, batch, other_flow)[0])  # m_i is an input
    assert not torch.allclose(base[1], d(full, changed_first, outputs)[1])  # h^D carries

    no_h = phase(d_hidden_state=False)
    base = d(no_h, batch, outputs)
    assert torch.allclose(base[1], d(no_h, changed_first, outputs)[1])  # frame 2 alone
    assert not torch.allclose(base[0], d(no_h, batch, other_flow)[0])

    no_h_no_m = phase(d_hidden_state=False, d_motion_condition=False)
    base = d(no_h_no_m, batch, outputs)
    moved = d(no_h_no_m, batch, other_flow)
    assert all(torch.equal(a, c) for a, c in zip(base, moved, strict=True))

    # "w/o GAN": no D at all, eq. 6 without its adversarial term
    plain = phase(adversarial=False)
    models = plain.build_models()
    assert models.discriminator is None and plain.build_optimizers(models).discriminator is None
    terms = plain.generator_loss(models, batch, outputs, step=1)
    assert "adversarial_term" not in terms and not any(k.startswith("adversarial") for k in terms)
    assert terms["loss"].item() == pytest.approx(
        (terms["rate_term"] + terms["distortion_term"]).item(), rel=1e-6
    )


def test_gan_checkpoint_continues_exactly_with_d_and_its_schedule(tmp_path: Path) -> None:
    """G, D, the three optimizers and both LR schedules (milestone after step 2) resume
    exactly: step 2 after a reload matches an uninterrupted run bit for bit."""
    phase = GanPhase(
        crop=SIZE,
        num_pframes=2,
        discriminator=TINY_D,
        lr=1e-3,
        lr_d=1e-3,
        lr_milestones=[2],
        lr_gamma=0.5,
    )
    batches = [_batch(frames=3, seed=10 * i) for i in range(2)]

    def fresh(seed: int) -> tuple[Any, Any, PhaseStepper]:
        torch.manual_seed(seed)
        models = phase.build_models()
        optimizers = phase.build_optimizers(models)
        return models, optimizers, PhaseStepper(phase, models, optimizers, grad_clip=1.0)

    models, optimizers, stepper = fresh(0)
    stepper.step(batches[0], 1)
    save_checkpoint(
        tmp_path,
        phase,
        models,
        optimizers,
        step=1,
        epoch=0,
        rng_per_rank=[capture_rng_state()],
        metrics={},
    )
    stepper.step(batches[1], 2)

    resumed, resumed_opts, resumed_stepper = fresh(1)
    _, rng = load_checkpoint(tmp_path, phase, resumed, resumed_opts, "cpu")
    restore_rng_state(rng[0])
    resumed_stepper.step(batches[1], 2)
    for name, module in models.named().items():
        other = dict(getattr(resumed, name).named_parameters())
        assert all(torch.equal(p, other[k]) for k, p in module.named_parameters()), name
    assert resumed_opts.discriminator.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert resumed_opts.generator.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert resumed_opts.aux.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_bad_settings_and_batches_are_named() -> None:
    with pytest.raises(RunnerError, match=r"train.multi_p.crop"):
        MultiPPhase(crop=40)
    warmup = SinglePConfig(steps=10, lr=1e-4, flow_steps=6, mc_steps=4)
    params = Params(train=TrainConfig(model="tiny", single_p=warmup))
    with pytest.raises(RunnerError, match=r"flow_steps \+ mc_steps"):
        build_phase("single_p", params, "low")
    phase = MultiPPhase(crop=SIZE, num_pframes=3)
    frames, iframe = _clip_arrays(0)
    with pytest.raises(DataError, match="'iframe'"):
        phase.prepare_batch({"frames": frames[None]}, torch.device("cpu"))
    with pytest.raises(DataError, match="clips of 4 frames"):
        phase.prepare_batch({"frames": frames[None, :2], "iframe": iframe[None]}, "cpu")


def test_batches_get_a_fresh_aligned_crop_per_clip_and_step() -> None:
    torch.manual_seed(0)
    phase = MultiPPhase(crop=16, num_pframes=2)
    frames, _ = _clip_arrays(0)
    rows = {"frames": frames[None], "iframe": frames[None, 0].copy()}  # I-frame = im1
    first = phase.prepare_batch(rows, torch.device("cpu"))
    assert first.frames.shape == (1, 3, 3, 16, 16) and first.iframe.shape == (1, 3, 16, 16)
    assert torch.equal(first.iframe, first.frames[:, 0])  # one window for all of them
    others = [phase.prepare_batch(rows, torch.device("cpu")).frames for _ in range(4)]
    assert any(not torch.equal(first.frames, o) for o in others)


def test_temporal_profile_stacks_one_row_over_time() -> None:
    clip = torch.zeros(3, 3, 8, 5)
    clip[1] = 1.0  # a flickering frame
    image = clip_temporal_profiles(clip, clip * 0.5, scale=2)
    assert image.shape == (2 * 3 * 2 + 4, 5, 3)
    assert image[:2].max() == 0 and image[2:4].min() == 255 and image[4:6].max() == 0
    assert math.isclose(float(image[4 + 6 + 2, 0, 0]), 128, abs_tol=1)


def test_prior_lr_lets_the_factorized_prior_fit_in_few_steps() -> None:
    """The factorized prior starts wide; at the network's lr it barely moves in a short run,
    its own larger rate (``prior_lr``) fits near-zero latents within dozens of steps."""
    from compressai.entropy_models import EntropyBottleneck

    from pipeline.train.phase import compressai_optimizers

    def bits_after(prior_lr: float | None, steps: int = 40) -> tuple[float, float]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), EntropyBottleneck(8))
        net, _ = compressai_optimizers(model, lr=5e-4, prior_lr=prior_lr)
        x = 0.1 * torch.randn(4, 3, 8, 8)
        first = last = 0.0
        for step in range(steps):
            _, likelihoods = model[1](model[0](x))
            bits = -likelihoods.log2().sum() / likelihoods.numel()
            net.zero_grad()
            bits.backward()
            net.step()
            first = float(bits) if step == 0 else first
            last = float(bits)
        return first, last

    first, slow = bits_after(None)
    _, fast = bits_after(1e-2)
    # at the network's lr the density barely moves in 40 steps; at its own rate it fits
    assert first - fast > 1.0 and first - fast > 4 * (first - slow), (first, slow, fast)


def test_prior_lr_puts_only_the_densities_in_their_own_group() -> None:
    from compressai.entropy_models import EntropyBottleneck

    from pipeline.train.phase import compressai_optimizers

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), EntropyBottleneck(8))
    net, aux = compressai_optimizers(model, lr=1e-4, aux_lr=1e-3, prior_lr=1e-2)
    (main, prior) = net.param_groups
    assert main["lr"] == 1e-4 and prior["lr"] == 1e-2
    densities = {id(p) for n, p in model[1].named_parameters() if n != "quantiles"}
    assert {id(p) for p in prior["params"]} == densities
    assert {id(p) for p in main["params"]} == {id(p) for p in model[0].parameters()}
    assert aux is not None and [id(p) for p in aux.param_groups[0]["params"]] == [
        id(model[1].quantiles)
    ]
    single, _ = compressai_optimizers(model, lr=1e-4)  # default: one group, as the paper
    assert len(single.param_groups) == 1
