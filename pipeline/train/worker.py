"""The loop every Ray Train worker runs: build or resume the phase, DDP-wrap it, step through
its data shard, log, and report checkpoints (all ranks report; rank 0 carries the files).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.train.checkpoint import (
    capture_rng_state,
    check_resumable,
    load_checkpoint,
    newest_complete_checkpoint,
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
    "autocast_dtype",
    "native_cpu_bf16",
    "train_worker",
]


# Ray Train V2 routes a worker's print() to its logger AND, when something has wrapped
# sys.stdout, to the stream as well, so each line reached the driver twice: workers log.
_worker_log = logging.getLogger(__name__)


def _lrs(optimizers: PhaseOptimizers) -> dict[str, float]:
    return {f"lr/{k}": float(o.param_groups[0]["lr"]) for k, o in optimizers.named().items()}


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker. Returns (rank 0's value reaches the driver) a summary,
    or ``{"error": ...}`` for a failure that a restart would only repeat."""
    try:
        return _train_worker_inner(config)
    except FatalError as exc:
        return {"error": str(exc), "error_type": type(exc).__name__}


@dataclasses.dataclass
class _Run:
    """What one worker holds while it trains: its place in the group, the built phase and
    where it stands (step, epoch, the last logged metrics)."""

    config: dict[str, Any]
    phase: TrainingPhase
    rank: int
    world: int
    device: torch.device
    models: PhaseModels
    optimizers: PhaseOptimizers
    step: int = 0
    epoch: int = 0
    last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def multi(self) -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_batch(self) -> int:
        """This worker's share of the global batch (the runner checked that it divides)."""
        return self.phase.batch_size // self.world


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX tiles or AVX512-BF16), where oneDNN's bf16
    convolutions beat float32; elsewhere they are emulated and slower."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def autocast_dtype(device: torch.device, *, gpu_bf16: bool, cpu_bf16: bool) -> torch.dtype | None:
    """The training autocast dtype on ``device`` (``None``: float32): ``runner.bf16`` on a GPU,
    ``runner.cpu_bf16`` on a CPU with native bf16."""
    if device.type == "cuda":
        return torch.bfloat16 if gpu_bf16 else None
    return torch.bfloat16 if cpu_bf16 and native_cpu_bf16() else None


