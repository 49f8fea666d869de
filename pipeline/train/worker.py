"""The loop every Ray Train worker runs: build or resume the phase, DDP-wrap it, step through
its data shard, log, and report checkpoints (all ranks report; rank 0 carries the files).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from pipeline.train.phase import (
    FatalError,
    NoFullBatchError,
    PhaseModels,
    PhaseOptimizers,
    TrainingPhase,
)
from pipeline.train.reporting import MetricAverager, MlflowSink
from pipeline.train.stepper import PhaseStepper

__all__ = [
    "train_worker",
]


# Ray Train V2 routes a worker's print() to its logger AND, when something has wrapped
# sys.stdout, to the stream as well, so each line reached the driver twice: workers log.
_worker_log = logging.getLogger("pipeline.train.runner")


def _lrs(optimizers: PhaseOptimizers) -> dict[str, float]:
    return {f"lr/{k}": float(o.param_groups[0]["lr"]) for k, o in optimizers.named().items()}


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker. Returns (rank 0's value reaches the driver) a summary,
    or ``{"error": ...}`` for a failure that a restart would only repeat."""
    try:
        return _train_worker_inner(config)
    except FatalError as exc:
        return {"error": str(exc), "error_type": type(exc).__name__}


def _train_worker_inner(config: dict[str, Any]) -> dict[str, Any]:
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    phase: TrainingPhase = config["phase"]
    max_steps: int = config["max_steps"]
    seed: int = config["seed"]
    run_name: str = config["run_name"]
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives pick the current device
    multi = dist.is_available() and dist.is_initialized() and world > 1
    is_main = rank == 0

    seed_everything(seed)  # same initial weights on every rank
    models = phase.build_models()
    for module in models.named().values():
        module.to(device)
    phase.setup(device)
    optimizers = phase.build_optimizers(models)

    start_step, epoch = 0, 0
    last_metrics: dict[str, float] = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            meta, rng = load_checkpoint(Path(d), phase, models, optimizers, device)
        start_step, epoch, last_metrics = meta["step"], meta["epoch"], meta.get("metrics", {})
        if len(rng) == world:
            restore_rng_state(rng[rank])
        else:
            seed_everything(seed + 1_000_003 * (rank + 1) + start_step)
        if is_main:
            _worker_log.info("[%s] resuming from the checkpoint of step %d", run_name, start_step)
    else:
        if config["init_weights"] is not None:
            phase.apply_init_weights(models, ray.get(config["init_weights"]))
        seed_everything(seed + 1_000_003 * (rank + 1))

    if start_step >= max_steps:
        return {
            "step": start_step,
            "started_from_step": start_step,
            "metrics": last_metrics,
            "world_size": world,
            "epoch": epoch,
        }

    if multi and phase.find_unused_parameters:
        for module in models.named().values():
            # With find_unused_parameters DDP marks weights missing from the forward's graph
            # as ready at once; entropy-bottleneck quantiles get their gradient only from the
            # aux loss later in the same backward, which DDP rejects as a second "ready".
            # That gradient is data-independent, hence equal on every rank: no all-reduce.
            quantiles = [n for n, _ in module.named_parameters() if n.endswith(".quantiles")]
            if quantiles:
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    module, quantiles
                )
    wrapped = PhaseModels(
        **{
            name: DistributedDataParallel(
                module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=phase.find_unused_parameters,
            )
            if multi
            else module
            for name, module in models.named().items()
        }
    )
    bf16 = config["bf16"] and device.type == "cuda"
    stepper = PhaseStepper(
        phase,
        wrapped,
        optimizers,
        grad_clip=config["grad_clip"],
        autocast_dtype=torch.bfloat16 if bf16 else None,
    )
    sink = (
        MlflowSink(config["tracking_uri"], config["mlflow_run_id"])
        if is_main
        else MlflowSink(None, None)
    )
    shard = ray.train.get_dataset_shard("train")
    log_every, image_every = config["log_every"], config["image_every"]
    checkpoint_every = config["checkpoint_every"]

    averager = MetricAverager()
    step = start_step
    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
    while step < max_steps:
        batches_this_epoch = 0
        iterator = iter(
            shard.iter_batches(
                batch_size=phase.batch_size,
                batch_format="numpy",
                drop_last=True,
                prefetch_batches=2,
                local_shuffle_buffer_size=phase.shuffle_buffer_rows or None,
                local_shuffle_seed=(seed + 7919 * epoch + rank)
                if phase.shuffle_buffer_rows
                else None,
            )
        )
        while step < max_steps:
            t0 = time.perf_counter()
            try:
                rows = next(iterator)
            except StopIteration:
                break
            data_wait += time.perf_counter() - t0
            batches_this_epoch += 1
            step += 1
            batch = phase.prepare_batch(rows, device)
            averager.add(stepper.step(batch, step))
            window_steps += 1

            if step % log_every == 0 or step == max_steps:
                metrics = {f"train/{k}": v for k, v in averager.pop(all_reduce=multi).items()}
                elapsed = time.perf_counter() - window_start
                perf = torch.tensor(
                    [window_steps * phase.batch_size / elapsed, data_wait / elapsed],
                    dtype=torch.float64,
                    device=device,
                )
                if multi:
                    dist.all_reduce(perf)
                clips_total, wait_sum = perf.tolist()
                metrics.update(_lrs(optimizers))
                metrics["perf/clips_per_s"] = clips_total
                metrics["perf/clips_per_s_per_worker"] = clips_total / world
                metrics["perf/steps_per_s"] = window_steps / elapsed
                metrics["perf/data_wait_fraction"] = wait_sum / world
                metrics["epoch"] = epoch
                last_metrics = metrics
                if is_main:
                    sink.log_metrics(metrics, step)
                    shown = " ".join(
                        f"{k.removeprefix('train/')}={v:.4g}"
                        for k, v in metrics.items()
                        if k.startswith("train/") and "grad_norm" not in k
                    )
                    _worker_log.info(
                        "[%s] step %d/%d %s %.1f clips/s",
                        run_name,
                        step,
                        max_steps,
                        shown,
                        clips_total,
                    )
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0

            if is_main and sink.enabled and (step % image_every == 0 or step == max_steps):
                _log_samples(phase, models, batch, sink, step)

            if step % checkpoint_every == 0 or step == max_steps:
                _report_checkpoint(
                    phase,
                    models,
                    optimizers,
                    step=step,
                    epoch=epoch,
                    metrics=last_metrics,
                    is_main=is_main,
                    multi=multi,
                    world=world,
                )
        if step < max_steps:
            if batches_this_epoch == 0:
                raise NoFullBatchError(
                    f"dataset 'train' gives worker {rank} no full batch of {phase.batch_size} "
                    f"clips ({world} workers share it): add clips or lower the batch size"
                )
            epoch += 1
    return {
        "step": step,
        "started_from_step": start_step,
        "metrics": last_metrics,
        "world_size": world,
        "epoch": epoch,
        "mlflow_failures": sink.failures,
    }


