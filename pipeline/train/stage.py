"""What the three PLVC training stages share (``train_single_p``, ``train_multi_p``,
``train_gan``, one per quality): the stage CLIs in ``stages/`` only name their phase.

One stage execution (:func:`run_training_stage`):

1. one MLflow run ``<stage>-<quality>`` (:func:`pipeline.tracking.stage_run`);
2. Ray (local, or the cluster of ``RAY_ADDRESS``/``ray.address``) and the training clips
   with their decoded I-frames (:func:`pipeline.data.training_clips.read_training_clips` over
   ``paths.shards/train`` and ``paths.iframes/<q>/train``);
3. :func:`pipeline.train.runner.run_phase` in the Ray run :func:`ray_run_name` (stage, quality
   and a fingerprint of settings, seed, init weights and data: a re-run with the same ones
   resumes), starting from the previous phase's export, exporting to
   ``paths.models/<q>/<phase>/``;
4. a held-out check of the exported generator on test clips (:func:`heldout_metrics`);
5. ``paths.metrics/<q>/<stage>.json`` (DVC metrics: final training terms and the held-out
   check) and ``plots/<q>/<stage>.csv`` next to the metrics folder (DVC plots: the loss
   curves per step, :func:`loss_curves`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import QUALITIES, Params, load_params
from pipeline.io import write_csv_atomic
from pipeline.train.phase import RunnerError
from pipeline.train.phases.plvc import PHASE_STAGES, PLVCPhase, build_phase
from pipeline.train.runner import fingerprinted_run_name
from plvc.weights import file_sha256

__all__ = [
    "heldout_metrics",
    "iframe_intra_spec",
    "loss_curves",
    "plots_dir",
    "ray_run_name",
    "run_training_stage",
    "stage_metrics",
    "training_stage_main",
]

_PER_FRAME = re.compile(r"/p\d+$")


def plots_dir(params: Params) -> Path:
    """``plots/`` beside ``paths.metrics`` (the DVC plots files)."""
    return Path(params.paths.metrics).parent / "plots"


def iframe_intra_spec(iframe_root: Path) -> tuple[str, dict[str, Any]]:
    """``(name, config)`` of the intra codec that made the I-frames in ``iframe_root``
    (from its ``manifest.json``): what rebuilds it with ``plvc.intra.get_intra_codec``."""
    manifest = Path(iframe_root) / "manifest.json"
    try:
        data = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise RunnerError(
            f"{manifest} does not exist: run the iframes stage for this quality first"
        ) from None
    except (OSError, ValueError) as exc:
        raise RunnerError(f"{manifest}: cannot read the I-frame manifest: {exc}") from exc
    codec = data.get("codec")
    if not isinstance(codec, dict) or not isinstance(codec.get("name"), str):
        raise RunnerError(f"{manifest}: no 'codec' entry with a 'name'")
    config = {k: codec[k] for k in ("weights", "weights_sha256") if k in codec}
    if "weights" in config:
        # Ray Train workers run in their own working directory, and they read this file to
        # embed it in the exported codec bundle
        config["weights"] = str(Path(config["weights"]).resolve())
    return codec["name"], config


# ---------------------------------------------------------------------------------------
# held-out check


def _crop_to_stride(x: torch.Tensor, stride: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ch, cw = h - h % stride, w - w % stride
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]


def heldout_metrics(
    weights: str | os.PathLike[str],
    shard_dir: str | os.PathLike[str],
    iframe_dir: str | os.PathLike[str],
    *,
    max_clips: int,
    num_pframes: int = 6,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Estimated bpp and PSNR of an exported generator on ``max_clips`` clips of a split
    (whole frames, centre-cropped to the codec's stride), per P-frame position.

    The clips are spread evenly over the split's clips in shard order (so every source
    video of the sample is in), read straight from the Parquet files in this process: a
    handful of clips is not worth a Ray Data round trip.

    Eval mode: latents are rounded and the rate is ``-log2`` of the entropy models'
    likelihoods (what the arithmetic coder spends, up to a few bytes per stream; the
    evaluate stage codes real bitstreams). Reconstructions are rounded to 8 bits before
    PSNR (RGB, peak 1).

    Returns ``{"clips", "bpp", "psnr", "bpp_per_frame": {"p1": ...}, "psnr_per_frame": ...,
    "iframe_bpp", "iframe_psnr"}`` (means over clips; ``bpp`` and ``psnr`` also over the
    P-frames; the I-frames' bpp is their real bitstreams', stored with them, and their PSNR
    that of the decoded I-frame the P-frames start from).
    """
    from pipeline.data.clips import batch_to_tensor, decode_png_rgb
    from pipeline.data.datasets import SeptupletShards, spread_indices
    from pipeline.data.training_clips import load_iframes
    from plvc.entropy import bpp
    from plvc.weights import load_weights

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = load_weights(weights, map_location=dev)
    try:
        shards = SeptupletShards(shard_dir, num_frames=1 + num_pframes)
    except (FileNotFoundError, ValueError) as exc:
        raise RunnerError(f"held-out clips: {exc}") from exc
    iframe_dir = Path(iframe_dir)
    iframes = load_iframes(iframe_dir.parent, iframe_dir.name)
    indices = spread_indices(len(shards), max_clips)
    rates: list[list[float]] = []
    psnrs: list[list[float]] = []
    iframe_stats: list[tuple[float, float]] = []
    with torch.no_grad():
        for index in indices:
            item = shards[index]
            record = iframes.get(item["clip_id"])
            if record is None:
                raise RunnerError(
                    f"{iframe_dir} has no I-frame for held-out clip {item['clip_id']}: "
                    "re-run the iframes stage"
                )
            frames = _crop_to_stride(item["frames"].to(dev), model.stride)[None]
            decoded = batch_to_tensor(decode_png_rgb(record["iframe_png"]), dev)
            iframe = _crop_to_stride(decoded, model.stride)[None]
            out = model(frames, iframe)
            pixels = frames.shape[-2] * frames.shape[-1]
            x_hat = (out["x_hat"].clamp(0, 1) * 255).round() / 255
            mse = (x_hat - frames[:, 1:]).pow(2).mean(dim=(0, 2, 3, 4))
            rates.append([float(bpp(lik, pixels)) for lik in out["likelihoods"]])
            psnrs.append([float(-10 * math.log10(max(m, 1e-12))) for m in mse.tolist()])
            i_mse = float((iframe - frames[:, 0]).pow(2).mean())
            iframe_bpp = record["bits"] / (record["height"] * record["width"])
            iframe_stats.append((iframe_bpp, -10 * math.log10(max(i_mse, 1e-12))))
    if not rates:
        raise RunnerError(f"no held-out clips in {shard_dir}")
    rate, psnr = np.asarray(rates), np.asarray(psnrs)
    return {
        "clips": len(rates),
        "bpp": float(rate.mean()),
        "psnr": float(psnr.mean()),
        "bpp_per_frame": {f"p{i + 1}": float(v) for i, v in enumerate(rate.mean(axis=0))},
        "psnr_per_frame": {f"p{i + 1}": float(v) for i, v in enumerate(psnr.mean(axis=0))},
        "iframe_bpp": float(np.mean([b for b, _ in iframe_stats])),
        "iframe_psnr": float(np.mean([q for _, q in iframe_stats])),
    }


