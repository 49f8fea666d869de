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
  optimizers, schedulers, step and every rank's RNG state (layout: :mod:`pipeline.train.runner_utils`);
- resume: after a worker failure Ray restarts the workers from the last checkpoint (at most
  ``runner.max_failures`` times); re-running the stage with the same run name and
  ``runner.storage_path`` continues that run; a run that already reached ``max_steps``
  is only exported again;
- MLflow, from rank 0 into the stage's own run: every loss term, the learning rates,
  gradient norms and throughput every ``runner.log_every`` steps, sample images every
  ``runner.image_every`` steps;
- the final weights exported atomically to ``export_dir`` (the DVC-tracked folder) with a
  ``result.json``.

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

    ray job submit --address http://<head>:8265 --working-dir . -- \\
        python -m stages.<stage> --params params.yaml

Inside the job ``RAY_ADDRESS`` is set, so ``init_ray`` joins that cluster and the workers
are scheduled on its nodes (``runner.use_gpu: true`` for GPU nodes). Every node must see
``runner.storage_path`` (an ``s3://``/``gs://`` URI or a shared NFS folder) and the shard
folders; checkpoints live there, so a re-submitted job resumes the run. The weights are
exported by the driver process (the job's entrypoint on the head node), into
``export_dir`` relative to its working directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from pipeline.config import Params
from pipeline.errors import PipelineError
from pipeline.io import replace_dir, write_json_atomic
from pipeline.train.runner_utils import (
    CHECKPOINT_FORMAT,
    MetricAverager,
    MlflowSink,
    capture_rng_state,
    image_grid,
    read_checkpoint_meta,
    resolve_storage_path,
    restore_rng_state,
    seed_everything,
    unwrap,
)

if TYPE_CHECKING:
    import ray.data
    import ray.train

__all__ = [
    "DataError",
    "NonFiniteLossError",
    "PhaseModels",
    "PhaseOptimizers",
    "PhaseStepper",
    "RunnerError",
    "TrainingPhase",
    "TrainingRunError",
    "compressai_optimizers",
    "image_grid",
    "load_checkpoint",
    "run_phase",
    "save_checkpoint",
]

# Ray Train V2 routes a worker's print() to its logger AND, when something has wrapped
# sys.stdout, to the stream as well, so each line reached the driver twice: workers log.
_worker_log = logging.getLogger("pipeline.train.runner")

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")


class RunnerError(PipelineError):
    """A training phase cannot run as configured."""


class TrainingRunError(RunnerError):
    """The Ray Train run failed (after its allowed restarts)."""


class _FatalError(RunnerError):
    """Raised alike on every rank; retrying from a checkpoint cannot help."""


class NonFiniteLossError(_FatalError):
    """A loss term or a gradient became NaN or infinite."""


class DataError(RunnerError):
    """The training data cannot feed the phase (bad batch layout, too few clips)."""


class _NoFullBatchError(DataError, _FatalError):
    """Every worker's share of the data is smaller than one batch (alike on all ranks)."""


@dataclasses.dataclass
class PhaseModels:
    """The trainable networks of a phase. In the train loop these are DDP-wrapped when
    there is more than one worker; call them, don't reach into their attributes."""

    generator: nn.Module
    discriminator: nn.Module | None = None

    def named(self) -> dict[str, nn.Module]:
        out = {"generator": self.generator}
        if self.discriminator is not None:
            out["discriminator"] = self.discriminator
        return out


@dataclasses.dataclass
class PhaseOptimizers:
    """Optimizers over disjoint parameter sets, plus LR schedulers stepped once per iteration.

    ``aux`` optimizes only the entropy bottlenecks' ``quantiles`` with the generator's
    ``aux_loss()`` (CompressAI's convention); ``generator`` must not hold them.
    """

    generator: Optimizer
    aux: Optimizer | None = None
    discriminator: Optimizer | None = None
    schedulers: dict[str, LRScheduler] = dataclasses.field(default_factory=dict)

    def named(self) -> dict[str, Optimizer]:
        out = {"generator": self.generator}
        if self.aux is not None:
            out["aux"] = self.aux
        if self.discriminator is not None:
            out["discriminator"] = self.discriminator
        return out


def compressai_optimizers(
    model: nn.Module, lr: float, aux_lr: float = 1e-3
) -> tuple[Optimizer, Optimizer | None]:
    """Adam over the network's parameters and Adam over its ``*.quantiles`` (None if it has
    none), the split of CompressAI's ``net_aux`` optimizer."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    net = [p for n, p in named if not n.endswith(".quantiles")]
    quantiles = [p for n, p in named if n.endswith(".quantiles")]
    return torch.optim.Adam(net, lr=lr), (
        torch.optim.Adam(quantiles, lr=aux_lr) if quantiles else None
    )


class TrainingPhase(ABC):
    """What a training stage implements; :func:`run_phase` owns the rest.

    The object is pickled to every Ray worker, so keep it a small, picklable description
    (a dataclass of settings is ideal) and build networks in :meth:`build_models`.

    Per iteration the runner calls :meth:`forward` once, then (GAN phases)
    :meth:`discriminator_loss` followed by a D optimizer step, then
    :meth:`generator_loss` followed by a G (and aux) optimizer step. Loss methods return
    ``{"loss": <scalar to minimise>, <other scalar terms to log, e.g. "bpp", "mse">}``.
    Everything runs under bf16 autocast on GPU; keep rate terms in float32 inside the model
    if they need it.

    A minimal phase (a dataclass: its fields are the settings compared on resume)::

        @dataclasses.dataclass
        class SinglePPhase(TrainingPhase):
            name: ClassVar[str] = "single_p"      # ClassVar: not a dataclass field
            lmbda: float = 256.0
            batch_size: int = 4

            def build_models(self):
                return PhaseModels(PFrameCodec())
            def build_optimizers(self, models):
                net, aux = compressai_optimizers(models.generator, lr=1e-4)
                return PhaseOptimizers(net, aux)
            def forward(self, models, batch, step):
                return models.generator(batch[:, 1], batch[:, 0])
            def generator_loss(self, models, batch, out, step):
                mse = F.mse_loss(out["x_hat"], batch[:, 1])
                bpp = rate(out["likelihoods"], batch[:, 1])
                return {"loss": bpp + self.lmbda * mse, "mse": mse, "bpp": bpp}
    """

    #: phase name stored in checkpoints (resuming another phase's run is refused)
    name: ClassVar[str] = "phase"
    #: clips per worker per step
    batch_size: int = 4
    #: rows buffered for Ray Data's local shuffle (0: stream in order)
    shuffle_buffer_rows: int = 0
    #: DDP's find_unused_parameters (needed when some parameters get no gradient)
    find_unused_parameters: bool = False

    @abstractmethod
    def build_models(self) -> PhaseModels:
        """Fresh networks on the CPU; the runner moves them to the worker's device."""

    @abstractmethod
    def build_optimizers(self, models: PhaseModels) -> PhaseOptimizers:
        """Optimizers (and schedulers) over ``models``' parameters (already on the device)."""

    @abstractmethod
    def forward(self, models: PhaseModels, batch: Any, step: int) -> Any:
        """Run the generator on a batch (with autograd). Its whole computation for the step
        must go through one call of ``models.generator(...)``, so DDP syncs it once."""

    @abstractmethod
    def generator_loss(
        self, models: PhaseModels, batch: Any, outputs: Any, step: int
    ) -> dict[str, Tensor]:
        """Generator terms; GAN phases call ``models.discriminator`` on the fakes here
        (the runner freezes D for this step)."""

    def discriminator_loss(
        self, models: PhaseModels, batch: Any, outputs: Any, step: int
    ) -> dict[str, Tensor]:
        """D terms for GAN phases. Detach the generator's outputs, and pass real and fake
        through D in one batch (:func:`torch.cat`) so its statistics see both."""
        raise NotImplementedError(
            f"phase {self.name!r} has a discriminator but no discriminator_loss"
        )

    def setup(self, device: torch.device) -> None:  # noqa: B027 - optional hook
        """Build frozen helpers (e.g. LPIPS) on ``device``; called once per worker."""

    def prepare_batch(self, rows: Mapping[str, np.ndarray], device: torch.device) -> Any:
        """A Ray Data numpy batch → model input. Default: ``frames`` uint8 [B, T, H, W, 3]
        → float32 [B, T, 3, H, W] in [0, 1] on ``device``."""
        from pipeline.data.datasets import frames_to_tensor

        frames = rows.get("frames")
        if frames is None or frames.ndim != 5:
            shape = None if frames is None else frames.shape
            raise DataError(f"phase {self.name!r}: expected 'frames' [B, T, H, W, 3], got {shape}")
        try:
            return frames_to_tensor(frames, device, non_blocking=True)
        except ValueError as exc:
            raise DataError(f"phase {self.name!r}: batch column 'frames': {exc}") from exc

    def sample_images(self, models: PhaseModels, batch: Any) -> dict[str, np.ndarray]:
        """Images to log (uint8 [H, W, 3], e.g. :func:`image_grid` of originals and
        reconstructions). Called on rank 0 with unwrapped models in eval mode, no grad."""
        return {}

    def export(self, models: PhaseModels, export_dir: Path) -> None:
        """Write the final weights into ``export_dir`` (an empty temp folder the runner
        renames into place). Default: ``<name>.pt`` state dicts per model."""
        for name, module in models.named().items():
            torch.save(module.state_dict(), export_dir / f"{name}.pt")

    def read_init_weights(self, path: Path) -> dict[str, dict[str, Tensor]]:
        """Read a previous phase's export (on the driver). Default: the state dicts of
        :meth:`export`'s files found in ``path``; ``generator.pt`` is required."""
        if not (path / "generator.pt").is_file():
            raise RunnerError(f"init weights {path}: no generator.pt in that folder")
        state = {}
        for name in ("generator", "discriminator"):
            if (path / f"{name}.pt").is_file():
                state[name] = torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True)
        return state

    def apply_init_weights(self, models: PhaseModels, state: Mapping[str, Any]) -> None:
        """Load :meth:`read_init_weights`' result into fresh models (strict)."""
        for name, module in models.named().items():
            if name in state:
                module.load_state_dict(state[name])

    def config(self) -> dict[str, Any]:
        """The settings that make a checkpoint of this phase resumable (compared on resume).
        Default: the dataclass fields."""
        if dataclasses.is_dataclass(self):
            return json.loads(json.dumps(dataclasses.asdict(self), default=_jsonable))
        return {}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):  # pydantic settings, e.g. a QualityConfig
        return value.model_dump(mode="json")
    return str(value)


