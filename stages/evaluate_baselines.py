"""DVC stage ``evaluate_baselines``: x264 / x265 (low-delay P, the evaluation's GOP) on the
test frames of ``evaluate@<quality>`` at every rate point of ``evaluate.baselines``.

The anchors do not depend on the quality, so they run once. Writes
``paths.reports/baselines/`` (``metrics.json``, ``frames.csv``, ``points.json``,
``by_method/``, ...; fields in ``docs/evaluation.md``) and one MLflow run.
"""

from __future__ import annotations

import mlflow

from pipeline.cli import run_stage, stage_parser
from pipeline.config import load_params
from pipeline.eval.measure import (
    anchor_configs,
    check_anchors,
    evaluate_anchors,
    metric_config,
    mlflow_metrics,
)
from pipeline.eval.metrics import MetricSet
from pipeline.eval.outputs import BASELINES, evaluation_dir, write_evaluation
from pipeline.tracking import stage_run
from stages.evaluate import evaluation_device, load_test_set, log_files


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__.splitlines()[0]).parse_args(argv)
    params = load_params(args.params)
    cfg = params.evaluate
    device = evaluation_device()
    metric_set = MetricSet(metric_config(cfg, device))
    configs = anchor_configs(cfg.baselines, cfg.ffmpeg)
    check_anchors(configs)
    sequences = load_test_set(params)
    out_dir = evaluation_dir(params.paths.reports, BASELINES)
    logged = {"evaluate": cfg.model_dump(mode="json"), "device": device}
    with stage_run("evaluate_baselines", params, logged_params=logged):
        result = evaluate_anchors(sequences, configs, metric_set, gop=cfg.gop)
        files = write_evaluation(result, out_dir)
        mlflow.log_metrics(mlflow_metrics(result))
        log_files(files, out_dir)
        for codec, by_point in result.methods.items():
            for point, summary in by_point.items():
                numbers = ", ".join(
                    f"{k} {summary[k]:.4f}" for k in ("bpp", "psnr_rgb", "ms_ssim") if k in summary
                )
                print(f"[evaluate_baselines] {codec} {point}: {numbers}", flush=True)


if __name__ == "__main__":
    run_stage(main)