# ---------------------------------------------------------------------------------------
# metrics and curves


def stage_metrics(result: Mapping[str, Any], heldout: Mapping[str, Any] | None) -> dict[str, Any]:
    """The DVC metrics of a training stage: the last logged window's loss terms (rate,
    distortion, adversarial terms, D's outputs, α1 share; per-frame values and gradient
    norms left to the plots and MLflow), throughput, steps and the held-out check."""
    final = result.get("final_metrics", {})
    train = {
        k.removeprefix("train/"): v
        for k, v in final.items()
        if k.startswith("train/") and not _PER_FRAME.search(k) and "grad_norm" not in k
    }
    out: dict[str, Any] = {
        "steps": result.get("steps"),
        "train": dict(sorted(train.items())),
        "clips_per_s_per_worker": final.get("perf/clips_per_s_per_worker"),
        "world_size": result.get("world_size"),
    }
    if heldout is not None:
        out["heldout"] = dict(heldout)
    return out


def _chain(runs: Sequence[Any]) -> list[Any]:
    """The MLflow runs that trained one Ray run, oldest first: from the newest back to the
    one that started it (tag ``plvc.started_from_step`` = 0); runs killed before they
    ended have no such tag and are kept."""
    chain = []
    for run in sorted(runs, key=lambda r: r.info.start_time, reverse=True):
        chain.append(run)
        if run.data.tags.get("plvc.started_from_step") == "0":
            break
    return chain[::-1]