# ---------------------------------------------------------------------------------------
# one iteration, independent of Ray


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """D during the G step: no gradient accumulates in it, and DDP does not sync it."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    no_sync = (
        module.no_sync()
        if isinstance(module, nn.parallel.DistributedDataParallel)
        else contextlib.nullcontext()
    )
    try:
        with no_sync:
            yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _optimizer_params(opt: Optimizer) -> list[Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


class PhaseStepper:
    """One training iteration of a phase on built (possibly DDP-wrapped) models.

    Used by the Ray train loop and usable on its own (tests, debugging a phase in one
    process). In a process group every rank must call the same methods at the same step.
    """

    def __init__(
        self,
        phase: TrainingPhase,
        models: PhaseModels,
        optimizers: PhaseOptimizers,
        *,
        grad_clip: float | None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.phase = phase
        self.models = models
        self.optimizers = optimizers
        self.grad_clip = grad_clip
        self.autocast_dtype = autocast_dtype
        self._check_setup()
        self._g_params = _optimizer_params(optimizers.generator)
        self._d_params = (
            _optimizer_params(optimizers.discriminator) if optimizers.discriminator else []
        )
        self._checked_detach = False

    def _check_setup(self) -> None:
        m, o = self.models, self.optimizers
        if m.discriminator is not None and o.discriminator is None:
            raise RunnerError(
                f"phase {self.phase.name!r}: a discriminator but no discriminator optimizer"
            )
        gen = unwrap(m.generator)
        quantiles = {
            id(p) for n, p in gen.named_parameters() if n.endswith(".quantiles") and p.requires_grad
        }
        if quantiles:
            if o.aux is None:
                raise RunnerError(
                    f"phase {self.phase.name!r}: the generator has entropy-bottleneck quantiles "
                    "but no aux optimizer (see compressai_optimizers)"
                )
            if not hasattr(gen, "aux_loss"):
                raise RunnerError(
                    f"phase {self.phase.name!r}: quantiles but no generator.aux_loss()"
                )
            in_main = quantiles & {id(p) for p in _optimizer_params(o.generator)}
            if in_main:
                raise RunnerError(
                    f"phase {self.phase.name!r}: the generator optimizer holds {len(in_main)} "
                    "quantiles tensor(s); they belong to the aux optimizer only"
                )
        if o.aux is not None and not hasattr(gen, "aux_loss"):
            raise RunnerError(
                f"phase {self.phase.name!r}: an aux optimizer but no generator.aux_loss()"
            )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    def forward(self, batch: Any, step: int) -> Any:
        with self._autocast():
            return self.phase.forward(self.models, batch, step)

    def discriminator_step(self, batch: Any, outputs: Any, step: int) -> dict[str, Tensor]:
        """One D update; returns its detached terms (``d_`` prefixed) and gradient norm."""
        opt = self.optimizers.discriminator
        if self.models.discriminator is None or opt is None:
            raise RunnerError(f"phase {self.phase.name!r} has no discriminator")
        opt.zero_grad(set_to_none=True)
        with self._autocast():
            terms = self.phase.discriminator_loss(self.models, batch, outputs, step)
        _check_terms(terms, step, "discriminator_loss")
        _ensure_finite(terms, step, "discriminator step")
        terms["loss"].backward()
        if not self._checked_detach:
            self._checked_detach = True
            if any(p.grad is not None for p in self._g_params):
                raise RunnerError(
                    f"phase {self.phase.name!r}: discriminator_loss sent gradients into the "
                    "generator; detach its outputs there"
                )
        norm = self._clip(self._d_params, step, "discriminator")
        opt.step()
        out = {f"d_{k}": v.detach() for k, v in terms.items()}
        out["grad_norm_discriminator"] = norm
        return out

    def generator_step(self, batch: Any, outputs: Any, step: int) -> dict[str, Tensor]:
        """One G update (and aux update); returns detached terms and gradient norm."""
        opt, aux_opt = self.optimizers.generator, self.optimizers.aux
        opt.zero_grad(set_to_none=True)
        if aux_opt is not None:
            aux_opt.zero_grad(set_to_none=True)
        d = self.models.discriminator
        with _frozen(d) if d is not None else contextlib.nullcontext():
            with self._autocast():
                terms = self.phase.generator_loss(self.models, batch, outputs, step)
            _check_terms(terms, step, "generator_loss")
            checked = dict(terms)
            total = terms["loss"]
            if aux_opt is not None:
                # quantiles get no gradient from the main loss and the aux loss reaches only
                # them, so one backward serves both optimizers (and one DDP sync)
                aux = unwrap(self.models.generator).aux_loss()
                checked["aux_loss"] = aux
                total = total + aux
            _ensure_finite(checked, step, "generator step")
            total.backward()
        norm = self._clip(self._g_params, step, "generator")
        opt.step()
        if aux_opt is not None:
            aux_opt.step()
        out = {k: v.detach() for k, v in checked.items()}
        out["grad_norm_generator"] = norm
        return out

    def step(self, batch: Any, step: int) -> dict[str, Tensor]:
        """A whole iteration: forward, D step (GAN phases), G step, schedulers."""
        outputs = self.forward(batch, step)
        terms: dict[str, Tensor] = {}
        if self.models.discriminator is not None:
            terms.update(self.discriminator_step(batch, outputs, step))
        terms.update(self.generator_step(batch, outputs, step))
        for scheduler in self.optimizers.schedulers.values():
            scheduler.step()
        return terms

    def _clip(self, params: list[Tensor], step: int, which: str) -> Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norm = torch.nn.utils.get_total_norm(grads)
        # after DDP's all-reduce every rank holds the same gradients, so all agree here
        if not bool(torch.isfinite(norm)):
            raise NonFiniteLossError(
                f"step {step}: the {which}'s gradient norm is {norm.item()} although every "
                "loss term is finite"
            )
        if self.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
        return norm.detach()


def _check_terms(terms: Any, step: int, where: str) -> None:
    if not isinstance(terms, Mapping) or "loss" not in terms:
        raise RunnerError(f"step {step}: {where} must return a dict with a 'loss' entry")
    for key, value in terms.items():
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise RunnerError(f"step {step}: {where} term {key!r} is not a scalar tensor ({shape})")


def _ensure_finite(terms: Mapping[str, Tensor], step: int, where: str) -> None:
    """Raise on every rank alike when any rank has a NaN/inf term (a collective)."""
    keys = sorted(terms)
    values = torch.stack([terms[k].detach().float().reshape(()) for k in keys])
    codes = torch.where(torch.isnan(values), 1.0, torch.where(torch.isinf(values), 2.0, 0.0))
    if _distributed():
        import torch.distributed as dist

        gathered = [torch.empty_like(codes) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, codes)
        table = torch.stack(gathered)
    else:
        table = codes[None]
    if not bool(table.any()):
        return
    table_list = table.tolist()
    problems = []
    for j, key in enumerate(keys):
        ranks = [r for r, row in enumerate(table_list) if row[j]]
        if ranks:
            kind = "nan" if table_list[ranks[0]][j] == 1 else "inf"
            where_ranks = f" on rank(s) {ranks}" if len(table_list) > 1 else ""
            problems.append(f"{key!r} is {kind}{where_ranks}")
    raise NonFiniteLossError(f"step {step}: non-finite loss in the {where}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(
    directory: Path,
    phase: TrainingPhase,
    models: PhaseModels,
    optimizers: PhaseOptimizers,
    *,
    step: int,
    epoch: int,
    rng_per_rank: list[dict[str, Any]],
    metrics: Mapping[str, float],
) -> None:
    """Write a resumable checkpoint of ``models`` (unwrapped if DDP) into ``directory``
    (layout in :mod:`pipeline.train.runner_utils`); ``rng_per_rank`` holds
    :func:`~pipeline.train.runner_utils.capture_rng_state` of every rank."""
    for name, module in models.named().items():
        torch.save(unwrap(module).state_dict(), directory / f"{name}.pt")
    opt_state: dict[str, Any] = {k: o.state_dict() for k, o in optimizers.named().items()}
    opt_state["schedulers"] = {k: s.state_dict() for k, s in optimizers.schedulers.items()}
    torch.save(opt_state, directory / "optimizers.pt")
    torch.save({"per_rank": rng_per_rank}, directory / "rng.pt")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "phase": phase.name,
        "phase_config": phase.config(),
        "step": step,
        "epoch": epoch,
        "world_size": len(rng_per_rank),
        "metrics": dict(metrics),
        "saved_at": time.time(),
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))


def _load_models(directory: Path, models: PhaseModels, device: torch.device | str) -> None:
    for name, module in models.named().items():
        path = directory / f"{name}.pt"
        if not path.is_file():
            raise RunnerError(f"checkpoint {directory}: {name}.pt is missing")
        module.load_state_dict(torch.load(path, map_location=device, weights_only=True))


def load_checkpoint(
    directory: Path,
    phase: TrainingPhase,
    models: PhaseModels,
    optimizers: PhaseOptimizers,
    device: torch.device | str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load :func:`save_checkpoint`'s files into built models and optimizers; return the
    meta and the per-rank RNG states (restore one with ``restore_rng_state``)."""
    meta = read_checkpoint_meta(directory)
    if meta["phase"] != phase.name:
        raise RunnerError(
            f"checkpoint {directory} is of phase {meta['phase']!r}, not {phase.name!r}"
        )
    _load_models(directory, models, device)
    opt_state = torch.load(directory / "optimizers.pt", map_location=device, weights_only=True)
    for name, opt in optimizers.named().items():
        if name not in opt_state:
            raise RunnerError(f"checkpoint {directory}: no state for the {name} optimizer")
        opt.load_state_dict(opt_state[name])
    for name, scheduler in optimizers.schedulers.items():
        scheduler.load_state_dict(opt_state["schedulers"][name])
    rng = torch.load(directory / "rng.pt", weights_only=True)["per_rank"]
    return meta, rng


