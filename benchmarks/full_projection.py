"""How long would the full setting train? FLOPs per step of every phase, projected to GPUs.

    .venv/bin/python -m benchmarks.full_projection [--params params-full.yaml] [--quality low]
        [--gpus 8] [--peak-tflops 989] [--utilization 0.1 0.3]

For each training phase of the setting (HiFiC warm-up and GAN, PLVC single-P, multi-P and GAN)
the phase is built by the pipeline's own builders from the setting's models and losses (what
:mod:`pipeline.dry_run` derives: random AlexNet weights where LPIPS has none here), and one
whole training iteration (forward, D step where there is one, G backward, optimizer) runs on
the CPU at 64² (the dry run's crop) under ``torch.utils.flop_counter.FlopCounterMode``, which
counts the convolutions and matrix products, forward and backward. Every model is fully
convolutional, so the count is scaled by the area to the setting's crop, and by its global
batch.

Projection (printed with its assumptions): the setting's steps x FLOPs per step, for all
``qualities``, divided by ``--gpus`` x ``--peak-tflops`` (H100 SXM dense bf16: 989) x each
``--utilization`` (the share of peak a network of 64-192-channel convolutions and grid
sampling sustains; not measured here: no GPU was lent). It assumes the qualities' stages run
side by side when the batch caps the data-parallel workers (the PLVC batch of 4 clips uses 4
GPUs, so 8 GPUs fit two qualities at once).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import Params, load_params
from pipeline.dry_run import DRY_CROP, dry_run_settings
from pipeline.train.phases.hific import hific_phases
from pipeline.train.phases.plvc import build_phase
from pipeline.train.phases.plvc_models import ClipBatch
from pipeline.train.stepper import PhaseStepper


def _iteration_flops(phase: Any, batch: Any, step: int) -> float:
    if hasattr(phase, "load_lpips"):
        phase.load_lpips()
    phase.setup(torch.device("cpu"))
    models = phase.build_models()
    stepper = PhaseStepper(phase, models, phase.build_optimizers(models), grad_clip=1.0)
    stepper.step(batch, step)  # the first step allocates; count the second
    with FlopCounterMode(display=False) as counter:
        stepper.step(batch, step + 1)
    return float(counter.get_total_flops())


def measure(full: Params, dry: Params, quality: str, crop: int) -> list[dict[str, Any]]:
    """One row per phase: FLOPs per sample at ``crop``², scaled to the full setting's step."""
    torch.manual_seed(0)
    rows = []
    warmup, gan = hific_phases(dry, quality)
    images = torch.rand(1, 3, crop, crop)
    full_hific = full.hific
    for name, phase, steps in (
        ("HiFiC warm-up", warmup, full_hific.warmup_steps),
        ("HiFiC GAN", gan, full_hific.gan_steps),
    ):
        if phase is None:
            continue
        phase = dataclasses.replace(phase, crop=crop)
        flops = _iteration_flops(phase, images, 1)
        rows.append(_row(name, flops, crop, full_hific.crop, full_hific.batch_size, steps))
    for phase_name, section in (("single_p", "single_p"), ("multi_p", "multi_p"), ("gan", "gan")):
        phase = build_phase(phase_name, dry, quality)
        cfg = getattr(full.train, section)
        frames = torch.rand(1, phase.clip_frames, 3, crop, crop)
        step = getattr(phase, "flow_steps", 0) + getattr(phase, "mc_steps", 0) + 1  # eq. 4 itself
        flops = _iteration_flops(phase, ClipBatch(frames, frames[:, 0]), step)
        rows.append(_row(f"PLVC {phase_name}", flops, crop, cfg.crop, cfg.batch_size, cfg.steps))
    return rows


def _row(
    name: str, flops: float, crop: int, full_crop: int, batch: int, steps: int
) -> dict[str, Any]:
    per_step = flops * (full_crop / crop) ** 2 * batch
    return {
        "phase": name,
        "steps": steps,
        "tflop_per_step": per_step / 1e12,
        "batch": batch,
        "crop": full_crop,
        "total_pflop": per_step * steps / 1e15,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params-full.yaml"))
    parser.add_argument("--quality", default="low")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--utilization", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    full = load_params(args.params)
    with tempfile.TemporaryDirectory() as tmp:
        import yaml

        settings, _ = dry_run_settings(args.params, args.quality, Path(tmp))
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(settings))
        dry = load_params(Path(tmp) / "params.yaml")
        rows = measure(full, dry, args.quality, DRY_CROP)
    qualities = len(full.qualities)
    print(f"{args.params}: FLOPs of one training iteration, counted at {DRY_CROP}² and scaled")
    print("\n| phase | crop, batch | TFLOP per step | steps per quality | PFLOP per quality |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['phase']} | {r['crop']}², {r['batch']} | {r['tflop_per_step']:.2f} | "
            f"{r['steps']:,} | {r['total_pflop']:,.0f} |"
        )
    total = sum(r["total_pflop"] for r in rows) * qualities
    print(f"| **all, {qualities} qualities** | | | | **{total:,.0f}** |")
    print()
    for u in args.utilization:
        hours = total * 1e15 / (args.gpus * args.peak_tflops * 1e12 * u) / 3600
        print(
            f"{args.gpus} GPUs at {args.peak_tflops:g} TFLOP/s peak, {u:.0%} sustained: "
            f"{hours:,.0f} h ({hours / 24:.1f} days)"
        )


if __name__ == "__main__":
    main()
