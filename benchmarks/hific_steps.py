"""Throughput of HiFiC training (warm-up and GAN steps) and of I-frame coding.

    .venv/bin/python -m benchmarks.hific_steps [--presets tiny small] [--steps 30]
        [--batch 4] [--crop 128] [--clips 32] [--actors 2]

Training: the real phases (:mod:`pipeline.train.phases.hific`) through
:func:`pipeline.train.runner.run_phase`
with 1 and 2 workers (``--cpus-per-worker``, 0.5 as the sample's runner), on clips of the
sample's frame size (256x448, 7 frames) from memory, ``--batch`` clips per worker and step,
one ``--crop`` window per clip. Figures are the runner's last logging window (the second half
of the run), so start-up is not counted; "plain" is the same iteration in this process with
one thread, no Ray and no DDP.

I-frames: ``--clips`` synthetic 256x448 clips sharded to Parquet, then
:func:`pipeline.data.iframes.code_iframes` with ``--actors`` CPU actors (wall time including
actor start-up), next to the per-clip cost of one actor's work in this process (encode,
decode of the bytes, PNG) with one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pipeline.config import Params, RunnerConfig
from pipeline.ray_cluster import init_ray, shutdown_ray
from pipeline.train.phases.hific import HiFiCGANPhase, HiFiCWarmupPhase
from pipeline.train.runner import run_phase
from pipeline.train.stepper import PhaseStepper
from plvc.hific import HiFiC, HiFiCConfig, save_hific
from plvc.hific_losses import HiFiCLossWeights

HEIGHT, WIDTH = 256, 448
LOSS = HiFiCLossWeights(target_bpp=0.14, lambda_a=2.0, lambda_b=2**-4, k_p=0.0)


def _clip(rng: np.random.Generator) -> np.ndarray:
    """Seven smooth 256x448 frames with noise and a moving square (compressible, not flat)."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = (np.sin(xx / rng.uniform(20, 60)) + np.cos(yy / rng.uniform(20, 60))) * 60 + 120
    tint = rng.uniform(0.6, 1.2, size=3).astype(np.float32)
    frames = np.empty((7, HEIGHT, WIDTH, 3), np.uint8)
    for t in range(7):
        frame = base[..., None] * tint + rng.normal(0, 4, (HEIGHT, WIDTH, 3))
        frame[40 + 4 * t : 100 + 4 * t, 60 + 6 * t : 120 + 6 * t] = 230
        frames[t] = np.clip(frame, 0, 255)
    return frames


def _phases(preset: str, batch: int, crop: int) -> dict[str, HiFiCWarmupPhase]:
    common: dict[str, Any] = {
        "model": HiFiCConfig.preset(preset),
        "loss": LOSS,
        "batch_size": batch,
        "crop": crop,
        "lr": 1e-4,
    }
    return {"warmup": HiFiCWarmupPhase(**common), "gan": HiFiCGANPhase(**common)}


def _plain(phase: HiFiCWarmupPhase, clips: list[np.ndarray], steps: int) -> float:
    """Clips/s of the same iterations in this process (one thread, no Ray, no DDP)."""
    torch.manual_seed(0)
    models = phase.build_models()
    stepper = PhaseStepper(phase, models, phase.build_optimizers(models), grad_clip=1.0)
    rows = {"frames": np.stack(clips[: phase.batch_size])}
    cpu = torch.device("cpu")
    for step in range(1, 3):
        stepper.step(phase.prepare_batch(rows, cpu), step)
    start = time.perf_counter()
    for step in range(steps):
        stepper.step(phase.prepare_batch(rows, cpu), step + 3)
    return steps * phase.batch_size / (time.perf_counter() - start)