def _start(config: dict[str, Any]) -> _Run:
    """Build the phase's models and optimizers on this worker's device, then resume from Ray's
    checkpoint or apply the init weights; seeds every RNG for this rank."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    phase: TrainingPhase = config["phase"]
    seed: int = config["seed"]
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives pick the current device

    seed_everything(seed)  # same initial weights on every rank
    models = phase.build_models()
    layout = torch.channels_last if config["channels_last"] else torch.contiguous_format
    for module in models.named().values():
        module.to(device, memory_format=layout)
    phase.setup(device)
    run = _Run(
        config,
        phase,
        ctx.get_world_rank(),
        ctx.get_world_size(),
        device,
        models,
        phase.build_optimizers(models),
    )
    checkpoint = ray.train.get_checkpoint()
    registered = _checkpoint_meta(checkpoint).get("step", -1)
    newer = newest_complete_checkpoint(config["ray_run_path"], registered)
    if newer is not None:
        check_resumable(_checkpoint_meta(newer[0]), phase, newer[0].path)
        # uploaded by rank 0, never registered: a worker died before every rank reported it
        checkpoint = newer[0]
        if run.is_main:
            _worker_log.info(
                "[%s] the checkpoint of step %d is complete in storage but was not registered "
                "(registered: %s): resuming from it",
                config["run_name"],
                newer[1],
                registered if registered >= 0 else "none",
            )
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            meta, rng = load_checkpoint(Path(d), phase, models, run.optimizers, device)
        run.step, run.epoch = meta["step"], meta["epoch"]
        run.last_metrics = meta.get("metrics", {})
        if len(rng) == run.world:
            restore_rng_state(rng[run.rank])
        else:
            seed_everything(seed + 1_000_003 * (run.rank + 1) + run.step)
        if run.is_main:
            _worker_log.info(
                "[%s] resuming from the checkpoint of step %d", config["run_name"], run.step
            )
    else:
        if config["init_weights"] is not None:
            phase.apply_init_weights(models, ray.get(config["init_weights"]))
        seed_everything(seed + 1_000_003 * (run.rank + 1))
    return run


def _worker_nodes(run: _Run) -> list[str]:
    """The Ray node id of every rank, in rank order (where the run's group was placed)."""
    import ray

    own = ray.get_runtime_context().get_node_id()
    if not run.multi:
        return [own]
    import torch.distributed as dist

    nodes: list[Any] = [None] * run.world
    dist.all_gather_object(nodes, own)
    return [str(n) for n in nodes]


def _checkpoint_meta(checkpoint: Any) -> dict[str, Any]:
    """A checkpoint's ``meta.json`` (``{}``: no checkpoint)."""
    if checkpoint is None:
        return {}
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/meta.json") as f:
        return dict(json.loads(f.read().decode()))


def _ddp_models(run: _Run) -> PhaseModels:
    """The models as the loop calls them: each DDP-wrapped when there are several workers."""
    from torch.nn.parallel import DistributedDataParallel

    if not run.multi:
        return run.models
    if run.phase.find_unused_parameters:
        for module in run.models.named().values():
            # With find_unused_parameters DDP marks weights missing from the forward's graph
            # as ready at once; entropy-bottleneck quantiles get their gradient only from the
            # aux loss later in the same backward, which DDP rejects as a second "ready".
            # That gradient is data-independent, hence equal on every rank: no all-reduce.
            quantiles = [n for n, _ in module.named_parameters() if n.endswith(".quantiles")]
            if quantiles:
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    module, quantiles
                )
    return PhaseModels(
        **{
            name: DistributedDataParallel(
                module,
                device_ids=[run.device.index] if run.device.type == "cuda" else None,
                find_unused_parameters=run.phase.find_unused_parameters,
            )
            for name, module in run.models.named().items()
        }
    )


class _Window:
    """Throughput and data-wait of the steps since the last log line."""

    def __init__(self) -> None:
        self.start, self.steps, self.data_wait = time.perf_counter(), 0, 0.0

    def metrics(self, run: _Run, averager: MetricAverager) -> dict[str, float]:
        """The log line's metrics (loss terms averaged over ranks, learning rates, perf)."""
        import torch.distributed as dist

        metrics = {f"train/{k}": v for k, v in averager.pop(all_reduce=run.multi).items()}
        elapsed = time.perf_counter() - self.start
        perf = torch.tensor(
            [self.steps * run.local_batch / elapsed, self.data_wait / elapsed],
            dtype=torch.float64,
            device=run.device,
        )
        if run.multi:
            dist.all_reduce(perf)
        clips_total, wait_sum = perf.tolist()
        metrics.update(_lrs(run.optimizers))
        metrics["perf/clips_per_s"] = clips_total
        metrics["perf/clips_per_s_per_worker"] = clips_total / run.world
        metrics["perf/steps_per_s"] = self.steps / elapsed
        metrics["perf/data_wait_fraction"] = wait_sum / run.world
        metrics["epoch"] = run.epoch
        return metrics


def _log_line(run: _Run, metrics: Mapping[str, float], max_steps: int) -> None:
    shown = " ".join(
        f"{k.removeprefix('train/')}={v:.4g}"
        for k, v in metrics.items()
        if k.startswith("train/") and "grad_norm" not in k
    )
    _worker_log.info(
        "[%s] step %d/%d %s %.1f clips/s",
        run.config["run_name"],
        run.step,
        max_steps,
        shown,
        metrics["perf/clips_per_s"],
    )


