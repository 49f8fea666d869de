"""Fixed cost of the PLVC training stages: what a stage costs on top of its training steps.

    .venv/bin/python -m benchmarks.stage_overhead [--stages train_single_p train_multi_p]
        [--steps 6] [--code-root DIR] [--own-ray] [--workdir DIR]

Each stage runs as DVC runs it (its own process: ``python -m stages.<name> --quality medium``)
on the built-in sample with ``--steps`` training steps (fresh Ray Train storage): fixed cost =
wall - steps x (time from step 1 to the last step) / (steps - 1). The I-frames come from a
randomly initialised tiny HiFiC given as ``hific.pretrained`` (the stages' fixed costs do not
depend on its weights). Every run is also split at the timestamps it leaves in MLflow:

    start -> run    process start, imports, params, MLflow run created
    run -> step 1   Ray joined, train split read, Train controller, workers, DDP, first step
    steps           step 1 to the last step
    last -> end     last checkpoint, export, held-out check, logging
    end -> exit     MLflow run closed to the process gone

All stages share one local Ray head (``pipeline.ray_cluster``, what ``make demo`` does) unless
``--own-ray`` (each stage starts and stops its own, as a stage run alone does). ``--code-root``
runs another checkout's stages and params (e.g. ``git worktree add /tmp/before <commit>``): a
before/after table from the same benchmark. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
QUALITY = "medium"
PHASE_KEY = {"train_single_p": "single_p", "train_multi_p": "multi_p", "train_gan": "gan"}


def _params(code_root: Path, workdir: Path, hific: Path) -> dict[str, Any]:
    data = yaml.safe_load((code_root / "params.yaml").read_text())
    for key in data["paths"]:
        data["paths"][key] = str(workdir / data["paths"][key])
    data["tracking"]["uri"] = f"sqlite:///{workdir / 'mlflow.db'}"
    data["hific"]["pretrained"] = {QUALITY: str(hific)}
    data["runner"].update({"log_every": 1, "checkpoint_every": 1000, "image_every": 10**6})
    qualities = yaml.safe_load((code_root / "params-full.yaml").read_text())["qualities"]
    data["qualities"] = {QUALITY: qualities[QUALITY]}
    return data


def _run(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    started = time.time()
    with open(log, "w") as out:
        done = subprocess.run(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}); end of {log}:\n{tail}")
    return started


def _timeline(tracking_uri: str, run_name: str, started: float, ended: float) -> dict[str, float]:
    """Seconds of each part of the newest MLflow run called ``run_name``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("plvc")
    run = client.search_runs(
        [experiment.experiment_id],
        f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    history = sorted(
        client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.timestamp
    )
    run_start, run_end = run.info.start_time / 1000, run.info.end_time / 1000
    first, last = history[0].timestamp / 1000, history[-1].timestamp / 1000
    return {
        "start -> run": run_start - started,
        "run -> step 1": first - run_start,
        "steps": last - first,
        "last -> end": run_end - last,
        "end -> exit": ended - run_end,
        "wall": ended - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=list(PHASE_KEY), choices=list(PHASE_KEY))
    parser.add_argument("--steps", type=int, default=6, help="training steps per stage (>= 2)")
    parser.add_argument("--code-root", type=Path, default=REPO)
    parser.add_argument("--own-ray", action="store_true", help="each stage starts its own Ray")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the step time is measured from step 1 on)")
    code_root = args.code_root.resolve()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="stage_overhead_"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)

    import torch

    from plvc.hific import HiFiC, HiFiCConfig, save_hific

    torch.manual_seed(0)
    hific = workdir / "hific_random.pt"
    save_hific(hific, HiFiC(HiFiCConfig.tiny()))
    params = _params(code_root, workdir, hific)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(code_root),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PLVC_PIPELINE_ID", None)

    def params_file(name: str, **runner: Any) -> Path:
        data = yaml.safe_load(yaml.safe_dump(params))
        data["runner"].update(runner)
        path = workdir / f"params-{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def stage(module: str, path: Path, log: str) -> tuple[float, float]:
        argv = [sys.executable, "-m", f"stages.{module}", "--params", str(path)]
        if module not in ("download", "shard"):
            argv += ["--quality", QUALITY]
        started = _run(argv, code_root, env, logs / f"{log}.log")
        return started, time.time()

    print(f"code: {code_root}; work: {workdir}; Ray: {'own' if args.own_ray else 'shared head'}")
    with contextlib.ExitStack() as stack:
        if not args.own_ray:
            from pipeline.ray_cluster import SINGLE_NODE_TRAIN_ENV, local_head

            address = stack.enter_context(local_head())
            # what starting the head set here (its auth mode), as `pipeline.ray_cluster` passes
            env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_")})
            env.update({**SINGLE_NODE_TRAIN_ENV, "RAY_ADDRESS": address})
        rows = _measure(args.stages, args.steps, workdir, params, params_file, stage)
    _print_table(rows)


def _measure(
    stages: list[str],
    steps: int,
    workdir: Path,
    params: dict[str, Any],
    params_file: Callable[..., Path],
    stage: Callable[[str, Path, str], tuple[float, float]],
) -> list[tuple[str, int, dict[str, float]]]:
    setup = params_file("setup")
    for module in ("download", "shard", "train_hific", "iframes"):
        started, ended = stage(module, setup, module)
        print(f"  set-up {module:12s} {ended - started:6.1f} s", flush=True)

    rows: list[tuple[str, int, dict[str, float]]] = []
    for name in stages:
        params["train"][PHASE_KEY[name]]["steps"] = steps
        path = params_file(name, storage_path=str(workdir / f"ray-{name}"))
        started, ended = stage(name, path, name)
        parts = _timeline(params["tracking"]["uri"], f"{name}-{QUALITY}", started, ended)
        rows.append((name, steps, parts))
        print(f"  {name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()), flush=True)
    return rows


def _print_table(rows: list[tuple[str, int, dict[str, float]]]) -> None:
    keys = ["start -> run", "run -> step 1", "steps", "last -> end", "end -> exit", "wall"]
    print("\n| stage | steps | " + " | ".join(keys) + " | fixed cost |")
    print("|---|---|" + "---|" * (len(keys) + 1))
    for name, steps, parts in rows:
        per_step = parts["steps"] / (steps - 1)
        fixed = parts["wall"] - steps * per_step
        cells = " | ".join(f"{parts[k]:.1f} s" for k in keys)
        print(f"| `{name}` | {steps} | {cells} | {fixed:.1f} s ({per_step:.2f} s/step) |")


if __name__ == "__main__":
    main()
