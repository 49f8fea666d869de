"""The HiFiC I-frame stage ``train_hific@<quality>``: warm-up then adversarial.

Trains on the training shards through the Ray Train runner (:mod:`pipeline.train.runner`), two
Ray Train runs nested as MLflow runs under this stage's run:

1. ``train_hific-<q>-warmup`` (:class:`~pipeline.train.phases.hific.HiFiCWarmupPhase`,
   ``hific.warmup_steps``), exported to ``paths.models/<q>/hific_warmup/``;
2. ``train_hific-<q>-gan`` (:class:`~pipeline.train.phases.hific.HiFiCGANPhase`,
   ``hific.gan_steps``),
   started from that export, exported to ``paths.models/<q>/hific/``.

With ``hific.gan_steps: 0`` the warm-up exports straight to ``paths.models/<q>/hific/``. With
``hific.pretrained.<q>`` set, that checkpoint is checked (``plvc.hific.load_hific``) and
copied to ``paths.models/<q>/hific/`` instead of training. Either way the folder holds
``hific.pt`` and ``result.json``; ``paths.metrics/<q>/train_hific.json`` holds the final
training metrics (bpp, MSE, PSNR, D terms). Re-running continues the Ray Train runs from
their checkpoints under ``runner.storage_path``: the Ray run names carry a fingerprint of the
phase's settings, the seed, the shards' manifest and the warm-up weights, so a changed setting
(``dvc exp run -S hific.lr=...``) starts fresh runs instead.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import mlflow

from pipeline.config import QUALITIES, ConfigError, Params, load_params
from pipeline.io import replace_dir, write_json_atomic
from pipeline.tracking import log_json_artifact, stage_run

__all__ = ["hific_stage_main", "run_hific_stage"]

STAGE = "train_hific"

# training metrics worth a DVC metric, per phase (keys of result.json's final_metrics)
_G_METRICS = ("loss", "bpp", "bpp_quantized", "mse", "psnr", "lpips", "gan")
_D_METRICS = ("d_loss", "d_real_loss", "d_fake_loss", "d_real_prob", "d_fake_prob")


def _summary(result: dict[str, Any]) -> dict[str, float | int]:
    final = result.get("final_metrics", {})
    out: dict[str, float | int] = {"steps": result["steps"]}
    for key in (*_G_METRICS, *_D_METRICS):
        if f"train/{key}" in final:
            out[key] = final[f"train/{key}"]
    return out


def _export_pretrained(source: Path, quality: str, out_dir: Path) -> dict[str, Any]:
    from plvc.errors import WeightsError
    from plvc.hific import load_hific
    from plvc.weights import file_sha256

    try:
        model, meta = load_hific(source)
    except WeightsError as exc:
        raise WeightsError(f"hific.pretrained.{quality}: {exc}") from exc
    digest = file_sha256(source)
    result = {
        "stage": STAGE,
        "source": "pretrained",
        "pretrained_path": str(source),
        "weights_sha256": digest,
        "config": model.config.to_dict(),
        "checkpoint_meta": meta,
        "exported_files": ["hific.pt"],
    }

    def build(tmp: Path) -> None:
        shutil.copyfile(source, tmp / "hific.pt")  # byte for byte: the digest stays the user's
        write_json_atomic(tmp / "result.json", result)

    replace_dir(out_dir, build)
    return result


def run_hific_stage(params: Params, quality: str) -> dict[str, Any]:
    """Train (or take the pretrained checkpoint of) one quality's HiFiC; returns the metrics
    written to ``paths.metrics/<q>/train_hific.json``."""
    cfg = params.hific
    out_dir = params.paths.models / quality / "hific"
    metrics_path = params.paths.metrics / quality / "train_hific.json"
    logged = cfg.model_dump(mode="json")
    logged["operating_point"] = logged.pop("operating_points").get(quality)
    logged["pretrained"] = logged.pop("pretrained").get(quality)
    logged_params = {
        "quality": quality,
        "hific": logged,
        "runner": params.runner.model_dump(mode="json"),
        "data.random_flip": params.data.random_flip,
    }
    pretrained = cfg.pretrained.get(quality)  # type: ignore[call-overload]

    with stage_run(STAGE, params, logged_params=logged_params, run_name=f"{STAGE}@{quality}"):
        if pretrained is not None:
            result = _export_pretrained(Path(pretrained), quality, out_dir)
            print(
                f"[{STAGE}@{quality}] hific.pretrained.{quality} = {pretrained}: checkpoint "
                f"checked and exported to {out_dir}; no training",
                flush=True,
            )
            mlflow.set_tag("plvc.hific_source", "pretrained")
            log_json_artifact(result, "result.json")
            metrics: dict[str, Any] = {
                "quality": quality,
                "source": "pretrained",
                "weights_sha256": result["weights_sha256"],
            }
            write_json_atomic(metrics_path, metrics)
            return metrics

        from pipeline.data.shards import list_shards
        from pipeline.train.phases.hific import hific_phases

        warmup, gan = hific_phases(params, quality)
        # everything that can fail on input fails here, before Ray starts
        warmup.load_lpips()
        if gan is not None:
            gan.load_lpips()
        shard_dir = params.paths.shards / "train"
        if not list_shards(shard_dir):
            raise ConfigError(f"no training shards in {shard_dir}: run the shard stage first")
        mlflow.set_tag("plvc.hific_source", "trained")
        results = _train(params, quality, warmup, gan, shard_dir, out_dir)

        metrics = {"quality": quality, "source": "trained"}
        for phase_name, result in results.items():
            summary = _summary(result)
            metrics[phase_name] = summary
            mlflow.log_metrics({f"{phase_name}/{k}": float(v) for k, v in summary.items()})
        final = results.get("gan", results["warmup"])
        log_json_artifact(final, "result.json")
        write_json_atomic(metrics_path, metrics)
    return metrics


def _train(
    params: Params, quality: str, warmup: Any, gan: Any, shard_dir: Path, out_dir: Path
) -> dict[str, dict[str, Any]]:
    from mlflow.tracking import MlflowClient

    from pipeline.data.datasets import read_encoded_septuplets_ray
    from pipeline.ray_cluster import ray_session
    from pipeline.train.runner import fingerprinted_run_name, run_phase
    from plvc.weights import file_sha256

    cfg = params.hific
    shard_manifest = shard_dir.parent / "manifest.json"
    stage_run_id = mlflow.active_run().info.run_id
    tags = {
        k: v
        for k, v in MlflowClient().get_run(stage_run_id).data.tags.items()
        if k.startswith("plvc.") and k != "plvc.role"
    }
    with ray_session(params):
        # encoded clips: the phases decode only the frames they draw, and cut a fresh window
        # from each every step
        datasets = {"train": read_encoded_septuplets_ray(shard_dir)}
        runs = [("warmup", warmup, cfg.warmup_steps)]
        if gan is not None:
            runs.append(("gan", gan, cfg.gan_steps))
        results: dict[str, dict[str, Any]] = {}
        init_weights = None
        for phase_name, phase, steps in runs:
            last = phase_name == runs[-1][0]
            export_dir = out_dir if last else params.paths.models / quality / "hific_warmup"
            mlflow_name = f"{STAGE}-{quality}-{phase_name}"
            # the Ray run resumes only a training of the same settings, seed and inputs
            identity = {
                "phase": phase.config(),
                "seed": params.seed,
                "data": file_sha256(shard_manifest) if shard_manifest.is_file() else None,
                "init_weights": file_sha256(init_weights / "hific.pt") if init_weights else None,
            }
            ray_name = fingerprinted_run_name(mlflow_name, identity)
            # one nested MLflow run per Ray Train run: each phase's curves start at step 1
            phase_tags = {**tags, "plvc.role": "phase", "plvc.phase": phase.name}
            with mlflow.start_run(run_name=mlflow_name, nested=True, tags=phase_tags):
                results[phase_name] = run_phase(
                    phase,
                    params,
                    stage=STAGE,
                    run_name=ray_name,
                    datasets=datasets,
                    max_steps=steps,
                    init_weights=init_weights,
                    export_dir=export_dir,
                )
            init_weights = export_dir
        return results


def hific_stage_main(argv: list[str] | None, description: str) -> None:
    """The whole CLI of ``train_hific``: ``--quality {low,medium,high} [--params FILE]``."""
    from pipeline.cli import stage_parser

    parser: argparse.ArgumentParser = stage_parser(description)
    parser.add_argument(
        "--quality", required=True, choices=QUALITIES, help="operating point of the I-frames"
    )
    args = parser.parse_args(argv)
    run_hific_stage(load_params(args.params), args.quality)
