"""BD-rates the way the field reports them on test sets: one BD-rate per sequence, then the
mean per class (UVG, HEVC-B, ...) and over all sequences, not a BD-rate of points pooled
over every sequence (which weighs the long, high-rate sequences most).

Reads what ``evaluate@q`` and ``evaluate_baselines`` wrote: ``frames.csv`` (per-frame bytes
and metrics) and ``sources.json`` (each sequence's size and ``group``) of every folder.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.eval.metrics import EvaluationError
from pipeline.eval.rd import BDRateError, RDPoint, bd_rate, higher_is_better

__all__ = ["ClassBDRates", "class_bd_rates", "class_bd_table", "sequence_points"]

#: ``{anchor: {method: {group: {metric: mean BD-rate %}}}}`` plus the sequence counts used
ClassBDRates = dict[str, dict[str, dict[str, dict[str, tuple[float, int]]]]]


def _sequences(folder: Path) -> dict[str, dict[str, object]]:
    path = folder / "sources.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{path}: cannot read the sequences: {exc}") from exc
    return {str(s["name"]): s for s in doc.get("sequences", [])}


def sequence_points(
    folders: Sequence[str | os.PathLike[str]], metrics: Sequence[str]
) -> tuple[dict[str, dict[str, list[RDPoint]]], dict[str, str]]:
    """Per-sequence RD points from the folders' ``frames.csv``: ``({video: {method: points}},
    {video: group})``. A point's bpp is the sequence's bytes (``sequence_bytes``, else the sum
    of the frames' ``bytes``) x 8 over its pixels, each metric the mean over its frames; a
    group defaults to the sequence's source (``vimeo``, ``yuv``)."""
    sums: dict[tuple[str, str, str], dict[str, float]] = {}
    groups: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for folder in map(Path, folders):
        frames_csv = folder / "frames.csv"
        if not frames_csv.is_file():
            continue
        for name, seq in _sequences(folder).items():
            groups[name] = str(seq.get("group") or seq.get("source") or "all")
            sizes[name] = int(seq["height"]) * int(seq["width"])  # type: ignore[call-overload]
        with frames_csv.open(newline="") as f:
            for row in csv.DictReader(f):
                key = (row["video"], row["method"], row["point"])
                acc = sums.setdefault(key, {"bytes": 0.0, "frames": 0.0})
                # the sequence's stream size where written (anchors have no per-frame sizes)
                if row.get("sequence_bytes"):
                    acc["bytes"] = float(row["sequence_bytes"])
                elif row.get("bytes"):
                    acc["bytes"] += float(row["bytes"])
                else:  # an anchor's row of an older frames.csv: the size is unknown
                    acc["unknown"] = 1.0
                acc["frames"] += 1
                for metric in metrics:
                    value = row.get(metric)
                    if value not in (None, ""):
                        acc[metric] = acc.get(metric, 0.0) + float(value)  # type: ignore[arg-type]
                        acc[f"n_{metric}"] = acc.get(f"n_{metric}", 0.0) + 1
    points: dict[str, dict[str, list[RDPoint]]] = {}
    for (video, method, point), acc in sums.items():
        if acc.get("unknown"):
            continue
        if video not in sizes:
            raise EvaluationError(f"frames.csv names sequence {video!r}, no sources.json does")
        values = {
            m: acc[m] / acc[f"n_{m}"]
            for m in metrics
            if acc.get(f"n_{m}") and math.isfinite(acc[m] / acc[f"n_{m}"])
        }
        bpp = 8 * acc["bytes"] / (acc["frames"] * sizes[video])
        points.setdefault(video, {}).setdefault(method, []).append(
            RDPoint(method, point, bpp, values)
        )
    return points, groups


def class_bd_rates(
    points: dict[str, dict[str, list[RDPoint]]],
    groups: dict[str, str],
    anchors: Sequence[str],
    metrics: Sequence[str],
) -> ClassBDRates:
    """Mean over each group's sequences (and over all, group ``"all"``) of every method's
    per-sequence BD-rate against each anchor; a sequence whose BD-rate cannot be computed
    (too few points, no overlap) is left out of the mean and of the count."""
    per_sequence: dict[tuple[str, str, str, str], list[float]] = {}
    for video, by_method in points.items():
        for anchor in anchors:
            ref = by_method.get(anchor)
            if not ref:
                continue
            for method, pts in by_method.items():
                if method == anchor:
                    continue
                for metric in metrics:
                    if not all(metric in p.metrics for p in (*ref, *pts)):
                        continue
                    try:
                        value = bd_rate(
                            [p.bpp for p in ref],
                            [p.metrics[metric] for p in ref],
                            [p.bpp for p in pts],
                            [p.metrics[metric] for p in pts],
                            higher_better=higher_is_better(metric),
                        )
                    except BDRateError:
                        continue
                    for group in (groups.get(video, "all"), "all"):
                        per_sequence.setdefault((anchor, method, group, metric), []).append(value)
    out: ClassBDRates = {}
    for (anchor, method, group, metric), values in per_sequence.items():
        cell = (sum(values) / len(values), len(values))
        out.setdefault(anchor, {}).setdefault(method, {}).setdefault(group, {})[metric] = cell
    return out


def class_bd_table(rates: ClassBDRates, anchor: str, metrics: Sequence[str]) -> str:
    """Markdown: one row per method, one column per (class, metric) against ``anchor``."""
    by_method = rates.get(anchor, {})
    groups = sorted({g for per_group in by_method.values() for g in per_group}, key=_group_order)
    columns = [(g, m) for g in groups for m in metrics]
    if not columns:
        return f"n/a against {anchor}: no sequence has two or more points of both curves.\n"
    lines = [
        f"Mean of per-sequence BD-rates against **{anchor}** (sequences counted in brackets)",
        "",
        "| method | " + " | ".join(f"{g}: {m}" for g, m in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for method, per_group in by_method.items():
        cells = []
        for group, metric in columns:
            cell = per_group.get(group, {}).get(metric)
            cells.append(f"{cell[0]:+.1f} % ({cell[1]})" if cell else "n/a")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _group_order(group: str) -> tuple[bool, str]:
    return group == "all", group