def loss_curves(
    ray_run_path: str, *, tracking_uri: str | None = None, experiment: str | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-step training scalars (``train/*`` without per-frame keys, and learning rates) of
    every MLflow run tagged with ``plvc.ray_run_path`` = ``ray_run_path`` since that Ray run
    started, so a resumed run's curves start at step 1. A later run's value wins on steps
    logged twice (after a restart from a checkpoint). Returns ``(rows, columns)``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    name = experiment or mlflow.get_experiment(mlflow.active_run().info.experiment_id).name
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return [], ["step"]
    escaped = ray_run_path.replace("'", "\\'")
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`plvc.ray_run_path` = '{escaped}'"
    )
    table: dict[int, dict[str, Any]] = {}
    keys: set[str] = set()
    for run in _chain(runs):
        for key in run.data.metrics:
            wanted = key.startswith("train/") or key.startswith("lr/")
            if not wanted or _PER_FRAME.search(key):
                continue
            column = key.removeprefix("train/")
            keys.add(column)
            for m in client.get_metric_history(run.info.run_id, key):
                table.setdefault(m.step, {"step": m.step})[column] = m.value
    columns = ["step", *sorted(keys)]
    return [table[s] for s in sorted(table)], columns


# ---------------------------------------------------------------------------------------
# the stage


def ray_run_name(
    stage: str,
    quality: str,
    phase: PLVCPhase,
    *,
    init_weights: Path | None,
    iframe_root: Path,
    seed: int,
) -> str:
    """``<stage>-<quality>-<fingerprint>``: the Ray Train run a stage trains in.

    The fingerprint covers everything that makes a checkpoint belong to this training: the
    phase's settings, the seed, the previous phase's weights (their SHA-256) and the data
    (the I-frame manifest, which records the shards' plans and the HiFiC weights' digest),
    but not ``steps``. So re-running a killed stage resumes its run, raising ``steps``
    continues it, and a change upstream (``dvc exp run -S train.gan.adversarial=false``,
    retrained single-P weights, new I-frames) starts a fresh run instead of resuming or
    re-exporting a stale one.
    """
    manifest = Path(iframe_root) / "manifest.json"
    identity = {
        "phase": phase.config(),
        "seed": seed,
        "init_weights": file_sha256(init_weights / "generator.pt") if init_weights else None,
        "data": file_sha256(manifest) if manifest.is_file() else None,
    }
    return fingerprinted_run_name(f"{stage}-{quality}", identity)


def _logged_params(params: Params, phase: PLVCPhase, quality: str) -> dict[str, Any]:
    section = PHASE_STAGES[phase.name][1]
    logged: dict[str, Any] = {
        "quality": quality,
        "train": {
            "model": params.train.model,
            section: getattr(params.train, section).model_dump(mode="json"),
        },
        "qualities": {quality: params.qualities[quality].model_dump(mode="json")},  # type: ignore[index]
        "runner": params.runner.model_dump(mode="json"),
    }
    if phase.name == "gan":
        logged["train"]["discriminator"] = params.train.discriminator
    return logged


def run_training_stage(phase_name: str, params: Params, quality: str) -> dict[str, Any]:
    """Run one PLVC training stage for ``quality`` (see the module docstring); returns the
    metrics written to ``paths.metrics/<q>/<stage>.json``."""
    import mlflow

    from pipeline.data.iframe_files import IFrameError
    from pipeline.data.training_clips import read_training_clips
    from pipeline.io import write_json_atomic
    from pipeline.ray_cluster import ray_session
    from pipeline.tracking import log_json_artifact, repo_root, stage_run
    from pipeline.train.checkpoint import ray_run_dir
    from pipeline.train.runner import resolve_storage_path, run_phase

    if phase_name not in PHASE_STAGES:
        raise RunnerError(f"unknown PLVC phase {phase_name!r}; one of {sorted(PHASE_STAGES)}")
    stage, section_name, previous = PHASE_STAGES[phase_name]
    section = getattr(params.train, section_name)
    paths = params.paths
    iframe_root = Path(paths.iframes) / quality
    name, config = iframe_intra_spec(iframe_root)
    phase = build_phase(phase_name, params, quality, intra_name=name, intra_config=config)
    mlflow_run_name = f"{stage}-{quality}"
    export_dir = Path(paths.models) / quality / phase_name
    init_weights = Path(paths.models) / quality / previous if previous else None
    if init_weights is not None and not (init_weights / "generator.pt").is_file():
        raise RunnerError(
            f"{init_weights / 'generator.pt'} does not exist: run "
            f"{PHASE_STAGES[previous][0]}@{quality} first"  # type: ignore[index]
        )
    run_name = ray_run_name(
        stage, quality, phase, init_weights=init_weights, iframe_root=iframe_root, seed=params.seed
    )
    storage = resolve_storage_path(params.runner.storage_path, repo_root())
    ray_run_path = ray_run_dir(storage, run_name)

    with stage_run(
        stage,
        params,
        logged_params=_logged_params(params, phase, quality),
        run_name=mlflow_run_name,
    ) as run:
        # set now, not only at the end, so a killed stage's curves are found on resume
        mlflow.set_tag("plvc.ray_run_path", ray_run_path)
        with ray_session(params):
            try:
                datasets = {
                    "train": read_training_clips(
                        Path(paths.shards) / "train",
                        iframe_root / "train",
                        # whole frames: the phase cuts a fresh window per clip and step
                        crop=None,
                        random_flip=False,
                        seed=params.seed,
                        num_frames=phase.clip_frames,
                    )
                }
            except IFrameError as exc:
                raise RunnerError(str(exc)) from exc
            result = run_phase(
                phase,
                params,
                stage=stage,
                run_name=run_name,
                datasets=datasets,
                max_steps=section.steps,
                init_weights=init_weights,
                export_dir=export_dir,
            )
            mlflow.set_tag("plvc.started_from_step", str(result.get("started_from_step") or 0))
            heldout = heldout_metrics(
                export_dir / "generator.pt",
                Path(paths.shards) / "test",
                iframe_root / "test",
                max_clips=params.train.heldout_clips,
            )
        mlflow.log_metrics(
            {
                "heldout/bpp": heldout["bpp"],
                "heldout/psnr": heldout["psnr"],
                "heldout/iframe_bpp": heldout["iframe_bpp"],
                "heldout/iframe_psnr": heldout["iframe_psnr"],
                **{f"heldout/bpp/{k}": v for k, v in heldout["bpp_per_frame"].items()},
                **{f"heldout/psnr/{k}": v for k, v in heldout["psnr_per_frame"].items()},
            }
        )
        metrics = stage_metrics(result, heldout)
        write_json_atomic(Path(paths.metrics) / quality / f"{stage}.json", metrics)
        rows, columns = loss_curves(ray_run_path, experiment=params.tracking.experiment)
        plot_file = plots_dir(params) / quality / f"{stage}.csv"
        write_csv_atomic(plot_file, rows, columns)
        mlflow.log_artifact(str(plot_file))
        log_json_artifact(metrics, "metrics.json")
        print(
            f"[{run_name}] held-out ({heldout['clips']} clips, 6 P-frames; trained on "
            f"{phase.num_pframes}): P-frames {heldout['bpp']:.4f} bpp, {heldout['psnr']:.2f} dB; "
            f"I-frames {heldout['iframe_bpp']:.4f} bpp, {heldout['iframe_psnr']:.2f} dB "
            f"(MLflow run {run.info.run_id})",
            flush=True,
        )
    return metrics


def training_stage_main(phase_name: str, description: str, argv: list[str] | None) -> None:
    """The whole CLI of a training stage: ``--quality {low,medium,high} [--params FILE]``."""
    from pipeline.cli import stage_parser

    parser: argparse.ArgumentParser = stage_parser(description)
    parser.add_argument(
        "--quality", required=True, choices=QUALITIES, help="operating point (Table 1 row)"
    )
    args = parser.parse_args(argv)
    run_training_stage(phase_name, load_params(args.params), args.quality)
