"""Training throughput of PLVC's three phases (single-P, multi-P, GAN): clips/s per worker
in one plain process and under the runner (Ray Train, DDP) with 1 and 2 workers.

    .venv/bin/python -m benchmarks.plvc_steps [--models tiny paper] [--phases single_p multi_p gan]
        [--workers 1 2] [--crop 64] [--batch 2] [--pframes 6] [--steps 8] [--plain-steps 3]
        [--layouts float32 channels_last bf16 bf16_channels_last]

``--workers 0`` skips Ray (plain process only). Ray figures come from the runner's last
logging window (the second half of the run), so start-up and the first iterations are not
counted. On a GPU machine add ``--gpu`` (one GPU per worker, bf16 autocast) to get the
step time that projects the paper's schedule (300k + 200k + 100k steps at batch 4,
256x256 crops); the script prints that projection only when it measured on GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Params, RunnerConfig
from pipeline.ray_cluster import init_ray, shutdown_ray
from pipeline.train.phases.plvc import GanPhase, MultiPPhase, PLVCPhase, SinglePPhase
from pipeline.train.phases.plvc_models import discriminator_config, model_config
from pipeline.train.runner import run_phase
from pipeline.train.stepper import PhaseStepper

#: the paper's schedule (Table 1 text, official code): steps per phase at batch 4
PAPER_STEPS = {"single_p": 300_000, "multi_p": 200_000, "gan": 100_000}


def _phase(name: str, model: str, crop: int, batch: int, pframes: int) -> PLVCPhase:
    cfg = model_config(model)
    common: dict[str, Any] = {
        "crop": crop,
        "batch_size": batch,
        "model": cfg.to_dict(),
        "shuffle_buffer_rows": 0,
    }
    if name == "single_p":
        return SinglePPhase(**common)
    if name == "multi_p":
        return MultiPPhase(**common, num_pframes=pframes)
    return GanPhase(
        **common, num_pframes=pframes, discriminator=discriminator_config(model, cfg).to_dict()
    )


def _clips(n: int, frames: int, size: int) -> list[dict[str, Any]]:
    """A textured square drifting one pixel per frame (so the flow has work to do)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        texture = rng.integers(0, 256, (size + frames, size + frames, 3), np.uint8)
        clip = np.stack([texture[t : t + size, t : t + size] for t in range(frames)])
        out.append({"clip_id": f"{i:05d}/0001", "frames": clip, "iframe": clip[0].copy()})
    return out


