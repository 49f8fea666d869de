"""DVC stage ``evaluate@<quality>``: real bitstreams of every PLVC phase and of the I-frame
codec alone, decoded back and measured (paper, "Experiments"; DESIGN §5).

Reads the test shards (``paths.shards/test``), ``evaluate.sequences`` and
``paths.models/<quality>/``; writes ``paths.reports/qualities/<quality>/`` (``metrics.json``,
``frames.csv``, ``points.json``, ``gop_profile/``, ``images/``, ...; fields in
``docs/evaluation.md``). One MLflow run with every number and file.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch

from pipeline.cli import run_stage, stage_parser
from pipeline.config import ConfigError, Params, load_params
from pipeline.eval.measure import evaluate_quality, metric_config, mlflow_metrics
from pipeline.eval.metrics import MetricSet
from pipeline.eval.models import load_quality_models
from pipeline.eval.outputs import evaluation_dir, write_evaluation
from pipeline.eval.testset import TestSet
from pipeline.tracking import stage_run
from plvc.determinism import CodingMode


def evaluation_device() -> str:
    """The device models and metric backbones run on: CUDA when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_test_set(params: Params) -> TestSet:
    """The test shards' clips (when the shards exist or no YUV sequence is listed) and
    ``evaluate.sequences``."""
    cfg = params.evaluate
    shard_dir: Path | None = Path(params.paths.shards) / "test"
    if cfg.sequences and not shard_dir.is_dir():  # type: ignore[union-attr]
        print(f"note: {shard_dir} does not exist: evaluating evaluate.sequences only", flush=True)
        shard_dir = None
    return TestSet(shard_dir, max_clips=cfg.max_clips, yuv_sequences=cfg.sequences)


def log_files(files: dict[str, Path], out_dir: Path) -> None:
    """Every written file as an MLflow artifact, under its path relative to ``out_dir``."""
    for path in files.values():
        parent = path.parent.relative_to(out_dir)
        mlflow.log_artifact(str(path), artifact_path=None if str(parent) == "." else str(parent))


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--quality", required=True, help="a key of `qualities` (low, medium, high)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    quality = args.quality
    if quality not in params.qualities:
        raise ConfigError(
            f"--quality {quality!r} is not a key of `qualities` in {args.params} "
            f"({', '.join(params.qualities)})"
        )
    cfg = params.evaluate
    device = evaluation_device()
    # everything that can be missing is checked before any coding: backbones, models, data
    metric_set = MetricSet(metric_config(cfg, device))
    models = load_quality_models(params.paths.models, quality, device)
    sequences = load_test_set(params)
    out_dir = evaluation_dir(params.paths.reports, quality)
    evaluate = cfg.model_dump(mode="json", exclude={"baselines"})  # the anchors' stage logs those
    logged = {"evaluate": evaluate, "quality": quality, "device": device}
    with stage_run("evaluate", params, logged_params=logged, run_name=f"evaluate-{quality}"):
        if models.missing_phases:
            print(f"note: no weights for phase(s) {', '.join(models.missing_phases)}", flush=True)
        result = evaluate_quality(
            sequences,
            models,
            metric_set,
            gop=cfg.gop,
            coding_mode=CodingMode(**cfg.coding.model_dump()),
            workers=cfg.workers,
            visual_sequences=params.tracking.max_logged_images // 2,
            ffmpeg=None if cfg.ffmpeg is None else str(cfg.ffmpeg),
        )
        files = write_evaluation(result, out_dir)
        mlflow.log_metrics(mlflow_metrics(result))
        mlflow.set_tag("plvc.random_backbones", ",".join(result.random_backbones) or "none")
        log_files(files, out_dir)
        for method, summary in result.methods.items():
            numbers = ", ".join(
                f"{k} {summary[k]:.4f}" for k in ("bpp", "psnr_rgb", "ms_ssim") if k in summary
            )
            print(f"[evaluate-{quality}] {method}: {numbers}", flush=True)
        mismatched = {m: s["decoder_mismatch_frames"] for m, s in result.methods.items()}
        if any(mismatched.values()):
            print(f"WARNING: decoder output differs from the encoder's: {mismatched}", flush=True)


if __name__ == "__main__":
    run_stage(main)
