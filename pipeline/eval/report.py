"""``evaluate_report``: RD curves of every method over the qualities against the anchors, the
BD-rate table and ``reports/summary.md``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.eval.bd_classes import ClassBDRates, class_bd_rates, class_bd_table, sequence_points
from pipeline.eval.measure import REFERENCE_METHOD
from pipeline.eval.metrics import RANDOM_SUFFIX, EvaluationError
from pipeline.eval.outputs import BASELINES, clear_folder, evaluation_dir
from pipeline.eval.rd import (
    PLOT_METRICS,
    BDRateError,
    RDPoint,
    bd_rate_table,
    bd_rates,
    curves,
    plot_rd_all,
    read_points_json,
    write_points,
)
from pipeline.io import write_bytes_atomic

__all__ = [
    "BD_METRICS",
    "ReportResult",
    "anchor_points_lines",
    "build_report",
    "summary_metrics",
]


#: the BD-rate tables' metrics (fidelity, then perception), where measured
BD_METRICS = ("psnr_rgb", "psnr_yuv", "ms_ssim", "vmaf", "vmaf_neg", "xpsnr", "lpips")


_REPORT_METRICS = (*PLOT_METRICS, "psnr_y", "psnr_yuv", "tdiff_mae", "tlp")


_METRIC_NAMES = {
    "lpips": "LPIPS",
    "psnr_rgb": "PSNR (RGB)",
    "psnr_y": "PSNR (Y)",
    "psnr_yuv": "PSNR (YUV 6:1:1)",
    "ms_ssim": "MS-SSIM",
    "fid": "FID",
    "kid": "KID",
    "tdiff_mae": "temporal diff. MAE",
    "tlp": "tLP",
    "vmaf": "VMAF",
    "vmaf_neg": "VMAF NEG",
    "xpsnr": "XPSNR (Y)",
}


_WHY_ABSENT = {
    "lpips": "not in `evaluate.metrics` (it needs `evaluate.lpips_backbone`)",
    "tlp": "not in `evaluate.metrics` (it needs `evaluate.lpips_backbone`)",
    "fid": "not in `evaluate.metrics` (it needs `evaluate.inception_weights`)",
    "kid": "not in `evaluate.metrics` (it needs `evaluate.inception_weights`)",
}


@dataclass
class ReportResult:
    """What :func:`build_report` read and wrote."""

    points: list[RDPoint]
    plots: list[Path]
    summary_path: Path
    files: dict[str, Path]
    warnings: list[str]
    missing: list[str]
    anchors: list[str]
    """The baselines' methods, the reference first."""
    bd_rates: dict[str, dict[str, dict[str, float | str]]]
    """``{anchor: {method: {metric key: BD-rate % or why not}}}`` on pooled points."""
    class_bd_rates: ClassBDRates = field(default_factory=dict)
    """Per-sequence BD-rates averaged per class (:mod:`pipeline.eval.bd_classes`)."""


def _metric_present(points: Sequence[RDPoint], metric: str) -> str | None:
    for key in (metric, metric + RANDOM_SUFFIX):
        if any(key in p.metrics for p in points):
            return key
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf"
        return f"{value:.4g}"
    return str(value)


def _read_metrics_doc(path: Path) -> dict[str, Any] | None:
    import json

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def anchor_points_lines(sources_json: Path) -> list[str]:
    """Markdown lines saying where each anchor's rate points came from: a fixed list, or
    the rate search (its bpp range, what it reached, on which frames)."""
    try:
        methods = json.loads(sources_json.read_text())["methods"]
    except (OSError, ValueError, KeyError):
        return []
    lines = ["## Anchor rate points", ""]
    for method, by_point in methods.items():
        labels = list(by_point)
        search = next((s["rate_search"] for s in by_point.values() if "rate_search" in s), None)
        if search is None:
            lines.append(f"- {method}: {', '.join(labels)}, fixed in `evaluate.baselines`.")
            continue
        low, high = search["bpp_range"]
        top, bottom = search["reached_bpp"]
        lines.append(
            f"- {method}: {', '.join(labels)}, chosen by a search for {low:g}-{high:g} bpp on "
            f"the first {search['frames_per_sequence']} frames of "
            f"{len(search['sequences'])} sequences ({len(search['probes'])} probes; the end "
            f"points gave {top:.4f} and {bottom:.4f} bpp there)"
            + ("." if search["covers_range"] else ": its scale does not reach the whole range.")
        )
    return [*lines, ""]