def _plain(
    phase: PLVCPhase,
    steps: int,
    clips: list[dict[str, Any]],
    *,
    bf16: bool = False,
    channels_last: bool = False,
) -> float:
    """Seconds per step of the same iterations in this process, without Ray or DDP (what a
    worker does with ``runner.cpu_bf16`` / ``runner.bf16`` and ``runner.channels_last``)."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = phase.build_models()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for module in models.named().values():
        module.to(device, memory_format=layout)
    phase.setup(device)
    stepper = PhaseStepper(
        phase,
        models,
        phase.build_optimizers(models),
        grad_clip=1.0,
        autocast_dtype=torch.bfloat16 if bf16 else None,
    )
    rows = clips[: phase.batch_size]
    columns = {key: np.stack([r[key] for r in rows]) for key in ("frames", "iframe")}
    batch = phase.prepare_batch(columns, device)
    stepper.step(batch, 10**6)  # warm-up (also past any warm-up sub-phase)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(steps):
        stepper.step(batch, 10**6 + step + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "paper"], choices=["tiny", "paper"])
    parser.add_argument("--phases", nargs="+", default=list(PAPER_STEPS), choices=list(PAPER_STEPS))
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pframes", type=int, default=6, help="P-frames per clip (multi-P, GAN)")
    parser.add_argument("--steps", type=int, default=8, help="steps per Ray run")
    parser.add_argument("--plain-steps", type=int, default=3)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, plain process")
    parser.add_argument("--gpu", action="store_true", help="Ray workers on GPUs")
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["float32"],
        choices=["float32", "channels_last", "bf16", "bf16_channels_last"],
        help="precision and memory format of the plain-process steps (bf16: autocast)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    clips = _clips(8 * args.batch * 2, 1 + args.pframes, args.crop)
    print(
        f"crop {args.crop}x{args.crop}, batch {args.batch} per worker, {args.pframes} P-frames "
        f"per clip (multi-P, GAN); plain process: {args.threads} torch thread(s), "
        f"{'GPU' if torch.cuda.is_available() else 'CPU'}"
    )
    rows: list[tuple[str, str, str, float]] = []
    for model in args.models:
        for name in args.phases:
            for layout in args.layouts:
                phase = _phase(name, model, args.crop, args.batch, args.pframes)
                per_step = _plain(
                    phase,
                    args.plain_steps,
                    clips,
                    bf16=layout.startswith("bf16"),
                    channels_last=layout.endswith("channels_last"),
                )
                if layout == "float32":
                    rows.append((model, name, "plain", per_step))
                print(
                    f"{model:5s} {name:8s} plain process, {layout:18s}: {per_step:7.3f} s/step  "
                    f"{args.batch / per_step:7.2f} clips/s",
                    flush=True,
                )
    ray_workers = [w for w in args.workers if w > 0]
    if ray_workers:
        init_ray(num_cpus=None if args.gpu else 2)
        try:
            import ray.data

            dataset = ray.data.from_items(clips)
            for model in args.models:
                for name in args.phases:
                    phase = _phase(name, model, args.crop, args.batch, args.pframes)
                    for workers in ray_workers:
                        _ray_run(phase, model, name, workers, dataset, args, rows)
        finally:
            shutdown_ray()
    if args.gpu and torch.cuda.is_available():
        _project(rows, args)
    else:
        print(
            "no GPU measured: the paper's schedule (300k single-P + 200k multi-P + 100k GAN "
            "steps, batch 4, 256x256) cannot be projected from CPU figures"
        )


def _ray_run(
    phase: PLVCPhase,
    model: str,
    name: str,
    workers: int,
    dataset: Any,
    args: argparse.Namespace,
    rows: list[tuple[str, str, str, float]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        params = Params(
            runner=RunnerConfig(
                num_workers=workers,
                use_gpu=args.gpu,
                cpus_per_worker=args.cpus_per_worker,
                storage_path=str(Path(tmp) / "ray"),
                checkpoint_every=args.steps,
                log_every=max(1, args.steps // 2),
                image_every=10**9,
            )
        )
        started = time.perf_counter()
        result = run_phase(
            # --batch is per worker (weak scaling); batch_size is the global batch
            dataclasses.replace(phase, batch_size=phase.batch_size * workers),
            params,
            stage="bench",
            run_name=f"bench-{model}-{name}-{workers}w",
            datasets={"train": dataset},
            max_steps=args.steps,
            init_weights=None,
            export_dir=Path(tmp) / "export",
        )
        wall = time.perf_counter() - started
    m = result["final_metrics"]
    rows.append((model, name, f"{workers}w", 1.0 / m["perf/steps_per_s"]))
    print(
        f"{model:5s} {name:8s} {workers} worker(s): {1 / m['perf/steps_per_s']:7.3f} s/step  "
        f"{m['perf/clips_per_s_per_worker']:7.2f} clips/s per worker  "
        f"{m['perf/clips_per_s']:7.2f} clips/s total  "
        f"data wait {100 * m['perf/data_wait_fraction']:4.1f}%  "
        f"(run_phase wall {wall:.1f} s incl. start-up)",
        flush=True,
    )


def _project(rows: list[tuple[str, str, str, float]], args: argparse.Namespace) -> None:
    """The paper's schedule on 8 GPUs from the measured per-step time of the largest worker
    count (weak scaling: each GPU a batch of ``--batch``; 8 GPUs x batch 4 = 32 clips/step,
    so the paper's 4-clip steps take 1/8 of the measured step's clips)."""
    widest = max((w for _, _, w, _ in rows if w.endswith("w")), default=None)
    if widest is None:
        return
    total = 0.0
    for model, name, workers, per_step in rows:
        if model == "paper" and workers == widest:
            clips_per_s = int(widest[:-1]) * args.batch / per_step
            hours = PAPER_STEPS[name] * 4 / (clips_per_s * 8 / int(widest[:-1])) / 3600
            total += hours
            print(f"paper {name}: {hours:.1f} h on 8 GPUs at the measured per-GPU rate")
    print(f"paper schedule total: {total:.1f} h on 8 GPUs (crop {args.crop}; the paper's is 256)")


if __name__ == "__main__":
    main()
