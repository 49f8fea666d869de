"""DVC stage ``evaluate_report``: RD curves of every method across the qualities, and the
BD-rate summary against x265.

Reads ``paths.reports/{qualities/<quality>...,baselines}/points.json``; writes ``paths.reports/rd/``
(``figures/rd_<metric>.png``, ``points.json``, ``points.csv``, ``by_method/<method>.csv``) and
``paths.reports/summary.md`` (:func:`pipeline.eval.report.build_report`). One MLflow run, and
the pipeline's summary on its parent run (RD points, BD-rates against every anchor, figures,
the params changed since the commit), for comparing experiments in the MLflow UI.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow

from pipeline.cli import run_stage, stage_parser
from pipeline.config import load_params
from pipeline.eval.report import build_report, summary_metrics
from pipeline.tracking import (
    log_pipeline_summary,
    metric_key,
    params_changed_since_commit,
    stage_run,
)


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__.splitlines()[0]).parse_args(argv)
    params = load_params(args.params)
    reports = Path(params.paths.reports)
    qualities = list(params.qualities)
    with stage_run("evaluate_report", params, logged_params={"qualities": qualities}):
        report = build_report(reports, qualities)
        for plot in report.plots:
            mlflow.log_artifact(str(plot), artifact_path="rd")
        mlflow.log_artifact(str(report.summary_path))
        for name, path in report.files.items():
            if name.startswith("by_method/") or name in ("json", "csv"):
                sub = path.parent.relative_to(reports)
                mlflow.log_artifact(str(path), artifact_path=str(sub))
        mlflow.log_metrics({"points": len(report.points), "missing_inputs": len(report.missing)})
        changed = params_changed_since_commit(args.params)
        exp_name = os.environ.get("DVC_EXP_NAME", "")
        parent = log_pipeline_summary(
            {metric_key(*parts): value for parts, value in summary_metrics(report).items()},
            [(report.summary_path, None), *((plot, "rd/figures") for plot in report.plots)],
            {**({"dvc_exp_name": exp_name} if exp_name else {}), **changed},
        )
        print(f"[evaluate_report] summary on the pipeline's run {parent}", flush=True)
        for note in report.warnings:
            print(f"note: {note}", flush=True)
        print(
            f"[evaluate_report] {report.summary_path}: {len(report.points)} RD points", flush=True
        )


if __name__ == "__main__":
    run_stage(main)
