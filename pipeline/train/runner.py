"""The distributed training runner shared by every training phase (HiFiC I-frames, PLVC's
single-P, multi-P and adversarial phases).

A stage describes *what* to train as a :class:`TrainingPhase` (its models, optimizers and
loss functions); :func:`run_phase` does everything else on Ray Train (V2):

- one ``TorchTrainer`` run per stage; ``num_workers`` workers with fractional CPUs
  (``runner.cpus_per_worker``) so Ray Data keeps cores to decode clips, or one GPU each;
- DDP (gloo on CPU, NCCL on GPU), generator and discriminator wrapped separately;
- bf16 autocast on GPU (``runner.bf16``), gradient clipping (``runner.grad_clip``);
- CompressAI's auxiliary (entropy-bottleneck quantile) loss with its own optimizer;
- GAN iterations: one D step, then one G step in which D is frozen and un-synced;
- a non-finite loss term or gradient stops the run with an error naming step and term;
- checkpoints every ``runner.checkpoint_every`` steps and at the end, holding models,
  optimizers, schedulers, step and every rank's RNG state (layout:
  :mod:`pipeline.train.checkpoint`);
- resume: after a worker failure Ray restarts the workers from the last checkpoint (at most
  ``runner.max_failures`` times); re-running the stage with the same run name and
  ``runner.storage_path`` continues that run; a run that already reached ``max_steps``
  is only exported again;
- MLflow, from rank 0 into the stage's own run: every loss term, the learning rates,
  gradient norms and throughput every ``runner.log_every`` steps, sample images every
  ``runner.image_every`` steps, sent by a background thread that keeps the metrics while the
  server is away (:class:`~pipeline.train.reporting.MlflowSink`);
- the final weights exported atomically to ``export_dir`` (the DVC-tracked folder) with a
  ``result.json`` (steps, the step it resumed from, each rank's Ray node, the metric values
  the tracking server never took, the checkpoint exported).

A stage uses it like this::

    with stage_run(stage, params, run_name=run_name):
        init_ray(params)
        datasets = {"train": read_septuplets_ray(params.paths.shards / "train", ...)}
        result = run_phase(
            SinglePPhase(quality=params.qualities["low"], ...), params,
            stage="train_single_p", run_name="train_single_p-low", datasets=datasets,
            max_steps=200_000, init_weights=None, export_dir=Path("models/low/single_p"),
        )

Running on a cluster
--------------------
Without an address, the stage's :func:`pipeline.ray_cluster.init_ray` starts a local Ray on
127.0.0.1 and the workers run on this machine. To run a phase on an existing cluster, submit
the stage as a Ray job from the repository root::

    ray job submit --address http://<head>:8265 --working-dir . -- \
        python -m stages.<stage> --params params.yaml

Inside the job ``RAY_ADDRESS`` is set, so ``init_ray`` joins that cluster and the workers
are scheduled on its nodes (``runner.use_gpu: true`` for GPU nodes,
``runner.placement_strategy`` to pack or spread them). Every node must see
``runner.storage_path`` (an ``s3://``/``gs://`` URI or a shared NFS folder) and the shard
folders; checkpoints live there, so a re-submitted job resumes the run. The weights are
exported by the driver process (the job's entrypoint on the head node), into
``export_dir`` relative to its working directory. What each fault costs, and how it is tested
here: ``docs/cluster.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Params, RunnerConfig
from pipeline.io import replace_dir, write_json_atomic

if TYPE_CHECKING:
    import ray.data
    import ray.train
from pipeline.train.checkpoint import check_resumable, latest_checkpoint, load_models, ray_run_dir
from pipeline.train.entry import pack_loop_config, train_worker
from pipeline.train.phase import (
    DataError,
    NonFiniteLossError,
    RunnerError,
    TrainingPhase,
    TrainingRunError,
)

__all__ = [
    "fingerprinted_run_name",
    "resolve_storage_path",
    "run_phase",
]


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")


def _export(
    phase: TrainingPhase,
    checkpoint: ray.train.Checkpoint,
    export_dir: Path,
    result: dict[str, Any],
) -> list[str]:
    """Final weights from ``checkpoint`` into ``export_dir`` with ``result.json``, atomically."""
    models = phase.build_models()
    with checkpoint.as_directory() as d:
        load_models(Path(d), models, "cpu")

    def build(tmp: Path) -> list[str]:
        phase.export(models, tmp)
        files = sorted(p.name for p in tmp.iterdir())
        write_json_atomic(tmp / "result.json", {**result, "exported_files": files})
        return files

    return replace_dir(export_dir, build)


def _fit(
    cfg: RunnerConfig,
    loop_config: dict[str, Any],
    datasets: Mapping[str, ray.data.Dataset],
    storage: str,
    *,
    stage: str,
    run_dir: str,
) -> tuple[dict[str, Any], ray.train.Checkpoint]:
    """One ``TorchTrainer.fit`` of :func:`~pipeline.train.worker.train_worker` (through
    :mod:`pipeline.train.entry`); returns rank 0's
    summary and the last checkpoint, or raises the error that names what went wrong."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    run_name = loop_config["run_name"]
    for dataset in datasets.values():
        # the step lines are a run's progress; Ray Data's per-operator bars, drawn inside
        # the Train actors, reach the driver's log as screens of terminal redraws
        dataset.context.enable_progress_bars = False
    if cfg.materialize_data:
        started = time.time()
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
        print(
            f"[{run_name}] runner.materialize_data: train split read into Ray's object store "
            f"in {time.time() - started:.1f} s ({datasets['train'].size_bytes() / 2**20:.0f} MiB)",
            flush=True,
        )
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=pack_loop_config(loop_config),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else cfg.cpu_backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep),
        ),
        datasets=dict(datasets),
    )
    try:
        fit = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingRunError(
            f"{stage}: Ray Train run {run_name!r} failed (after up to {cfg.max_failures} "
            f"restart(s)); its checkpoints stay in {run_dir}, re-run to resume. Cause: {exc}"
        ) from exc
    if fit.error is not None:
        raise TrainingRunError(f"{stage}: Ray Train run {run_name!r} failed: {fit.error}")
    summary = fit.return_value or {}
    if summary.get("error"):
        kind = (
            NonFiniteLossError if summary.get("error_type") == "NonFiniteLossError" else DataError
        )
        raise kind(f"{stage} ({run_name}): {summary['error']}")
    if fit.checkpoint is None:
        raise TrainingRunError(f"{stage}: Ray Train run {run_name!r} ended without a checkpoint")
    return summary, fit.checkpoint


