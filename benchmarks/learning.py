"""Does the pipeline train a codec that works? Learning curves on the built-in sample.

    .venv/bin/python -m benchmarks.learning [--cpu-minutes 10] [--seeds 0 1 2]
        [--plvc-minutes 8] [--single-p-share 0.5] [--gan-minutes 3]
        [--anchor-lmbda 0.013 0.0018] [--out reports/learning] [--work DIR]

Everything trains through the real phase classes and the real runner (Ray Train,
``--workers`` workers, checkpoints, resume) on the sample's shards, and is measured on real
bitstreams of the sample's *test* clips (bytes written to disk, read back, decoded):

1. HiFiC (``hific.preset``, the ``low`` operating point and crop of ``--params``, ``--batch``
   images per step): warm-up for
   ``--cpu-minutes`` of training wall time, then ``--gan-minutes`` of its GAN phase; once per
   ``--seeds`` (no seed may stall).
2. The anchor at the same budget, crops, batch and data: CompressAI's ``bmshj2018-hyperprior``
   (quality 3, random init, Adam 1e-4, ``R + λ·255²·MSE``, one run per ``--anchor-lmbda``:
   0.013 is quality 3's, 0.0018 quality 1's, which lands near HiFiC's rate on the sample;
   :mod:`pipeline.train.phases.anchor`). Re-measured in every run: it is the reference.
3. PLVC on top of the first seed's HiFiC I-frames (coded by the ``iframes`` stage's
   :func:`~pipeline.data.iframes.code_iframes`): single-P, then multi-P, then the GAN phase
   (``train.*`` and ``qualities.low`` of ``--params``), ``--plvc-minutes`` split between them
   (``--single-p-share`` to single-P).
   Test clips are coded by :func:`plvc.codec.encode_video` (GOP 7: an I-frame then 6 P-frames).

Each phase is one Ray run that checkpoints every 25 steps; every checkpoint is measured after
the run. Its length is set from the budget and the speed of its first 25 steps (a first
``run_phase`` call, which the second resumes). Training time is what the steps took (the
runner's steps/s per checkpoint window): Ray Train's start-up and the measuring are not
counted.

Writes ``<out>/learning.csv`` (one row per model, seed and mark) and ``<out>/learning.png``
(held-out PSNR and bpp against steps and training minutes), and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Params, load_params, with_every_quality
from pipeline.ray_cluster import ray_session, skip_known_ray_noise

#: steps between checkpoints, each one a measured point of the curves
EVERY = 25
COLUMNS = (
    "model",
    "phase",
    "seed",
    "step",
    "train_s",
    "bpp",
    "psnr",
    "iframe_bpp",
    "iframe_psnr",
    "pframe_bpp",
    "pframe_psnr",
    "p1_psnr",
    "p6_psnr",
    "p1_bpp",
    "p6_bpp",
    "train_bpp",
    "d_real",
    "d_fake",
)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of 8-bit-rounded images in [0, 1]."""
    a8 = (a.clamp(0, 1) * 255).round()
    b8 = (b.clamp(0, 1) * 255).round()
    mse = float((a8 - b8).pow(2).mean()) / 255**2
    return -10 * math.log10(max(mse, 1e-12))


def prepare_sample(params: Params, work: Path) -> Path:
    """The sample's raw folder and shards under ``work`` (kept between runs); the shard root."""
    from pipeline.data.download import prepare_raw
    from pipeline.data.shards import shard_septuplets

    raw, shards = work / "raw", work / "shards"
    prepare_raw(params.download, raw, work / "downloads", progress=False)
    if not (shards / "manifest.json").is_file():
        cfg = params.shard
        shard_septuplets(
            raw,
            shards,
            rows_per_shard=cfg.rows_per_shard,
            row_group_rows=cfg.row_group_rows,
            max_skipped_fraction=cfg.max_skipped_fraction,
            workers=cfg.workers,
            progress=False,
            expected_size=params.frame_size(),
            verify=cfg.verify,
        )
    return shards


