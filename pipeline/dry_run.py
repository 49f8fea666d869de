"""Dry run of a setting: does ``params-full.yaml`` start? Every stage of the pipeline, at the
setting's model sizes, on a few clips of the built-in sample, for a few steps, on CPU.

    python -m pipeline.dry_run [--params params-full.yaml] [--quality low] [--workdir DIR]

The setting's own file stays untouched: :func:`dry_run_settings` derives a params file from it
in ``--workdir`` (default: a temp folder) that keeps every model and loss setting (presets,
Table 1, the GAN loss, the flow warm-up's sub-phases, bf16 is the only precision change: off
on CPU) and shrinks what costs time: the data (the sample's ``carphone_pristine`` at 128x192),
one quality, 3/2/2 PLVC steps and 2+2 HiFiC steps, batch = workers = 1, 64x64 crops, one
evaluation clip, one x264 point, the metrics that need no downloaded backbone. Backbones the
setting asks for but this machine lacks (LPIPS's AlexNet) are replaced by randomly initialised
files written to the workdir, and the run says so: the code path runs, the values mean nothing.

Then it runs the stages in ``dvc.yaml``'s order, each as its own process and MLflow run,
under one local Ray head, and prints per stage its wall time, the peak resident memory of the
stage's processes and Ray's workers together (RSS summed, so shared pages count more than
once: an upper bound), and the training stages' seconds per step. Each stage's output goes to
``<workdir>/logs/<stage>.log``. Its head is a second local Ray on this machine if one runs
already (``make demo``): Ray's token auth keeps one token file per user, so let the other
finish first. About 13 minutes on 2 cores for ``params-full.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, Params, load_params
from pipeline.errors import PipelineError

__all__ = [
    "DryRunError",
    "PhaseStep",
    "StageFigures",
    "dry_run_settings",
    "run_dry_run",
    "stage_commands",
    "train_every_phase",
    "write_dry_run_params",
]

#: what a dry run trains: enough steps to pass through every sub-phase once
DRY_STEPS = {"hific_warmup": 2, "hific_gan": 2, "single_p": 3, "multi_p": 2, "gan": 2}
DRY_CROP = 64


class DryRunError(PipelineError):
    """A stage of the dry run failed; the message names it and ends with its output."""


def _random_alexnet(path: Path) -> str:
    """A torchvision AlexNet state dict at random init: LPIPS's code path without its weights."""
    import torch
    import torchvision

    if not path.is_file():
        torch.manual_seed(0)
        torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return str(path)


def dry_run_settings(
    params_file: Path, quality: str, workdir: Path
) -> tuple[dict[str, Any], list[str]]:
    """The dry run's params (a dict ready for YAML) derived from ``params_file``, and notes on
    what was replaced (random backbones). Raises :class:`~pipeline.config.ConfigError` when the
    setting does not validate or has no ``quality``."""
    params = load_params(params_file)  # validates the setting itself first
    if quality not in params.qualities:
        raise ConfigError(
            f"{params_file}: quality {quality!r} is not in 'qualities' ({sorted(params.qualities)})"
        )
    raw = yaml.safe_load(Path(params_file).read_text())
    notes: list[str] = []
    raw["qualities"] = {quality: raw["qualities"][quality]}
    raw["tracking"] = {**raw.get("tracking", {}), "uri": f"sqlite:///{workdir / 'mlflow.db'}"}
    raw["ray"] = {"address": None, "num_cpus": None}
    raw["download"] = {
        **raw.get("download", {}),
        "source": "sample",
        "sample": {
            "videos": ["carphone_pristine"],
            "height": 128,
            "width": 192,
            "clip_stride": 24,
            "test_fraction": 0.25,
            "min_clips": 4,
        },
    }
    raw["shard"] = {**raw.get("shard", {}), "workers": 1}
    raw["data"] = {**raw.get("data", {}), "crop_height": DRY_CROP, "crop_width": DRY_CROP}
    raw["runner"] = {
        **raw.get("runner", {}),
        "num_workers": 1,
        "use_gpu": False,
        "cpus_per_worker": 1,
        "checkpoint_every": 1,
        "log_every": 1,
        "image_every": 1,
        "max_failures": 0,
        "materialize_data": True,
        "bf16": False,
    }
    hific = raw["hific"]
    hific.update(
        warmup_steps=DRY_STEPS["hific_warmup"],
        gan_steps=DRY_STEPS["hific_gan"],
        batch_size=1,
        crop=DRY_CROP,
        lr_milestones=[],
        pretrained={},
    )
    hific["operating_points"] = {quality: hific["operating_points"][quality]}
    if hific["operating_points"][quality].get("k_p", 0) > 0 and not hific.get("lpips_backbone"):
        hific["lpips_backbone"] = _random_alexnet(workdir / "alexnet-random.pth")
        notes.append("hific.lpips_backbone: a randomly initialised AlexNet (none was set)")
    raw["iframes"] = {"batch_size": 2, "num_actors": 1, "use_gpu": False}
    train = raw["train"]
    single_p = train["single_p"]
    warmup = (single_p.get("flow_steps", 0) > 0, single_p.get("mc_steps", 0) > 0)
    single_p.update(
        steps=DRY_STEPS["single_p"],
        flow_steps=int(warmup[0]),
        mc_steps=int(warmup[1]),
        lr_milestones=[],
    )
    for name in ("single_p", "multi_p", "gan"):
        train[name].update(batch_size=1, crop=DRY_CROP, lr_milestones=[])
        if name != "single_p":
            train[name]["steps"] = DRY_STEPS[name]
    train["heldout_clips"] = 1
    gan = train["gan"]
    if gan.get("loss") == "official" and not gan.get("lpips_backbone"):
        gan["lpips_backbone"] = _random_alexnet(workdir / "alexnet-random.pth")
        notes.append("train.gan.lpips_backbone: a randomly initialised AlexNet (none was set)")
    offline = {
        "psnr_rgb",
        "psnr_y",
        "psnr_yuv",
        "ms_ssim",
        "tdiff_mae",
        "vmaf",
        "vmaf_neg",
        "xpsnr",
    }
    metrics = [m for m in raw["evaluate"].get("metrics", ["psnr_rgb"]) if m in offline]
    dropped = sorted(set(raw["evaluate"].get("metrics", [])) - set(metrics))
    if dropped:
        notes.append(f"evaluate.metrics without {dropped}: their backbones cannot be had here")
    raw["evaluate"].update(
        gop=3,
        max_clips=1,
        sequences=[],
        metrics=metrics or ["psnr_rgb"],
        baselines=[{"codec": "x264", "rate_control": "crf", "points": [30]}],
    )
    return raw, notes


