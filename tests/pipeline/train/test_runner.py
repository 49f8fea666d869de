"""The distributed training runner: Ray Train V2 runs with 2 CPU workers on a tiny codec
(with a CompressAI entropy bottleneck, so the aux optimizer is exercised) and a tiny GAN."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck
from compressai.models import CompressionModel
from mlflow.tracking import MlflowClient
from torch import Tensor, nn

from pipeline.config import Params, RunnerConfig, TrackingConfig
from pipeline.images import image_grid
from pipeline.tracking import stage_run
from pipeline.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from pipeline.train.phase import (
    NonFiniteLossError,
    PhaseModels,
    PhaseOptimizers,
    RunnerError,
    TrainingPhase,
    compressai_optimizers,
)
from pipeline.train.runner import run_phase
from pipeline.train.stepper import PhaseStepper

FRAMES, SIZE, CLIPS = 2, 32, 16

# pytest imports this file as `tests.pipeline.train.test_runner`, which Ray workers may not
# be able to import: ship the test phase and models to them by value
ray_cloudpickle = pytest.importorskip("ray.cloudpickle")
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])


class TinyCodec(CompressionModel):
    """Two strided convs, a factorized entropy bottleneck, two transposed convs."""

    def __init__(self, ch: int = 8) -> None:
        super().__init__()
        self.entropy_bottleneck = EntropyBottleneck(ch)
        self.g_a = nn.Sequential(nn.Conv2d(3, ch, 5, 2, 2), nn.ReLU(), nn.Conv2d(ch, ch, 5, 2, 2))
        self.g_s = nn.Sequential(
            nn.ConvTranspose2d(ch, ch, 5, 2, 2, 1), nn.ReLU(), nn.ConvTranspose2d(ch, 3, 5, 2, 2, 1)
        )

    def forward(self, x: Tensor) -> dict[str, Any]:
        y_hat, likelihoods = self.entropy_bottleneck(self.g_a(x))
        return {"x_hat": self.g_s(y_hat), "likelihoods": {"y": likelihoods}}


class TinyDiscriminator(nn.Module):
    def __init__(self, ch: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(ch, 1, 4, 2, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@dataclasses.dataclass
class CodecPhase(TrainingPhase):
    """Rate-distortion training of :class:`TinyCodec`, optionally adversarial.

    Test hooks: ``step_log`` gets "pid rank step clips" per step; rank 1 exits once at
    ``kill_at`` (remembered by ``kill_marker``); rank 1's MSE is NaN at ``nan_at``.
    """

    name: ClassVar[str] = "tiny_codec"
    batch_size: int = 2
    lmbda: float = 100.0
    lr: float = 1e-3
    gan: bool = False
    beta: float = 0.1
    step_log: str | None = None
    kill_at: int | None = None
    kill_marker: str | None = None
    #: seconds between the checkpoint report and the kill (0: at once, before Ray Train may
    #: have registered the checkpoint rank 0 just uploaded)
    kill_delay_s: float = 0.0
    nan_at: int | None = None

    def build_models(self) -> PhaseModels:
        return PhaseModels(TinyCodec(), TinyDiscriminator() if self.gan else None)

    def build_optimizers(self, models: PhaseModels) -> PhaseOptimizers:
        main, aux = compressai_optimizers(models.generator, self.lr)
        disc = torch.optim.Adam(models.discriminator.parameters(), lr=self.lr) if self.gan else None
        sched = {"generator": torch.optim.lr_scheduler.MultiStepLR(main, milestones=[1000])}
        return PhaseOptimizers(main, aux, disc, sched)

    def forward(self, models: PhaseModels, batch: Tensor, step: int) -> dict[str, Any]:
        if self.step_log:
            with open(self.step_log, "a") as f:
                f.write(f"{os.getpid()} {_rank()} {step} {batch.shape[0]}\n")
        if (
            step == self.kill_at
            and _rank() == 1
            and self.kill_marker
            and not os.path.exists(self.kill_marker)
        ):
            Path(self.kill_marker).touch()
            time.sleep(self.kill_delay_s)
            os._exit(1)
        x = batch.flatten(0, 1)
        return {"x": x, **models.generator(x)}

    def generator_loss(
        self, models: PhaseModels, batch: Tensor, outputs: dict[str, Any], step: int
    ) -> dict[str, Tensor]:
        x, x_hat = outputs["x"], outputs["x_hat"]
        mse = F.mse_loss(x_hat, x)
        if step == self.nan_at and _rank() == 1:
            mse = mse * float("nan")
        n, _, h, w = x.shape
        bpp = sum(-torch.log2(v).sum() for v in outputs["likelihoods"].values()) / (n * h * w)
        terms = {"mse": mse, "bpp": bpp, "loss": self.lmbda * mse + bpp}
        if self.gan:
            g_adv = F.softplus(-models.discriminator(x_hat)).mean()
            terms["g_adv"] = g_adv
            terms["loss"] = terms["loss"] + self.beta * g_adv
        return terms

    def discriminator_loss(
        self, models: PhaseModels, batch: Tensor, outputs: dict[str, Any], step: int
    ) -> dict[str, Tensor]:
        x, fake = outputs["x"], outputs["x_hat"].detach()
        real_logits, fake_logits = models.discriminator(torch.cat([x, fake])).chunk(2)
        loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        return {"loss": loss, "real_score": torch.sigmoid(real_logits).mean()}

    def sample_images(self, models: PhaseModels, batch: Tensor) -> dict[str, np.ndarray]:
        x = batch[:, 0]
        return {"reconstruction": image_grid(x, models.generator(x)["x_hat"].clamp(0, 1))}


def _clips() -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(CLIPS, 1, SIZE, SIZE, 3))
    noise = rng.integers(-8, 9, size=(CLIPS, FRAMES, SIZE, SIZE, 3))
    frames = np.clip(base + noise, 0, 255).astype(np.uint8)
    return [{"clip_id": f"clip{i:03d}", "frames": frames[i]} for i in range(CLIPS)]


@pytest.fixture
def datasets(ray_local: None) -> dict[str, Any]:
    import ray.data

    return {"train": ray.data.from_items(_clips())}


def _params(tmp_path: Path, **runner: Any) -> Params:
    settings = {
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "storage_path": str(tmp_path / "ray_results"),
        "checkpoint_every": 2,
        "log_every": 2,
        "image_every": 4,
        "max_failures": 2,
        **runner,
    }
    return Params(
        tracking=TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="runner"),
        runner=RunnerConfig(**settings),
    )


def _steps_by_pid(log: Path, rank: int) -> list[list[int]]:
    """Steps logged by ``rank``, one list per worker process, in start order."""
    runs: dict[str, list[int]] = defaultdict(list)
    for line in log.read_text().splitlines():
        pid, r, step, _ = line.split()
        if int(r) == rank:
            runs[pid].append(int(step))
    return list(runs.values())


# ----------------------------------------------------------------------------- with Ray


@pytest.mark.ray
def test_run_exports_logs_and_a_rerun_resumes(tmp_path: Path, datasets: dict[str, Any]) -> None:
    params = _params(tmp_path)
    log = tmp_path / "steps.log"
    phase = CodecPhase(step_log=str(log))
    export = tmp_path / "models" / "tiny"

    with stage_run("train_tiny", params, run_name="train_tiny-low") as run:
        first = run_phase(
            phase,
            params,
            stage="train_tiny",
            run_name="train_tiny-low",
            datasets=datasets,
            max_steps=4,
            init_weights=None,
            export_dir=export,
        )
        run_id = run.info.run_id

    # exported weights load into a fresh model; result.json describes the run
    assert sorted(p.name for p in export.iterdir()) == ["generator.pt", "result.json"]
    TinyCodec().load_state_dict(torch.load(export / "generator.pt", weights_only=True))
    saved = json.loads((export / "result.json").read_text())
    assert saved["steps"] == 4 and saved["world_size"] == 2 and saved["mlflow_run_id"] == run_id
    assert saved["ray_run_path"] == str(tmp_path / "ray_results" / "train_tiny-low")
    assert saved["final_metrics"]["train/loss"] == first["final_metrics"]["train/loss"]
    assert np.isfinite(saved["final_metrics"]["train/bpp"])

    # rank 0 logged into the stage's own MLflow run
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = {
        k: [m.step for m in client.get_metric_history(run_id, k)]
        for k in (
            "train/loss",
            "train/bpp",
            "train/mse",
            "train/aux_loss",
            "lr/generator",
            "lr/aux",
            "perf/clips_per_s",
            "perf/clips_per_s_per_worker",
        )
    }
    assert all(steps == [2, 4] for steps in history.values()), history
    per_worker = client.get_metric_history(run_id, "perf/clips_per_s_per_worker")[-1].value
    total = client.get_metric_history(run_id, "perf/clips_per_s")[-1].value
    assert total == pytest.approx(2 * per_worker)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "result.json" in artifacts and "images" in artifacts

    # the same run name continues the run: step 5 follows the step-4 checkpoint
    with stage_run("train_tiny", params, run_name="train_tiny-low"):
        second = run_phase(
            phase,
            params,
            stage="train_tiny",
            run_name="train_tiny-low",
            datasets=datasets,
            max_steps=6,
            init_weights=None,
            export_dir=export,
        )
    runs = _steps_by_pid(log, rank=0)
    assert [r[0] for r in runs] == [1, 5] and runs[1][-1] == 6
    # batch_size 2 is the global batch: each of the 2 workers took 1 clip per step
    assert {line.split()[3] for line in log.read_text().splitlines()} == {"1"}
    assert second["steps"] == 6 and second["started_from_step"] == 4

    # a run already at max_steps is only exported again: no worker starts
    exported = torch.load(export / "generator.pt", weights_only=True)
    lines = log.read_text()
    third = run_phase(
        phase,
        params,
        stage="train_tiny",
        run_name="train_tiny-low",
        datasets=datasets,
        max_steps=6,
        init_weights=None,
        export_dir=export,
    )
    assert third["steps"] == 6 and log.read_text() == lines
    again = torch.load(export / "generator.pt", weights_only=True)
    assert all(torch.equal(exported[k], again[k]) for k in exported)

    # other settings under the same run name are refused, naming the difference
    with pytest.raises(RunnerError, match=r"lmbda: 100\.0 -> 50\.0"):
        run_phase(
            dataclasses.replace(phase, lmbda=50.0),
            params,
            stage="train_tiny",
            run_name="train_tiny-low",
            datasets=datasets,
            max_steps=8,
            init_weights=None,
            export_dir=export,
        )
    mlflow.set_tracking_uri(None)


@pytest.mark.ray
def test_one_worker_takes_the_whole_global_batch(tmp_path: Path, datasets: dict[str, Any]) -> None:
    """batch_size means clips per step over all workers (the paper's batch): one worker takes
    all of it, and a batch the workers cannot share equally is refused before any start."""
    log = tmp_path / "steps.log"
    run_phase(
        CodecPhase(batch_size=2, step_log=str(log)),
        _params(tmp_path, num_workers=1),
        stage="train_tiny",
        run_name="train_tiny-one",
        datasets=datasets,
        max_steps=2,
        init_weights=None,
        export_dir=tmp_path / "export",
    )
    assert [line.split()[1:] for line in log.read_text().splitlines()] == [
        ["0", "1", "2"],
        ["0", "2", "2"],
    ]
    with pytest.raises(RunnerError, match=r"batch_size 3 is the global batch.*num_workers \(2\)"):
        run_phase(
            CodecPhase(batch_size=3),
            _params(tmp_path),
            stage="train_tiny",
            run_name="train_tiny-uneven",
            datasets=datasets,
            max_steps=2,
            init_weights=None,
            export_dir=tmp_path / "uneven",
        )
    mlflow.set_tracking_uri(None)


@pytest.mark.ray
def test_killed_worker_resumes_gan_run_from_last_checkpoint(
    tmp_path: Path, datasets: dict[str, Any]
) -> None:
    params = _params(tmp_path, log_every=3, image_every=100)
    log = tmp_path / "steps.log"
    phase = CodecPhase(gan=True, step_log=str(log), kill_at=5, kill_marker=str(tmp_path / "killed"))
    result = run_phase(
        phase,
        params,
        stage="train_gan",
        run_name="train_gan-low",
        datasets=datasets,
        max_steps=6,
        init_weights=None,
        export_dir=tmp_path / "gan",
    )

    assert (tmp_path / "killed").exists()
    runs = _steps_by_pid(log, rank=0)
    assert len(runs) == 2, runs
    assert runs[0][:4] == [1, 2, 3, 4]
    # restarted from the step-4 checkpoint (killed at once: registered by Ray Train or not),
    # not from step 2 or 0: the lost work is at most one checkpoint interval
    assert runs[1] == [5, 6]
    assert result["steps"] == 6 and result["started_from_step"] == 4
    assert sorted(p.name for p in (tmp_path / "gan").iterdir()) == [
        "discriminator.pt",
        "generator.pt",
        "result.json",
    ]
    metrics = result["final_metrics"]
    assert {
        "train/d_loss",
        "train/d_real_score",
        "train/g_adv",
        "train/grad_norm_discriminator",
        "lr/discriminator",
    } <= set(metrics)


@pytest.mark.ray
def test_nan_loss_stops_the_run_naming_step_and_term(
    tmp_path: Path, datasets: dict[str, Any]
) -> None:
    params = _params(tmp_path)
    log = tmp_path / "steps.log"
    phase = CodecPhase(nan_at=3, step_log=str(log))
    with pytest.raises(NonFiniteLossError, match=r"step 3: .*'mse' is nan on rank\(s\) \[1\]"):
        run_phase(
            phase,
            params,
            stage="train_tiny",
            run_name="train_nan",
            datasets=datasets,
            max_steps=6,
            init_weights=None,
            export_dir=tmp_path / "out",
        )
    assert len(_steps_by_pid(log, rank=0)) == 1  # not retried: a restart would repeat it
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- without Ray


def _batch(seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, FRAMES, 3, SIZE, SIZE, generator=g)


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict[str, Tensor], module: nn.Module) -> set[str]:
    return {k for k, v in module.named_parameters() if not torch.equal(before[k], v)}


def test_gan_step_updates_d_only_in_d_step_and_g_only_in_g_step() -> None:
    torch.manual_seed(0)
    phase = CodecPhase(gan=True)
    models = phase.build_models()
    stepper = PhaseStepper(phase, models, phase.build_optimizers(models), grad_clip=1.0)
    g, d = models.generator, models.discriminator
    assert d is not None
    batch = _batch()

    outputs = stepper.forward(batch, step=1)
    g0, d0 = _snapshot(g), _snapshot(d)
    d_terms = stepper.discriminator_step(batch, outputs, step=1)
    assert _changed(g0, g) == set()
    assert _changed(d0, d) == set(d0)
    assert all(p.grad is None for p in g.parameters())  # the fakes were detached
    d_grads = {k: p.grad.clone() for k, p in d.named_parameters()}

    g1, d1 = _snapshot(g), _snapshot(d)
    g_terms = stepper.generator_step(batch, outputs, step=1)
    assert _changed(d1, d) == set()
    # D's gradients were neither recomputed nor accumulated, and D stays trainable
    assert all(torch.equal(p.grad, d_grads[k]) for k, p in d.named_parameters())
    assert all(p.requires_grad for p in d.parameters())
    changed = _changed(g1, g)
    assert "entropy_bottleneck.quantiles" in changed  # by the aux optimizer
    assert changed == set(g1)
    assert {"d_loss", "d_real_score", "grad_norm_discriminator"} <= set(d_terms)
    assert {"loss", "mse", "bpp", "g_adv", "aux_loss", "grad_norm_generator"} <= set(g_terms)


def test_stepper_without_ray_reports_nan_and_clips_gradients() -> None:
    torch.manual_seed(0)
    phase = CodecPhase(nan_at=2)  # rank 0 in one process: no NaN
    models = phase.build_models()
    stepper = PhaseStepper(phase, models, phase.build_optimizers(models), grad_clip=1e-3)
    terms = stepper.step(_batch(), step=1)
    assert terms["grad_norm_generator"] > 1e-3  # the norm before clipping is reported
    clipped = torch.nn.utils.get_total_norm(
        [p.grad for p in stepper.optimizers.generator.param_groups[0]["params"]]
    )
    assert clipped == pytest.approx(1e-3, rel=1e-3)

    class Exploding(CodecPhase):
        def generator_loss(self, *args: Any) -> dict[str, Tensor]:
            terms = super().generator_loss(*args)
            terms["bpp"] = terms["bpp"] + float("inf")
            return terms

    bad = Exploding()
    models = bad.build_models()
    stepper = PhaseStepper(bad, models, bad.build_optimizers(models), grad_clip=None)
    with pytest.raises(NonFiniteLossError, match=r"step 7: .*'bpp' is inf"):
        stepper.step(_batch(), step=7)


def test_quantiles_in_the_main_optimizer_are_refused() -> None:
    phase = CodecPhase()
    models = phase.build_models()
    everything = torch.optim.Adam(models.generator.parameters())
    with pytest.raises(RunnerError, match="quantiles"):
        PhaseStepper(phase, models, PhaseOptimizers(everything), grad_clip=None)


def test_checkpoint_continues_training_exactly(tmp_path: Path) -> None:
    """Models, all three optimizers, the scheduler and the RNG (the entropy bottleneck's
    training noise draws from it) are restored: steps 3-4 after a reload match bit for bit."""
    phase = CodecPhase(gan=True)
    batches = [_batch(i) for i in range(4)]

    def fresh(seed: int) -> tuple[PhaseModels, PhaseOptimizers, PhaseStepper]:
        torch.manual_seed(seed)
        models = phase.build_models()
        optimizers = phase.build_optimizers(models)
        return models, optimizers, PhaseStepper(phase, models, optimizers, grad_clip=1.0)

    models, optimizers, stepper = fresh(0)
    for step in (1, 2):
        stepper.step(batches[step - 1], step)
    save_checkpoint(
        tmp_path,
        phase,
        models,
        optimizers,
        step=2,
        epoch=0,
        rng_per_rank=[capture_rng_state()],
        metrics={"train/loss": 1.0},
    )
    for step in (3, 4):
        stepper.step(batches[step - 1], step)

    resumed, resumed_opts, resumed_stepper = fresh(1)
    meta, rng = load_checkpoint(tmp_path, phase, resumed, resumed_opts, "cpu")
    restore_rng_state(rng[0])
    assert meta["step"] == 2 and meta["phase"] == "tiny_codec"
    for step in (3, 4):
        resumed_stepper.step(batches[step - 1], step)
    for name, module in models.named().items():
        other = dict(getattr(resumed, name).named_parameters())
        assert all(torch.equal(p, other[k]) for k, p in module.named_parameters()), name
    assert resumed_opts.schedulers["generator"].last_epoch == 4


def test_rng_state_survives_a_checkpoint_round_trip() -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    torch.randn(3)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restore_rng_state(torch.load(buf, weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_newest_complete_checkpoint_skips_half_copied_ones(tmp_path: Path) -> None:
    """A checkpoint rank 0 uploaded but Ray Train never registered is found when all its files
    are there at the sizes its meta lists; a half-copied one is not."""
    from pipeline.train.checkpoint import newest_complete_checkpoint

    phase = CodecPhase()
    models = phase.build_models()
    optimizers = phase.build_optimizers(models)
    run = tmp_path / "train_tiny"
    for step in (2, 4, 6):
        folder = run / f"checkpoint_{step:08d}"
        folder.mkdir(parents=True)
        save_checkpoint(
            folder,
            phase,
            models,
            optimizers,
            step=step,
            epoch=0,
            rng_per_rank=[capture_rng_state()],
            metrics={},
        )
    (run / "checkpoint_00000006" / "optimizers.pt").write_bytes(b"half")  # cut short
    (run / "checkpoint_junk").mkdir()
    found = newest_complete_checkpoint(str(run), after_step=2)
    assert found is not None and found[1] == 4
    with found[0].as_directory() as d:
        assert json.loads((Path(d) / "meta.json").read_text())["step"] == 4
    assert newest_complete_checkpoint(str(run), after_step=4) is None
    assert newest_complete_checkpoint(str(tmp_path / "no_run"), after_step=-1) is None