def heldout_clips(shards: Path, count: int) -> list[torch.Tensor]:
    """``count`` test clips spread over the split (every source video, as the training
    stages' held-out check picks them), whole frames ``[7, 3, H, W]`` in [0, 1]."""
    from pipeline.data.datasets import SeptupletShards, spread_indices

    data = SeptupletShards(shards / "test")
    return [data[i]["frames"] for i in spread_indices(len(data), count)]


# ----------------------------------------------------------------------------- measuring


def measure_image_codec(
    encode: Callable[[torch.Tensor], bytes],
    decode: Callable[[bytes], torch.Tensor],
    images: list[torch.Tensor],
    folder: Path,
) -> dict[str, float]:
    """Real bitstreams of ``images``: written to ``folder``, read back and decoded."""
    folder.mkdir(parents=True, exist_ok=True)
    bits, psnrs = [], []
    for i, image in enumerate(images):
        path = folder / f"image{i}.bin"
        path.write_bytes(encode(image))
        data = path.read_bytes()
        bits.append(8 * len(data) / (image.shape[-2] * image.shape[-1]))
        psnrs.append(_psnr(decode(data), image))
    return {"bpp": float(np.mean(bits)), "psnr": float(np.mean(psnrs))}


def measure_hific(export_dir: Path, images: list[torch.Tensor], folder: Path) -> dict[str, float]:
    from plvc.intra import get_intra_codec

    codec = get_intra_codec("hific", weights=str(export_dir / "hific.pt"))
    return measure_image_codec(codec.encode, codec.decode, images, folder)


def measure_anchor(export_dir: Path, images: list[torch.Tensor], folder: Path) -> dict[str, float]:
    from pipeline.train.phases.anchor import load_anchor

    model = load_anchor(export_dir / "anchor.pt")
    return measure_image_codec(model.encode, model.decode, images, folder)


def measure_plvc(
    weights: Path, intra: Any, clips: list[torch.Tensor], folder: Path
) -> dict[str, float]:
    """Each clip coded as one GOP (I + 6 P) by ``plvc.codec.encode_video``, decoded from the
    file; bpp per frame from the stream's frame payloads (container framing excluded)."""
    from plvc.codec import decode_video, encode_video
    from plvc.weights import load_weights

    model, _ = load_weights(weights, map_location="cpu")
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    bpps, psnrs = [], []
    for i, clip in enumerate(clips):
        result = encode_video(clip, model, intra, gop=clip.shape[0])
        path = folder / f"clip{i}.plvc"
        path.write_bytes(result.data)
        decoded = decode_video(path.read_bytes(), model, intra=intra)
        pixels = clip.shape[-2] * clip.shape[-1]
        bpps.append([s.bits / pixels for s in result.frame_stats])
        psnrs.append([_psnr(decoded[t], clip[t]) for t in range(clip.shape[0])])
    bpp, psnr = np.asarray(bpps).mean(axis=0), np.asarray(psnrs).mean(axis=0)
    return {
        "bpp": float(bpp.mean()),
        "psnr": float(psnr.mean()),
        "iframe_bpp": float(bpp[0]),
        "iframe_psnr": float(psnr[0]),
        "pframe_bpp": float(bpp[1:].mean()),
        "pframe_psnr": float(psnr[1:].mean()),
        "p1_bpp": float(bpp[1]),
        "p6_bpp": float(bpp[-1]),
        "p1_psnr": float(psnr[1]),
        "p6_psnr": float(psnr[-1]),
    }


# ----------------------------------------------------------------------------- training