def _epoch_batches(run: _Run, shard: Any) -> Iterator[Any]:
    phase, seed = run.phase, run.config["seed"]
    return iter(
        shard.iter_batches(
            batch_size=run.local_batch,
            batch_format="numpy",
            drop_last=True,
            prefetch_batches=2,
            local_shuffle_buffer_size=phase.shuffle_buffer_rows or None,
            local_shuffle_seed=(seed + 7919 * run.epoch + run.rank)
            if phase.shuffle_buffer_rows
            else None,
        )
    )


def _train_worker_inner(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train

    run = _start(config)
    max_steps: int = config["max_steps"]
    start_step = run.step
    summary = {
        "started_from_step": start_step,
        "world_size": run.world,
        "worker_nodes": _worker_nodes(run),
    }
    if run.step >= max_steps:
        return {**summary, "step": run.step, "metrics": run.last_metrics, "epoch": run.epoch}

    phase = run.phase
    dtype = autocast_dtype(run.device, gpu_bf16=config["bf16"], cpu_bf16=config["cpu_bf16"])
    summary["precision"] = "bfloat16" if dtype is not None else "float32"
    if config["cpu_bf16"] and run.device.type == "cpu" and dtype is None and run.is_main:
        _worker_log.warning(
            "[%s] runner.cpu_bf16: this CPU has no native bf16 (AMX / AVX512-BF16): "
            "training in float32",
            config["run_name"],
        )
    stepper = PhaseStepper(
        phase, _ddp_models(run), run.optimizers, grad_clip=config["grad_clip"], autocast_dtype=dtype
    )
    sink = (
        MlflowSink(
            config["tracking_uri"], config["mlflow_run_id"], retry_s=config["mlflow_retry_s"]
        )
        if run.is_main
        else MlflowSink(None, None)
    )
    shard = ray.train.get_dataset_shard("train")
    log_every, image_every = config["log_every"], config["image_every"]
    checkpoint_every = config["checkpoint_every"]

    try:
        averager = MetricAverager()
        window = _Window()
        while run.step < max_steps:
            batches_this_epoch = 0
            iterator = _epoch_batches(run, shard)
            while run.step < max_steps:
                t0 = time.perf_counter()
                try:
                    rows = next(iterator)
                except StopIteration:
                    break
                window.data_wait += time.perf_counter() - t0
                batches_this_epoch += 1
                run.step += 1
                step = run.step
                batch = phase.prepare_batch(rows, run.device)
                averager.add(stepper.step(batch, step))
                window.steps += 1

                if step % log_every == 0 or step == max_steps:
                    run.last_metrics = window.metrics(run, averager)
                    if run.is_main:
                        sink.log_metrics(run.last_metrics, step)
                        _log_line(run, run.last_metrics, max_steps)
                    window = _Window()

                if run.is_main and sink.enabled and (step % image_every == 0 or step == max_steps):
                    _log_samples(phase, run.models, batch, sink, step)

                if step % checkpoint_every == 0 or step == max_steps:
                    _report_checkpoint(
                        phase,
                        run.models,
                        run.optimizers,
                        step=step,
                        epoch=run.epoch,
                        metrics=run.last_metrics,
                        is_main=run.is_main,
                        multi=run.multi,
                        world=run.world,
                    )
            if run.step < max_steps:
                if batches_this_epoch == 0:
                    raise NoFullBatchError(
                        f"dataset 'train' gives worker {run.rank} no full batch of "
                        f"{run.local_batch} clips (its share of batch_size {phase.batch_size}; "
                        f"{run.world} workers share the split): add clips or lower the batch size"
                    )
                run.epoch += 1
    except BaseException:
        sink.close(timeout_s=10)  # what was logged before the failure still gets there
        raise
    return {
        **summary,
        "step": run.step,
        "metrics": run.last_metrics,
        "epoch": run.epoch,
        **sink.close(),
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