class PhaseStep(dict):
    """``{"phase", "parameters", "losses", "flops"}``: a phase's models' parameter count, its
    loss at two iterations, and the FLOPs of the second (forward, D step, backward)."""


def train_every_phase(dry: Params, quality: str) -> list[PhaseStep]:
    """Two training iterations of every phase of ``dry`` (a :func:`dry_run_settings` params:
    HiFiC warm-up and GAN, single-P, multi-P, GAN) in this process on the CPU, each phase
    built by the pipeline's own builders at the setting's model sizes, on one random sample
    at the dry run's crop. The in-process half of the dry run: what needs no Ray and no data.
    The second iteration is counted by ``torch.utils.flop_counter`` (convolutions and matrix
    products, forward and backward)."""
    import dataclasses

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.train.phases.hific import hific_phases
    from pipeline.train.phases.plvc import build_phase
    from pipeline.train.phases.plvc_models import ClipBatch
    from pipeline.train.stepper import PhaseStepper

    torch.manual_seed(0)
    crop = dry.train.single_p.crop
    phases: list[tuple[str, Any, Any, int]] = []
    warmup, gan = hific_phases(dry, quality)
    images = torch.rand(1, 3, dry.hific.crop, dry.hific.crop)
    for name, phase in (("hific_warmup", warmup), ("hific_gan", gan)):
        if phase is not None:
            phases.append((name, dataclasses.replace(phase, crop=dry.hific.crop), images, 1))
    for name in ("single_p", "multi_p", "gan"):
        phase = build_phase(name, dry, quality)
        frames = torch.rand(1, phase.clip_frames, 3, crop, crop)
        # single-P: the first step after its warm-up sub-phases, eq. 4 itself
        first = getattr(phase, "flow_steps", 0) + getattr(phase, "mc_steps", 0) + 1
        phases.append((name, phase, ClipBatch(frames, frames[:, 0]), first))
    out: list[PhaseStep] = []
    for name, phase, batch, first in phases:
        if hasattr(phase, "load_lpips"):
            phase.load_lpips()
        phase.setup(torch.device("cpu"))
        models = phase.build_models()
        stepper = PhaseStepper(phase, models, phase.build_optimizers(models), grad_clip=1.0)
        losses = [float(stepper.step(batch, first)["loss"])]
        with FlopCounterMode(display=False) as counter:
            losses.append(float(stepper.step(batch, first + 1)["loss"]))
        parameters = sum(p.numel() for m in models.named().values() for p in m.parameters())
        out.append(
            PhaseStep(
                phase=name, parameters=parameters, losses=losses, flops=counter.get_total_flops()
            )
        )
    return out


def write_dry_run_params(params_file: Path, quality: str, workdir: Path) -> tuple[Path, list[str]]:
    """Write :func:`dry_run_settings` to ``workdir/params.yaml``, checked by the config loader;
    returns that file and the notes on what was replaced."""
    workdir.mkdir(parents=True, exist_ok=True)
    settings, notes = dry_run_settings(params_file, quality, workdir)
    dry_params = workdir / "params.yaml"
    dry_params.write_text(yaml.safe_dump(settings, sort_keys=False))
    load_params(dry_params)  # the derived file must validate too
    return dry_params, notes