def bench_training(args: argparse.Namespace, clips: list[np.ndarray]) -> None:
    import ray.data

    dataset = ray.data.from_items([{"clip_id": f"c/{i}", "frames": c} for i, c in enumerate(clips)])
    print(
        f"\nHiFiC training: clips of 7x{HEIGHT}x{WIDTH}, {args.batch} clips per worker-step, "
        f"one {args.crop}x{args.crop} crop each, {args.steps} steps (figures over the last "
        f"{args.steps // 2}), workers at {args.cpus_per_worker} CPU"
    )
    print(
        f"{'preset':<7}{'phase':<8}{'setting':<22}{'steps/s':>9}{'clips/s/worker':>16}"
        f"{'clips/s':>9}{'data wait':>11}"
    )
    torch.set_num_threads(1)  # like a Ray worker with a fractional CPU
    for preset in args.presets:
        for name, phase in _phases(preset, args.batch, args.crop).items():
            plain = _plain(phase, clips, max(4, args.steps // 3))
            print(
                f"{preset:<7}{name:<8}{'plain, 1 thread':<22}{plain / args.batch:>9.2f}"
                f"{plain:>16.2f}{plain:>9.2f}{'-':>11}"
            )
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
                    result = run_phase(
                        # --batch is per worker (weak scaling); batch_size is the global batch
                        dataclasses.replace(phase, batch_size=phase.batch_size * workers),
                        params,
                        stage="bench",
                        run_name=f"bench-{preset}-{name}-{workers}",
                        datasets={"train": dataset},
                        max_steps=args.steps,
                        init_weights=None,
                        export_dir=Path(tmp) / "export",
                    )
                m = result["final_metrics"]
                print(
                    f"{preset:<7}{name:<8}{f'{workers} Ray worker(s)':<22}"
                    f"{m['perf/steps_per_s']:>9.2f}{m['perf/clips_per_s_per_worker']:>16.2f}"
                    f"{m['perf/clips_per_s']:>9.2f}{100 * m['perf/data_wait_fraction']:>10.1f}%"
                )


def _write_shards(root: Path, clips: list[np.ndarray]) -> Path:
    from pipeline.data.shards import shard_septuplets

    raw = root / "raw"
    ids = [f"00001/{i + 1:04d}" for i in range(len(clips))]
    for clip_id, frames in zip(ids, clips, strict=True):
        folder = raw / "sequences" / clip_id
        folder.mkdir(parents=True)
        for t, frame in enumerate(frames, start=1):
            cv2.imwrite(
                str(folder / f"im{t}.png"), frame[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1]
            )
    cut = max(1, len(ids) // 4)
    (raw / "sep_trainlist.txt").write_text("\n".join(ids[cut:]) + "\n")
    (raw / "sep_testlist.txt").write_text("\n".join(ids[:cut]) + "\n")
    shard_septuplets(
        raw,
        root / "shards",
        rows_per_shard=8,
        row_group_rows=4,
        max_skipped_fraction=0.0,
        workers=1,
        progress=False,
    )
    return root / "shards"


def bench_iframes(args: argparse.Namespace, clips: list[np.ndarray]) -> None:
    from pipeline.data.iframes import code_iframes, encode_png_rgb
    from plvc.intra import get_intra_codec

    print(f"\nI-frames: {len(clips)} clips of {HEIGHT}x{WIDTH}, {args.actors} CPU actor(s)")
    print(f"{'preset':<7}{'setting':<34}{'clips/s':>9}{'s/clip':>8}{'bpp':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        shards = _write_shards(Path(tmp), clips)
        for preset in args.presets:
            torch.manual_seed(0)
            weights = save_hific(Path(tmp) / preset / "hific.pt", HiFiC(HiFiCConfig.preset(preset)))
            codec = get_intra_codec("hific", weights=weights)
            torch.set_num_threads(1)
            image = torch.from_numpy(clips[0][0]).permute(2, 0, 1).float() / 255
            codec.decode(codec.encode(image))
            start = time.perf_counter()
            n = 4
            for clip in clips[:n]:
                image = torch.from_numpy(clip[0]).permute(2, 0, 1).float() / 255
                stream = codec.encode(image)
                pixels = codec.decode(stream).mul(255).round().byte().permute(1, 2, 0).numpy()
                encode_png_rgb(pixels)
            per_clip = (time.perf_counter() - start) / n
            print(
                f"{preset:<7}{'one actor, in process, 1 thread':<34}{1 / per_clip:>9.2f}"
                f"{per_clip:>8.2f}{'':>7}"
            )
            start = time.perf_counter()
            result = code_iframes(
                shards,
                Path(tmp) / preset / "iframes",
                weights,
                quality="bench",
                batch_size=4,
                num_actors=args.actors,
                use_gpu=False,
                progress=False,
            )
            wall = time.perf_counter() - start
            total = result["manifest"]["totals"]["clips"]
            bpp = result["manifest"]["splits"]["train"]["stats"]["bpp_mean"]
            print(
                f"{preset:<7}{f'code_iframes, {args.actors} actors (wall)':<34}"
                f"{total / wall:>9.2f}{wall / total:>8.2f}{bpp:>7.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-iframes", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    clips = [_clip(rng) for _ in range(args.clips)]
    init_ray(num_cpus=2)
    try:
        if not args.skip_training:
            bench_training(args, clips)
        if not args.skip_iframes:
            bench_iframes(args, clips)
    finally:
        shutdown_ray()


if __name__ == "__main__":
    main()