# ---------------------------------------------------------------------------------------
# the per-worker train loop


def _lrs(optimizers: PhaseOptimizers) -> dict[str, float]:
    return {f"lr/{k}": float(o.param_groups[0]["lr"]) for k, o in optimizers.named().items()}


def _train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker. Returns (rank 0's value reaches the driver) a summary,
    or ``{"error": ...}`` for a failure that a restart would only repeat."""
    try:
        return _train_worker_inner(config)
    except _FatalError as exc:
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
                raise _NoFullBatchError(
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


# ---------------------------------------------------------------------------------------
# the driver side


def _run_dir(storage: str, run_name: str) -> str:
    return f"{storage.rstrip('/')}/{run_name}"


def _latest_checkpoint(
    storage: str, run_name: str
) -> tuple[ray.train.Checkpoint, dict[str, Any]] | None:
    """The last registered checkpoint of an earlier run with this name, and its meta."""
    from ray.train import Result

    try:
        result = Result.from_path(_run_dir(storage, run_name))
    except RuntimeError:  # no such run folder, or no checkpoint snapshot in it
        return None
    if result.checkpoint is None:
        return None
    ckpt = result.checkpoint
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/meta.json") as f:
        meta = json.loads(f.read().decode())
    return ckpt, meta


def _check_resumable(meta: Mapping[str, Any], phase: TrainingPhase, where: str) -> None:
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise RunnerError(
            f"{where}: checkpoint format {meta.get('format')!r} is not {CHECKPOINT_FORMAT}"
        )
    if meta["phase"] != phase.name:
        raise RunnerError(
            f"{where} holds a run of phase {meta['phase']!r}, not {phase.name!r}: "
            "use another run name or delete that folder"
        )
    old, new = meta.get("phase_config", {}), phase.config()
    if old != new:
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)
        raise RunnerError(
            f"{where} holds a run of phase {phase.name!r} with other settings ({diffs}). "
            "Resuming would mix them: delete that folder to start afresh, or use another run name"
        )


def _export(
    phase: TrainingPhase,
    checkpoint: ray.train.Checkpoint,
    export_dir: Path,
    result: dict[str, Any],
) -> list[str]:
    """Final weights from ``checkpoint`` into ``export_dir`` with ``result.json``, atomically."""
    models = phase.build_models()
    with checkpoint.as_directory() as d:
        _load_models(Path(d), models, "cpu")

    def build(tmp: Path) -> list[str]:
        phase.export(models, tmp)
        files = sorted(p.name for p in tmp.iterdir())
        write_json_atomic(tmp / "result.json", {**result, "exported_files": files})
        return files

    return replace_dir(export_dir, build)


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
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

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
    storage = resolve_storage_path(cfg.storage_path, repo_root())
    run_dir = _run_dir(storage, run_name)
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

    previous = _latest_checkpoint(storage, run_name)
    if previous is not None:
        _check_resumable(previous[1], phase, run_dir)
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
        for dataset in datasets.values():
            # the step lines are a run's progress; Ray Data's per-operator bars, drawn inside
            # the Train actors, reach the driver's log as screens of terminal redraws
            dataset.context.enable_progress_bars = False
        resources = {"CPU": cfg.cpus_per_worker}
        if cfg.use_gpu:
            resources["GPU"] = cfg.gpus_per_worker
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "phase": phase,
                "run_name": run_name,
                "max_steps": max_steps,
                "seed": params.seed,
                "init_weights": init_ref,
                "tracking_uri": tracking_uri,
                "mlflow_run_id": run_id,
                "bf16": cfg.bf16,
                "grad_clip": cfg.grad_clip,
                "log_every": cfg.log_every,
                "image_every": cfg.image_every,
                "checkpoint_every": cfg.checkpoint_every,
            },
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else cfg.cpu_backend),
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
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
                NonFiniteLossError
                if summary.get("error_type") == "NonFiniteLossError"
                else DataError
            )
            raise kind(f"{stage} ({run_name}): {summary['error']}")
        if fit.checkpoint is None:
            raise TrainingRunError(
                f"{stage}: Ray Train run {run_name!r} ended without a checkpoint"
            )
        ckpt = fit.checkpoint

    result = {
        **base_result,
        "steps": summary["step"],
        "started_from_step": summary.get("started_from_step"),
        "world_size": summary.get("world_size"),
        "final_metrics": summary.get("metrics", {}),
        "checkpoint_path": ckpt.path,
        "wall_time_s": round(time.time() - started, 3),
    }
    result["exported_files"] = _export(phase, ckpt, export_dir, result)
    if active is not None:
        from pipeline.tracking import log_json_artifact

        mlflow.set_tags({"plvc.ray_run_path": run_dir, "plvc.export_dir": str(export_dir)})
        log_json_artifact(result, "result.json")
    print(f"[{run_name}] done at step {result['steps']}; weights in {export_dir}", flush=True)
    return result