def run_phase(
    phase: TrainingPhase,
    params: Params,
    *,
    stage: str,
    run_name: str,
    datasets: Mapping[str, ray.data.Dataset],
    max_steps: int,
    init_weights: str | os.PathLike[str] | None,
    export_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    """Train ``phase`` to ``max_steps`` on Ray Train and export its weights.

    Args:
        phase: what to train.
        params: ``runner`` (scaling, storage, checkpoints, logging) and ``seed`` are used.
        stage: the stage's name, for messages and ``result.json``.
        run_name: the Ray Train run (folder under ``runner.storage_path``); the same name
            resumes that run. Derive it from stage and quality, e.g. ``train_gan-low``.
        datasets: Ray Datasets; ``"train"`` feeds the loop (rows with ``frames``).
        max_steps: total optimizer iterations of the run (counting resumed ones).
        init_weights: a previous phase's export folder (used when not resuming), or None.
        export_dir: where the final weights and ``result.json`` go (replaced atomically).

    Returns the content of ``result.json``. Raises :class:`TrainingRunError` when Ray Train
    gives up, :class:`NonFiniteLossError` on NaN/inf, :class:`RunnerError` on bad setup.
    The stage's active MLflow run (if any) receives the metrics and ``result.json``.
    """
    import mlflow
    import ray

    from pipeline.ray_cluster import init_ray
    from pipeline.tracking import repo_root

    cfg = params.runner
    if not _RUN_NAME.match(run_name):
        raise RunnerError(f"run name {run_name!r}: use letters, digits and ._@+- only")
    if max_steps < 1:
        raise RunnerError(f"max_steps must be positive, got {max_steps}")
    if "train" not in datasets:
        raise RunnerError(f"datasets must include 'train', got {sorted(datasets)}")
    if phase.batch_size < 1:
        raise RunnerError(
            f"phase {phase.name!r}: batch_size must be positive, got {phase.batch_size}"
        )
    if phase.batch_size % cfg.num_workers:
        raise RunnerError(
            f"phase {phase.name!r}: batch_size {phase.batch_size} is the global batch (clips "
            f"per step over all workers) and must be a multiple of runner.num_workers "
            f"({cfg.num_workers}): each worker takes an equal share"
        )
    storage = resolve_storage_path(cfg.storage_path, repo_root())
    run_dir = ray_run_dir(storage, run_name)
    export_dir = Path(export_dir)

    active = mlflow.active_run()
    run_id = active.info.run_id if active else None
    tracking_uri = mlflow.get_tracking_uri() if active else None
    if active is None:
        print(f"[{run_name}] no active MLflow run: metrics are not tracked", file=sys.stderr)
    base_result = {
        "stage": stage,
        "phase": phase.name,
        "phase_config": phase.config(),
        "run_name": run_name,
        "ray_storage_path": storage,
        "ray_run_path": run_dir,
        "max_steps": max_steps,
        "num_workers": cfg.num_workers,
        "use_gpu": cfg.use_gpu,
        "mlflow_run_id": run_id,
        "mlflow_tracking_uri": tracking_uri,
    }

    previous = latest_checkpoint(storage, run_name)
    if previous is not None:
        check_resumable(previous[1], phase, run_dir)
    started = time.time()
    if previous is not None and previous[1]["step"] >= max_steps:
        ckpt, meta = previous
        print(
            f"[{run_name}] already at step {meta['step']} >= max_steps {max_steps}: "
            "exporting its last checkpoint",
            flush=True,
        )
        summary: dict[str, Any] = {
            "step": meta["step"],
            "started_from_step": meta["step"],
            "metrics": meta.get("metrics", {}),
            "world_size": meta["world_size"],
        }
    else:
        init_ref = None
        if init_weights is not None and previous is not None:
            print(f"[{run_name}] resuming: init weights {init_weights} are not used", flush=True)
        if init_weights is not None and previous is None:
            state = phase.read_init_weights(Path(init_weights))
            try:
                phase.apply_init_weights(phase.build_models(), state)  # fail here, not on workers
            except (RuntimeError, KeyError, ValueError) as exc:
                raise RunnerError(
                    f"init weights {init_weights} do not fit phase {phase.name!r}: {exc}"
                ) from exc
        init_ray(params)
        if init_weights is not None and previous is None:
            init_ref = ray.put(state)
        loop_config = {
            "phase": phase,
            "run_name": run_name,
            "max_steps": max_steps,
            "seed": params.seed,
            "init_weights": init_ref,
            "tracking_uri": tracking_uri,
            "mlflow_run_id": run_id,
            "bf16": cfg.bf16,
            "cpu_bf16": cfg.cpu_bf16,
            "channels_last": cfg.channels_last,
            "grad_clip": cfg.grad_clip,
            "log_every": cfg.log_every,
            "image_every": cfg.image_every,
            "checkpoint_every": cfg.checkpoint_every,
            "ray_run_path": run_dir,
            "mlflow_retry_s": params.tracking.retry_s,
        }
        summary, ckpt = _fit(cfg, loop_config, datasets, storage, stage=stage, run_dir=run_dir)

    result = {
        **base_result,
        "steps": summary["step"],
        "started_from_step": summary.get("started_from_step"),
        "world_size": summary.get("world_size"),
        "precision": summary.get("precision"),
        "worker_nodes": summary.get("worker_nodes"),
        "mlflow_unlogged_metrics": summary.get("mlflow_unlogged_metrics", 0),
        "mlflow_unlogged_images": summary.get("mlflow_unlogged_images", 0),
        "final_metrics": summary.get("metrics", {}),
        "checkpoint_path": ckpt.path,
        "wall_time_s": round(time.time() - started, 3),
    }
    result["exported_files"] = _export(phase, ckpt, export_dir, result)
    if result["mlflow_unlogged_metrics"] or result["mlflow_unlogged_images"]:
        print(
            f"warning: [{run_name}] the MLflow server did not take "
            f"{result['mlflow_unlogged_metrics']} metric value(s) and "
            f"{result['mlflow_unlogged_images']} sample image(s) of this run (it was "
            "unreachable); the weights and checkpoints are complete",
            file=sys.stderr,
            flush=True,
        )
    if active is not None:
        from pipeline.tracking import log_json_artifact

        mlflow.set_tags({"plvc.ray_run_path": run_dir, "plvc.export_dir": str(export_dir)})
        log_json_artifact(result, "result.json")
    print(f"[{run_name}] done at step {result['steps']}; weights in {export_dir}", flush=True)
    return result


def fingerprinted_run_name(prefix: str, identity: Mapping[str, Any]) -> str:
    """``<prefix>-<10 hex digits>``: a Ray Train run name that changes with ``identity``.

    ``identity`` holds what makes a checkpoint belong to a training (phase settings, seed,
    digests of the init weights and data), but not the step budget. Re-running a killed
    stage then resumes its run and raising the steps continues it, while a changed setting
    or upstream output (``dvc exp run -S ...``) starts a fresh run, where one shared name
    would resume a run trained otherwise (which the runner refuses).
    """
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return f"{prefix}-{hashlib.sha256(blob).hexdigest()[:10]}"


_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def resolve_storage_path(storage_path: str, root: Path) -> str:
    """A URI (``s3://...``) as-is; a relative local path made absolute under ``root``.

    Ray Train wants an absolute path or a URI, and the stage may run from any directory.
    """
    if _URI.match(storage_path):
        return storage_path
    path = Path(storage_path).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())