def build_report(
    reports_dir: str | os.PathLike[str],
    qualities: Sequence[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    summary_path: str | os.PathLike[str] | None = None,
    reference: str = REFERENCE_METHOD,
    bd_metrics: Sequence[str] = BD_METRICS,
) -> ReportResult:
    """RD plots, RD point files and a Markdown summary with BD-rates against ``reference``,
    from ``reports_dir/qualities/<quality>/points.json`` and ``reports_dir/baselines/points.json``
    (:func:`pipeline.eval.outputs.evaluation_dir`).

    Writes ``out_dir`` (default ``reports_dir/rd``): ``figures/rd_<metric>.png`` for every
    metric measured, ``points.json``, ``points.csv``, ``by_method/<method>.csv`` (one curve
    per method across the qualities); and ``summary_path`` (default
    ``reports_dir/summary.md``).
    A missing input is listed in the summary; none at all is an error.
    """
    reports = Path(reports_dir)
    out = Path(out_dir) if out_dir is not None else reports / "rd"
    summary_file = Path(summary_path) if summary_path is not None else reports / "summary.md"
    points: list[RDPoint] = []
    missing: list[str] = []
    docs: dict[str, dict[str, Any]] = {}
    anchors: list[str] = []
    for name in [*qualities, BASELINES]:
        path = evaluation_dir(reports, name) / "points.json"
        if not path.is_file():
            missing.append(str(path))
            continue
        read = read_points_json(path)
        points.extend(read)
        if name == BASELINES:
            anchors = list(dict.fromkeys(p.method for p in read))
        doc = _read_metrics_doc(evaluation_dir(reports, name) / "metrics.json")
        if doc is not None:
            docs[name] = doc
    if not points:
        raise EvaluationError(
            f"nothing to report: none of {', '.join(missing)} exists; run the evaluate stages first"
        )
    notes: list[str] = []
    if missing:
        notes.append(f"Missing inputs (not in this report): {', '.join(missing)}.")
    fingerprints = {n: d.get("test_set", {}).get("fingerprint") for n, d in docs.items()}
    if len({f for f in fingerprints.values() if f}) > 1:
        notes.append(
            "The evaluations ran on DIFFERENT test sets (test_set.fingerprint: "
            + ", ".join(f"{n} {f}" for n, f in fingerprints.items())
            + "): rates and qualities are not comparable across them; re-run them with "
            "the same params."
        )
    random = sorted({b for d in docs.values() for b in d.get("random_backbones") or []})
    if random:
        notes.append(
            f"RANDOM backbones ({', '.join(random)}): the `{RANDOM_SUFFIX}` numbers test the "
            "code path only and are not LPIPS/FID/KID."
        )

    plot_metrics = [m for m in _REPORT_METRICS if _metric_present(points, m)]
    clear_folder(out / "figures", ".png")  # a metric or method may be gone since
    clear_folder(out / "by_method", ".csv")
    plots = plot_rd_all(points, out / "figures", metrics=plot_metrics)
    files = {f"plot/{p.stem}": p for p in plots}
    for name, path in write_points(points, out).items():
        files[name if name in ("json", "csv") else f"by_method/{name}"] = path

    lines = ["# PLVC evaluation", ""]
    test_set = next((d["test_set"] for d in docs.values() if "test_set" in d), None)
    if test_set:
        gop = next(iter(docs.values())).get("gop")
        lines += [
            f"Test set: {test_set.get('sequences')} sequences, {test_set.get('frames')} frames "
            f"({test_set.get('vimeo_clips')} Vimeo-90k test clips, "
            f"{test_set.get('yuv_sequences')} YUV sequences), centre-cropped to multiples of "
            f"{test_set.get('crop_multiple')} px; GOP {gop} (capped at each sequence's "
            "length). Rates are real bitstream sizes, I-frames included.",
            "",
        ]
    lines += [f"> **Note.** {n}" for n in notes]
    if notes:
        lines.append("")

    by_method = curves(points)
    anchors = sorted(anchors, key=lambda a: a != reference)
    present = {m: _metric_present(points, m) for m in bd_metrics}
    measured = [key for key in present.values() if key]
    tables: dict[str, dict[str, dict[str, float | str]]] = {}
    lines += ["## BD-rate against each anchor", ""]
    if reference not in by_method:
        lines += [
            f"n/a against {reference}: no {reference} points (run `evaluate_baselines` with a "
            f"{reference} entry in `evaluate.baselines`).",
            "",
        ]
    for anchor in anchors if measured else []:
        try:
            tables[anchor] = bd_rates(points, anchor, metrics=measured)
            lines.append(bd_rate_table(points, anchor, metrics=measured))
        except BDRateError as exc:
            lines += [f"n/a against {anchor}: {exc}", ""]
    for metric, key in present.items():
        if key is None:
            why = _WHY_ABSENT.get(metric, "not in `evaluate.metrics`")
            lines.append(
                f"- BD-rate in {_METRIC_NAMES.get(metric, metric)}: n/a: not measured, {why}."
            )
    lines += [
        "",
        'Cells read "n/a" where a curve has fewer than 2 points, is not monotonic, or the '
        "curves share no quality range. Negative: fewer bits than the reference at equal "
        "quality. These are BD-rates of points pooled over all sequences; the field's "
        "convention, one BD-rate per sequence averaged per class, follows.",
        "",
    ]
    per_class: ClassBDRates = {}
    if anchors and measured:
        lines += ["## BD-rate per class (per sequence, then the mean)", ""]
        try:
            seq_points, groups = sequence_points(
                [evaluation_dir(reports, name) for name in [*qualities, BASELINES]], measured
            )
            per_class = class_bd_rates(seq_points, groups, anchors, measured)
            lines += [class_bd_table(per_class, anchor, measured) for anchor in anchors]
        except (EvaluationError, KeyError, ValueError) as exc:
            lines += [f"n/a: {exc}", ""]

    if reference in by_method:
        ref_rates = [p.bpp for p in by_method[reference]]
        lo, hi = min(ref_rates), max(ref_rates)
        outside = [
            f"{p.method} {p.point} ({p.bpp:.4f})"
            for name, pts in by_method.items()
            if name != reference
            for p in pts
            if not lo <= p.bpp <= hi
        ]
        lines += ["## Anchor coverage", "", f"{reference} spans {lo:.4f} to {hi:.4f} bpp."]
        if outside:
            lines.append(
                "Outside it (BD-rates cover only the overlap of two curves; give the anchor a "
                "`search` bpp range or more points in `evaluate.baselines` to cover these): "
                + ", ".join(outside)
                + "."
            )
        lines.append("")
    lines += anchor_points_lines(evaluation_dir(reports, BASELINES) / "sources.json")

    columns = [key for m in _REPORT_METRICS if (key := _metric_present(points, m))]
    lines += ["## Rate-distortion points", ""]
    lines.append("| method | point | bpp | " + " | ".join(columns) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(columns))
    for name, pts in by_method.items():
        for p in pts:
            cells = [_fmt(p.metrics.get(k, math.nan)) for k in columns]
            lines.append(f"| {name} | {p.point} | {p.bpp:.4f} | " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""]
    for plot in plots:
        rel = os.path.relpath(plot, summary_file.parent)
        lines.append(f"![{plot.stem}]({rel})")
    lines.append("")
    write_bytes_atomic(summary_file, "\n".join(lines).encode())
    files["summary"] = summary_file
    return ReportResult(
        points, plots, summary_file, files, notes, missing, anchors, tables, per_class
    )


def summary_metrics(report: ReportResult) -> dict[tuple[str, ...], float]:
    """The report as flat numbers for a run's metrics: ``(method, point, key) -> value`` for
    every RD point (``bpp`` and each metric) and ``("bd_rate", method, "vs_<anchor>", key)``
    for every BD-rate that could be computed. Keys are tuples of parts; the caller joins them
    into its store's metric names."""
    out: dict[tuple[str, ...], float] = {}
    for p in report.points:
        out[(p.method, p.point, "bpp")] = float(p.bpp)
        for key, value in p.metrics.items():
            if isinstance(value, int | float) and math.isfinite(value):
                out[(p.method, p.point, key)] = float(value)
    for anchor, table in report.bd_rates.items():
        for method, row in table.items():
            for key, value in row.items():
                if isinstance(value, float) and math.isfinite(value):
                    out[("bd_rate", method, f"vs_{anchor}", key)] = value
    for anchor, by_method in report.class_bd_rates.items():
        for method, per_group in by_method.items():
            for group, cells in per_group.items():
                for key, (mean, _) in cells.items():
                    out[("bd_rate_per_class", method, f"vs_{anchor}", group, key)] = mean
    return out