def _log_samples(
    phase: TrainingPhase, models: PhaseModels, batch: Any, sink: MlflowSink, step: int
) -> None:
    modes = {name: m.training for name, m in models.named().items()}
    try:
        for m in models.named().values():
            m.eval()
        with torch.no_grad():
            images = phase.sample_images(models, batch)
    finally:
        for name, m in models.named().items():
            m.train(modes[name])
    for key, image in images.items():
        sink.log_image(f"samples/{key}", image, step)


def _report_checkpoint(
    phase: TrainingPhase,
    models: PhaseModels,
    optimizers: PhaseOptimizers,
    *,
    step: int,
    epoch: int,
    metrics: Mapping[str, float],
    is_main: bool,
    multi: bool,
    world: int,
) -> None:
    import ray.train

    own_rng = capture_rng_state()
    if multi:
        import torch.distributed as dist

        rng_per_rank: list[Any] = [None] * world
        dist.all_gather_object(rng_per_rank, own_rng)
    else:
        rng_per_rank = [own_rng]
    report = {"step": step, **{k: v for k, v in metrics.items() if k.startswith("train/")}}
    name = f"checkpoint_{step:08d}"
    if is_main:
        with tempfile.TemporaryDirectory(prefix="plvc-ckpt-") as tmp:
            save_checkpoint(
                Path(tmp),
                phase,
                models,
                optimizers,
                step=step,
                epoch=epoch,
                rng_per_rank=rng_per_rank,
                metrics=metrics,
            )
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
            )
    else:
        # every rank reports (a barrier in Ray Train V2); only rank 0 carries the files
        ray.train.report(report, checkpoint=None, checkpoint_dir_name=name)
