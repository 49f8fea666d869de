"""DVC stage ``evaluate_report``: RD curves of every method across the qualities, and the
BD-rate summary against x265.

Reads ``paths.reports/{<quality>...,baselines}/points.json``; writes ``paths.reports/rd/``
(``figures/rd_<metric>.png``, ``points.json``, ``points.csv``, ``by_method/<method>.csv``) and
``paths.reports/summary.md`` (:func:`pipeline.eval.report.build_report`). One MLflow run.
"""

from __future__ import annotations

from pathlib import Path

import mlflow

from pipeline.cli import run_stage, stage_parser
from pipeline.config import load_params
from pipeline.eval.report import build_report
from pipeline.tracking import stage_run


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
        for note in report.warnings:
            print(f"note: {note}", flush=True)
        print(
            f"[evaluate_report] {report.summary_path}: {len(report.points)} RD points", flush=True
        )


if __name__ == "__main__":
    run_stage(main)
