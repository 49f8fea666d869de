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
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Params, load_params
from pipeline.dry_run import DRY_CROP, train_every_phase, write_dry_run_params


def measure(full: Params, dry: Params, quality: str) -> list[dict[str, Any]]:
    """One row per phase: FLOPs of one sample at the dry run's crop, scaled to the full
    setting's crop and batch."""
    sections = {
        "hific_warmup": ("HiFiC warm-up", full.hific, full.hific.warmup_steps),
        "hific_gan": ("HiFiC GAN", full.hific, full.hific.gan_steps),
        "single_p": ("PLVC single-P", full.train.single_p, full.train.single_p.steps),
        "multi_p": ("PLVC multi-P", full.train.multi_p, full.train.multi_p.steps),
        "gan": ("PLVC GAN", full.train.gan, full.train.gan.steps),
    }
    rows = []
    for step in train_every_phase(dry, quality):
        name, cfg, steps = sections[step["phase"]]
        rows.append(_row(name, step["flops"], DRY_CROP, cfg.crop, cfg.batch_size, steps))
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
        dry_params, _ = write_dry_run_params(args.params, args.quality, Path(tmp))
        rows = measure(full, load_params(dry_params), args.quality)
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