def train_to_marks(
    phase: Any,
    params: Params,
    *,
    name: str,
    work: Path,
    datasets: dict[str, Any],
    budget_s: float,
    measure: Callable[[Path, int], dict[str, float]],
    init_weights: Path | None = None,
    row: dict[str, Any],
    rows: list[dict[str, Any]],
    out: Path,
) -> Path:
    """Train ``phase`` for about ``budget_s`` seconds of training time in one Ray run that
    checkpoints every ``EVERY`` steps, then measure every checkpoint; returns the export folder.

    The step count is set from the speed of a first ``EVERY`` steps (a first ``run_phase``
    call that the second resumes). Training time is what the steps took (the runner's
    ``perf/steps_per_s`` over each checkpoint's window), without Ray Train's start-up.
    """
    from pipeline.tracking import repo_root
    from pipeline.train.checkpoint import load_models, ray_run_dir, read_checkpoint_meta
    from pipeline.train.runner import resolve_storage_path, run_phase

    export_dir = work / "models" / name

    def train(steps: int) -> dict[str, Any]:
        return run_phase(
            phase,
            params,
            stage="learning",
            run_name=name,
            datasets=datasets,
            max_steps=steps,
            init_weights=init_weights,
            export_dir=export_dir,
        )

    first = train(EVERY)
    speed = first["final_metrics"]["perf/steps_per_s"]
    total = max(EVERY, round(budget_s * speed / EVERY) * EVERY)
    if total > EVERY:
        train(total)
    run_dir = Path(ray_run_dir(resolve_storage_path(params.runner.storage_path, repo_root()), name))
    spent, previous = 0.0, 0
    for checkpoint in sorted(p for p in run_dir.glob("checkpoint_0*") if p.is_dir()):
        meta = read_checkpoint_meta(checkpoint)
        final = meta.get("metrics", {})
        step = int(meta["step"])
        spent += (step - previous) / final.get("perf/steps_per_s", speed)
        previous = step
        models = phase.build_models()
        load_models(checkpoint, models, "cpu")
        mark_dir = work / "models" / f"{name}-{step}"
        mark_dir.mkdir(parents=True, exist_ok=True)
        phase.export(models, mark_dir)
        entry = {
            **row,
            "step": step,
            "train_s": round(spent, 1),
            **measure(mark_dir, step),
            "train_bpp": final.get("train/bpp"),
            "d_real": final.get("train/d_real_prob", final.get("train/d_real")),
            "d_fake": final.get("train/d_fake_prob", final.get("train/d_fake")),
        }
        rows.append(entry)
        _write_csv(rows, out / "learning.csv")
        shown = " ".join(
            f"{k}={_fmt(v)}" for k, v in entry.items() if v is not None and k not in row
        )
        print(f"[{row['model']}/{row['phase']} seed {row['seed']}] {shown}", flush=True)
    return export_dir


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    from pipeline.io import write_csv_atomic

    write_csv_atomic(path, rows, COLUMNS)


def _params(base: Params, work: Path, workers: int, seed: int) -> Params:
    runner = base.runner.model_copy(
        update={
            "num_workers": workers,
            # one training thread per worker; the other core decodes clips (Ray Data)
            "cpus_per_worker": 1.0,
            "storage_path": str(work / "ray_results"),
            "checkpoint_every": EVERY,
            "num_to_keep": 1000,  # every checkpoint is a point of the curve
            "log_every": EVERY,
        }
    )
    return base.model_copy(update={"runner": runner, "seed": seed})


