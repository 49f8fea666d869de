"""Throughput of the training runner on a tiny codec phase: steps/s and clips/s per worker
with 1 and 2 CPU workers, next to the same iterations in one plain process (no Ray, no DDP).

    .venv/bin/python -m benchmarks.runner_steps [--steps 40] [--size 64] [--frames 3] [--batch 4]

The figures come from the runner's own last logging window (the second half of the run),
so worker start-up and the first iterations are not counted. The real phases' benchmarks
come with their stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck
from compressai.models import CompressionModel
from torch import Tensor, nn

from pipeline.config import Params, RunnerConfig
from pipeline.ray_cluster import init_ray, shutdown_ray
from pipeline.train.phase import PhaseModels, PhaseOptimizers, TrainingPhase, compressai_optimizers
from pipeline.train.runner import run_phase
from pipeline.train.stepper import PhaseStepper


class TinyCodec(CompressionModel):
    def __init__(self, ch: int = 32) -> None:
        super().__init__()
        self.entropy_bottleneck = EntropyBottleneck(ch)
        self.g_a = nn.Sequential(nn.Conv2d(3, ch, 5, 2, 2), nn.ReLU(), nn.Conv2d(ch, ch, 5, 2, 2))
        self.g_s = nn.Sequential(
            nn.ConvTranspose2d(ch, ch, 5, 2, 2, 1), nn.ReLU(), nn.ConvTranspose2d(ch, 3, 5, 2, 2, 1)
        )

    def forward(self, x: Tensor) -> dict[str, Any]:
        y_hat, likelihoods = self.entropy_bottleneck(self.g_a(x))
        return {"x_hat": self.g_s(y_hat), "likelihoods": {"y": likelihoods}}


@dataclasses.dataclass
class TinyPhase(TrainingPhase):
    name: ClassVar[str] = "bench_tiny"
    batch_size: int = 4
    channels: int = 32
    lmbda: float = 100.0

    def build_models(self) -> PhaseModels:
        return PhaseModels(TinyCodec(self.channels))

    def build_optimizers(self, models: PhaseModels) -> PhaseOptimizers:
        main, aux = compressai_optimizers(models.generator, 1e-4)
        return PhaseOptimizers(main, aux)

    def forward(self, models: PhaseModels, batch: Tensor, step: int) -> dict[str, Any]:
        x = batch.flatten(0, 1)
        return {"x": x, **models.generator(x)}

    def generator_loss(
        self, models: PhaseModels, batch: Tensor, outputs: dict[str, Any], step: int
    ) -> dict[str, Tensor]:
        x, x_hat = outputs["x"], outputs["x_hat"]
        n, _, h, w = x.shape
        bpp = -torch.log2(outputs["likelihoods"]["y"]).sum() / (n * h * w)
        mse = F.mse_loss(x_hat, x)
        return {"loss": self.lmbda * mse + bpp, "mse": mse, "bpp": bpp}


def _clips(n: int, frames: int, size: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    return [
        {"clip_id": f"c{i:05d}", "frames": rng.integers(0, 256, (frames, size, size, 3), np.uint8)}
        for i in range(n)
    ]


def _plain(phase: TinyPhase, steps: int, frames: int, size: int) -> float:
    """Steps/s of the same iterations in this process, without Ray or DDP."""
    torch.manual_seed(0)
    models = phase.build_models()
    stepper = PhaseStepper(phase, models, phase.build_optimizers(models), grad_clip=1.0)
    batch = torch.rand(phase.batch_size, frames, 3, size, size)
    for step in range(1, 4):
        stepper.step(batch, step)
    start = time.perf_counter()
    for step in range(steps):
        stepper.step(batch, step + 4)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    args = parser.parse_args()

    phase = TinyPhase(batch_size=args.batch)
    torch.set_num_threads(1)  # like a Ray worker with a fractional CPU
    plain = _plain(phase, args.steps, args.frames, args.size)
    print(
        f"clip = {args.frames} frames {args.size}x{args.size}, batch {args.batch} per worker, "
        f"{args.steps} steps (figures over the last {args.steps // 2})"
    )
    print(f"plain process (1 thread): {plain:7.2f} steps/s  {plain * args.batch:7.1f} clips/s")

    init_ray(num_cpus=2)
    try:
        import ray.data

        clips = ray.data.from_items(_clips(8 * args.batch * 2, args.frames, args.size))
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                params = Params(
                    runner=RunnerConfig(
                        num_workers=workers,
                        cpus_per_worker=args.cpus_per_worker,
                        storage_path=str(Path(tmp) / "ray"),
                        checkpoint_every=args.steps,
                        log_every=args.steps // 2,
                        image_every=10**9,
                    )
                )
                started = time.perf_counter()
                result = run_phase(
                    # --batch is per worker (weak scaling); batch_size is the global batch
                    dataclasses.replace(phase, batch_size=phase.batch_size * workers),
                    params,
                    stage="bench",
                    run_name=f"bench-{workers}w",
                    datasets={"train": clips},
                    max_steps=args.steps,
                    init_weights=None,
                    export_dir=Path(tmp) / "export",
                )
                wall = time.perf_counter() - started
            m = result["final_metrics"]
            print(
                f"{workers} worker(s) x {args.cpus_per_worker} CPU: "
                f"{m['perf/steps_per_s']:7.2f} steps/s  "
                f"{m['perf/clips_per_s_per_worker']:7.1f} clips/s per worker  "
                f"{m['perf/clips_per_s']:7.1f} clips/s total  "
                f"data wait {100 * m['perf/data_wait_fraction']:4.1f}%  "
                f"(run_phase wall {wall:.1f} s incl. start-up)"
            )
    finally:
        shutdown_ray()


if __name__ == "__main__":
    main()