def stage_commands(quality: str) -> list[tuple[str, list[str]]]:
    """The pipeline's stages for one quality, in ``dvc.yaml``'s order: (name, argv)."""
    module = [sys.executable, "-m"]
    q = ["--quality", quality]
    return [
        ("download", [*module, "stages.download"]),
        ("shard", [*module, "stages.shard"]),
        (f"train_hific@{quality}", [*module, "stages.train_hific", *q]),
        (f"iframes@{quality}", [*module, "stages.iframes", *q]),
        (f"train_single_p@{quality}", [*module, "stages.train_single_p", *q]),
        (f"train_multi_p@{quality}", [*module, "stages.train_multi_p", *q]),
        (f"train_gan@{quality}", [*module, "stages.train_gan", *q]),
        ("evaluate_baselines", [*module, "stages.evaluate_baselines"]),
        (f"evaluate@{quality}", [*module, "stages.evaluate", *q]),
        ("evaluate_report", [*module, "stages.evaluate_report"]),
    ]


class _PeakMemory:
    """Peak summed RSS of this process's descendants (the stage and Ray's processes), sampled
    every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # it ended meanwhile
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> _PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class StageFigures(dict):
    """``{"stage", "wall_s", "peak_rss_gib", "s_per_step"}`` of one stage of a dry run."""


def _seconds_per_step(metrics_file: Path) -> float | None:
    import json

    if not metrics_file.is_file():
        return None
    data = json.loads(metrics_file.read_text())
    rate = data.get("clips_per_s_per_worker")
    return 1.0 / rate if rate else None  # batch 1 per worker: one clip per step


def run_dry_run(
    params_file: Path, quality: str, workdir: Path, *, timeout_s: float = 1800.0
) -> list[StageFigures]:
    """Write the dry run's params into ``workdir`` and run every stage there (see the module
    docstring); returns each stage's figures. Raises :class:`DryRunError` naming the first
    stage that fails, with the end of its output."""
    from pipeline.ray_cluster import SINGLE_NODE_TRAIN_ENV, local_head

    dry_params, notes = write_dry_run_params(params_file, quality, workdir)
    for note in notes:
        print(f"[dry run] {note}", flush=True)
    repo = Path(__file__).resolve().parent.parent
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    figures: list[StageFigures] = []
    with local_head() as address:
        env = {
            **SINGLE_NODE_TRAIN_ENV,
            **os.environ,
            "RAY_ADDRESS": address,
            "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
        }
        for name, argv in stage_commands(quality):
            log = logs / f"{name.replace('@', '-')}.log"
            print(f"[dry run] {name} (output: {log}) ...", flush=True)
            started = time.time()
            with _PeakMemory() as memory, open(log, "w") as out:
                done = subprocess.run(
                    [*argv, "--params", str(dry_params)],
                    cwd=workdir,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout_s,
                )
            wall = time.time() - started
            if done.returncode != 0:
                tail = log.read_text(errors="replace")[-4000:]
                raise DryRunError(f"dry run: stage {name} failed (exit {done.returncode}):\n{tail}")
            stage_key = name.split("@")[0]
            per_step = _seconds_per_step(workdir / "metrics" / quality / f"{stage_key}.json")
            row = StageFigures(
                stage=name, wall_s=wall, peak_rss_gib=memory.peak / 2**30, s_per_step=per_step
            )
            figures.append(row)
            step = f", {per_step:.2f} s/step" if per_step else ""
            print(f"[dry run] {name}: {wall:.0f} s, peak {row['peak_rss_gib']:.1f} GiB{step}")
    return figures


def print_table(figures: Sequence[StageFigures]) -> None:
    print("\n| stage | wall | peak RSS (stage + Ray) | s/step |")
    print("|---|---|---|---|")
    for row in figures:
        step = f"{row['s_per_step']:.2f}" if row["s_per_step"] else ""
        print(
            f"| `{row['stage']}` | {row['wall_s']:.0f} s | {row['peak_rss_gib']:.1f} GiB | {step} |"
        )
    print(f"| **all** | **{sum(r['wall_s'] for r in figures):.0f} s** | | |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.dry_run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--params", type=Path, default=Path("params-full.yaml"))
    parser.add_argument("--quality", default="low")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="default: a temp folder, removed"
    )
    args = parser.parse_args(argv)
    try:
        if args.workdir is not None:
            print_table(run_dry_run(args.params, args.quality, args.workdir))
            return
        with tempfile.TemporaryDirectory(prefix="plvc-dry-run-") as tmp:
            print_table(run_dry_run(args.params, args.quality, Path(tmp)))
    except (PipelineError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