def run_image_codecs(
    args: argparse.Namespace, base: Params, shards: Path, rows: list[dict[str, Any]]
) -> dict[int, Path]:
    from pipeline.data.datasets import read_encoded_septuplets_ray
    from pipeline.train.phases.anchor import HyperpriorAnchorPhase
    from pipeline.train.phases.hific import hific_phases

    images = [clip[0] for clip in heldout_clips(shards, args.test_clips)]
    datasets = {"train": read_encoded_septuplets_ray(shards / "train")}
    hific_exports = {}
    for seed in args.seeds:
        params = _params(base, args.work, args.workers, seed)
        warmup, gan = hific_phases(params, "low")
        warmup = dataclasses.replace(warmup, batch_size=args.batch)
        gan = dataclasses.replace(gan, batch_size=args.batch) if gan is not None else None
        tag = f"s{seed}-{os.getpid()}"
        export = train_to_marks(
            warmup,
            params,
            name=f"hific-warmup-{tag}",
            work=args.work,
            datasets=datasets,
            budget_s=60 * args.cpu_minutes,
            measure=lambda d, m: measure_hific(d, images, args.work / "streams" / "hific"),
            row={"model": "hific", "phase": "warmup", "seed": seed},
            rows=rows,
            out=args.out,
        )
        hific_exports[seed] = export
        if gan is not None and args.gan_minutes > 0:
            # the loss's warm-up schedule counts the steps actually trained
            gan_phase = dataclasses.replace(gan, step_offset=int(rows[-1]["step"]))
            hific_exports[seed] = train_to_marks(
                gan_phase,
                params,
                name=f"hific-gan-{tag}",
                work=args.work,
                datasets=datasets,
                budget_s=60 * args.gan_minutes,
                measure=lambda d, m: measure_hific(d, images, args.work / "streams" / "hific"),
                init_weights=export,
                row={"model": "hific", "phase": "gan", "seed": seed},
                rows=rows,
                out=args.out,
            )
    if not args.skip_anchor:
        params = _params(base, args.work, args.workers, args.seeds[0])
        cfg = params.hific
        for lmbda in args.anchor_lmbda:
            anchor = HyperpriorAnchorPhase(
                lmbda=lmbda,
                batch_size=args.batch,
                crop=cfg.crop,
                random_flip=params.data.random_flip,
            )
            train_to_marks(
                anchor,
                params,
                name=f"anchor-l{lmbda:g}-s{args.seeds[0]}-{os.getpid()}",
                work=args.work,
                datasets=datasets,
                budget_s=60 * args.cpu_minutes,
                measure=lambda d, m: measure_anchor(d, images, args.work / "streams" / "anchor"),
                row={
                    "model": "bmshj2018-hyperprior",
                    "phase": f"rd lambda={lmbda:g}",
                    "seed": args.seeds[0],
                },
                rows=rows,
                out=args.out,
            )
    return hific_exports


def run_plvc(
    args: argparse.Namespace,
    base: Params,
    shards: Path,
    hific_export: Path,
    rows: list[dict[str, Any]],
) -> None:
    from pipeline.data.iframes import code_iframes
    from pipeline.data.training_clips import read_training_clips
    from pipeline.train.phases.plvc import build_phase
    from pipeline.train.stage import iframe_intra_spec
    from plvc.intra import get_intra_codec

    seed = args.seeds[0]
    params = _params(base, args.work, args.workers, seed)
    iframes = args.work / f"iframes-{os.getpid()}"
    code_iframes(
        shards,
        iframes,
        hific_export / "hific.pt",
        quality="low",
        batch_size=8,
        num_actors=1,
        use_gpu=False,
        progress=False,
    )
    intra_name, intra_config = iframe_intra_spec(iframes)
    intra = get_intra_codec(intra_name, **intra_config)
    clips = heldout_clips(shards, args.test_clips)
    split = {"single_p": args.single_p_share, "multi_p": 1.0 - args.single_p_share}
    init: Path | None = None
    for name in ("single_p", "multi_p", "gan"):
        phase = build_phase(name, params, "low", intra_name=intra_name, intra_config=intra_config)
        if args.plvc_batch:
            phase = dataclasses.replace(phase, batch_size=args.plvc_batch)
        datasets = {
            "train": read_training_clips(
                shards / "train",
                iframes / "train",
                crop=None,
                random_flip=False,
                seed=seed,
                num_frames=phase.clip_frames,
            )
        }
        minutes = args.gan_minutes if name == "gan" else args.plvc_minutes * split[name]
        init = train_to_marks(
            phase,
            params,
            name=f"plvc-{name}-s{seed}-{os.getpid()}",
            work=args.work,
            datasets=datasets,
            budget_s=60 * minutes,
            measure=lambda d, m, n=name: measure_plvc(
                d / "generator.pt", intra, clips, args.work / "streams" / n
            ),
            init_weights=init,
            row={"model": "plvc", "phase": name, "seed": seed},
            rows=rows,
            out=args.out,
        )


# ----------------------------------------------------------------------------- report


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    curves: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        curves.setdefault(f"{r['model']}/{r['phase']} s{r['seed']}", []).append(r)
    for label, pts in curves.items():
        steps = [p["step"] for p in pts]
        minutes = [p["train_s"] / 60 for p in pts]
        plvc = pts[0]["model"] == "plvc"
        psnr = [p["pframe_psnr"] if plvc else p["psnr"] for p in pts]
        bpp = [p["pframe_bpp"] if plvc else p["bpp"] for p in pts]
        name = label + (" (P-frames)" if plvc else "")
        axes[0][0].plot(steps, psnr, marker="o", label=name)
        axes[0][1].plot(minutes, psnr, marker="o", label=name)
        axes[1][0].plot(steps, bpp, marker="o", label=name)
        axes[1][1].plot(bpp, psnr, marker="o", label=name)
    axes[0][0].set(xlabel="step", ylabel="held-out PSNR (dB)")
    axes[0][1].set(xlabel="training wall time (min, 2 cores)", ylabel="held-out PSNR (dB)")
    axes[1][0].set(xlabel="step", ylabel="held-out bpp (real bitstreams)")
    axes[1][1].set(xlabel="bpp", ylabel="PSNR (dB)")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Learning on the sample's test clips (benchmarks/learning.py)")
    fig.tight_layout()
    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--cpu-minutes", type=float, default=10.0, help="per image codec")
    parser.add_argument("--gan-minutes", type=float, default=3.0, help="per GAN phase")
    parser.add_argument("--plvc-minutes", type=float, default=8.0, help="single-P + multi-P")
    parser.add_argument(
        "--single-p-share",
        type=float,
        default=0.5,
        help="part of --plvc-minutes for single-P (the rest: multi-P)",
    )
    parser.add_argument(
        "--anchor-lmbda",
        type=float,
        nargs="+",
        default=[0.013],
        help="the anchor's λ (one anchor run each): 0.013 is CompressAI's quality 3, "
        "0.0018 its quality 1 (near HiFiC's rate on the sample)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="images per step, both codecs")
    parser.add_argument(
        "--plvc-batch",
        type=int,
        default=4,
        help="clips per PLVC step (4: the README figures; 0: params.yaml's global batch)",
    )
    parser.add_argument("--test-clips", type=int, default=8)
    parser.add_argument("--skip-anchor", action="store_true")
    parser.add_argument("--skip-plvc", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/plvc-learning"))
    parser.add_argument("--out", type=Path, default=Path("reports/learning"))
    args = parser.parse_args()
    skip_known_ray_noise()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    base = with_every_quality(load_params(args.params))
    shards = prepare_sample(base, args.work)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with ray_session(base):
        hific = run_image_codecs(args, base, shards, rows)
        if not args.skip_plvc:
            run_plvc(args, base, shards, hific[args.seeds[0]], rows)
    _write_csv(rows, args.out / "learning.csv")
    plot(rows, args.out / "learning.png")
    print(f"\n{len(rows)} marks in {(time.perf_counter() - started) / 60:.1f} min")
    keys = ("model", "phase", "seed", "step", "train_s", "bpp", "psnr", "pframe_bpp")
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(_fmt(r.get(k)) for k in keys))
    print(f"wrote {args.out / 'learning.csv'} and {args.out / 'learning.png'}")


if __name__ == "__main__":
    main()
