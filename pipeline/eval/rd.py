"""Rate-distortion points, Bjøntegaard deltas, RD plots and DVC plot files.

An :class:`RDPoint` is one method at one rate point: its measured ``bpp`` and the
summary metrics of :mod:`pipeline.eval.metrics`. Curves are the points of one method.

BD-rate (Bjøntegaard, VCEG-M33 / VCEG-AL22): the average difference of log-rate between
two curves over the quality range they share, as a percentage,
``(exp(mean(log R_test - log R_ref)) - 1) x 100``; negative = the test method needs fewer
bits for the same quality. Log-rate is interpolated as a function of quality by

* ``"pchip"`` (default): piecewise cubic Hermite interpolation through the points
  (the form JVET/AOM common test conditions use; needs >= 2 points per curve), or
* ``"cubic"``: the original least-squares cubic polynomial (needs >= 4 points).

For metrics where lower is better (LPIPS, FID, KID, the temporal measures) the quality
axis is negated first, so the sign convention stays "negative = bit savings". Each
curve's quality must be strictly monotonic in rate (else :class:`BDRateError`: GAN-based
codecs' FID is not always monotonic, and a BD number over a folded curve means nothing).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.eval.metrics import RANDOM_SUFFIX, EvaluationError, from_json_safe, json_safe
from pipeline.io import atomic_path, write_text_atomic

__all__ = [
    "HIGHER_IS_BETTER",
    "PLOT_METRICS",
    "BDRateError",
    "RDPoint",
    "bd_quality",
    "bd_rate",
    "bd_rate_table",
    "bd_rates",
    "curves",
    "higher_is_better",
    "plot_rd",
    "plot_rd_all",
    "read_points_json",
    "write_frame_rows_csv",
    "write_points",
]

#: direction of every metric key :mod:`pipeline.eval.metrics` writes
HIGHER_IS_BETTER: dict[str, bool] = {
    "psnr_rgb": True,
    "psnr_y": True,
    "psnr_yuv": True,
    "ms_ssim": True,
    "lpips": False,
    "fid": False,
    "kid": False,
    "tdiff_mae": False,
    "tlp": False,
    "vmaf": True,
    "vmaf_neg": True,
    "xpsnr": True,
}
#: the paper's figures: perceptual (Fig. 5) and fidelity (Fig. 7) metrics, then the offline
#: perceptual ones of today's evaluations (VMAF, VMAF NEG, XPSNR)
PLOT_METRICS = ("lpips", "fid", "kid", "psnr_rgb", "ms_ssim", "vmaf", "vmaf_neg", "xpsnr")
_LABELS = {
    "psnr_rgb": "PSNR RGB (dB)",
    "psnr_y": "PSNR Y (dB)",
    "psnr_yuv": "PSNR YUV 6:1:1 (dB)",
    "ms_ssim": "MS-SSIM",
    "lpips": "LPIPS (AlexNet)",
    "fid": "FID",
    "kid": "KID",
    "tdiff_mae": "temporal difference MAE (8-bit)",
    "tlp": "tLP",
    "vmaf": "VMAF (v0.6.1)",
    "vmaf_neg": "VMAF NEG (v0.6.1neg)",
    "xpsnr": "XPSNR Y (dB)",
}


class BDRateError(EvaluationError, ValueError):
    """A BD number cannot be computed from these curves (too few points, no overlap, ...)."""


@dataclass(frozen=True)
class RDPoint:
    """One method at one rate point."""

    method: str
    #: the rate point's label: a quality name ("low") or an anchor setting ("crf=27")
    point: str
    bpp: float
    metrics: Mapping[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """Flat record: method, point, bpp, then every metric."""
        return {"method": self.method, "point": self.point, "bpp": self.bpp, **self.metrics}

    @classmethod
    def from_summary(
        cls, method: str, point: str, summary: Mapping[str, Any], bpp: float | None = None
    ) -> RDPoint:
        """A point from a :class:`pipeline.eval.metrics.MetricResult` summary (its numeric entries).

        ``bpp``: the measured rate; default ``summary["bpp"]`` (set when the videos' byte
        counts were given to the metric run).
        """
        rate = summary.get("bpp") if bpp is None else bpp
        if rate is None:
            raise EvaluationError(
                f"{method} {point}: no bpp (pass bpp= or give num_bytes to the metric run)"
            )
        metrics = {
            k: float(v)
            for k, v in summary.items()
            if k != "bpp" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        return cls(method=method, point=point, bpp=float(rate), metrics=metrics)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RDPoint:
        """Inverse of :meth:`row` (JSON-safe strings like ``"inf"`` become floats)."""
        row = from_json_safe(dict(row))
        metrics = {k: v for k, v in row.items() if k not in ("method", "point", "bpp")}
        return cls(
            method=str(row["method"]),
            point=str(row["point"]),
            bpp=float(row["bpp"]),
            metrics=metrics,
        )


def higher_is_better(metric: str) -> bool:
    """Direction of ``metric`` (a ``_random_init`` suffix is ignored); unknown -> error."""
    base = metric.removesuffix(RANDOM_SUFFIX)
    if base not in HIGHER_IS_BETTER:
        raise BDRateError(
            f"unknown direction for metric {metric!r}; known: {sorted(HIGHER_IS_BETTER)}"
        )
    return HIGHER_IS_BETTER[base]


def _curve(
    rates: Sequence[float], quality: Sequence[float], name: str, higher: bool
) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rates, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64)
    if r.shape != q.shape or r.ndim != 1:
        raise BDRateError(f"{name}: rates and quality must be 1-D of the same length")
    if not (np.all(np.isfinite(r)) and np.all(r > 0)):
        raise BDRateError(f"{name}: rates must be finite and > 0, got {r.tolist()}")
    if not np.all(np.isfinite(q)):
        raise BDRateError(f"{name}: quality must be finite, got {q.tolist()}")
    q = q if higher else -q
    order = np.argsort(r)
    r, q = r[order], q[order]
    if not np.all(np.diff(q) > 0):
        raise BDRateError(
            f"{name}: quality is not strictly monotonic in rate: {q.tolist()} at {r.tolist()}"
        )
    return np.log(r), q


def _mean_over(x: np.ndarray, y: np.ndarray, lo: float, hi: float, method: str, name: str) -> float:
    """Mean of y(x) over [lo, hi] where y is interpolated through (x, y)."""
    if method == "pchip":
        from scipy.interpolate import PchipInterpolator

        if x.size < 2:
            raise BDRateError(f"{name}: pchip BD needs >= 2 points, got {x.size}")
        integral = PchipInterpolator(x, y).integrate(lo, hi)
    elif method == "cubic":
        if x.size < 4:
            raise BDRateError(f"{name}: the cubic BD fit needs >= 4 points, got {x.size}")
        poly = np.polyint(np.polyfit(x, y, 3))
        integral = np.polyval(poly, hi) - np.polyval(poly, lo)
    else:
        raise BDRateError(f"unknown BD interpolation {method!r}; use 'pchip' or 'cubic'")
    return float(integral) / (hi - lo)


def bd_rate(
    ref_rates: Sequence[float],
    ref_quality: Sequence[float],
    test_rates: Sequence[float],
    test_quality: Sequence[float],
    *,
    higher_better: bool = True,
    method: Literal["pchip", "cubic"] = "pchip",
) -> float:
    """BD-rate of the test curve against the reference, in percent (negative: fewer bits)."""
    lr_ref, q_ref = _curve(ref_rates, ref_quality, "reference", higher_better)
    lr_test, q_test = _curve(test_rates, test_quality, "test", higher_better)
    lo, hi = max(q_ref[0], q_test[0]), min(q_ref[-1], q_test[-1])
    if not hi > lo:
        raise BDRateError(
            f"the curves share no quality range (reference {q_ref[0]:g}..{q_ref[-1]:g}, "
            f"test {q_test[0]:g}..{q_test[-1]:g})"
        )
    avg = _mean_over(q_test, lr_test, lo, hi, method, "test") - _mean_over(
        q_ref, lr_ref, lo, hi, method, "reference"
    )
    return (math.exp(avg) - 1.0) * 100.0


def bd_quality(
    ref_rates: Sequence[float],
    ref_quality: Sequence[float],
    test_rates: Sequence[float],
    test_quality: Sequence[float],
    *,
    higher_better: bool = True,
    method: Literal["pchip", "cubic"] = "pchip",
) -> float:
    """BD-quality (e.g. BD-PSNR): mean quality gain of the test curve at equal log-rate.

    Positive = better for every metric (for lower-is-better metrics it is the mean
    *reduction*, e.g. of LPIPS).
    """
    lr_ref, q_ref = _curve(ref_rates, ref_quality, "reference", higher_better)
    lr_test, q_test = _curve(test_rates, test_quality, "test", higher_better)
    lo, hi = max(lr_ref[0], lr_test[0]), min(lr_ref[-1], lr_test[-1])
    if not hi > lo:
        raise BDRateError("the curves share no rate range")
    return _mean_over(lr_test, q_test, lo, hi, method, "test") - _mean_over(
        lr_ref, q_ref, lo, hi, method, "reference"
    )


def curves(points: Iterable[RDPoint]) -> dict[str, list[RDPoint]]:
    """Points grouped by method, each sorted by bpp."""
    out: dict[str, list[RDPoint]] = {}
    for p in points:
        out.setdefault(p.method, []).append(p)
    return {m: sorted(ps, key=lambda p: p.bpp) for m, ps in out.items()}


def _metric_key(points: Sequence[RDPoint], metric: str) -> str | None:
    """The key that holds ``metric`` in these points (plain or random-suffixed)."""
    for key in (metric, metric + RANDOM_SUFFIX):
        if points and all(key in p.metrics for p in points):
            return key
    return None


def bd_rates(
    points: Iterable[RDPoint],
    reference: str,
    metrics: Sequence[str] = PLOT_METRICS,
    method: Literal["pchip", "cubic"] = "pchip",
) -> dict[str, dict[str, float | str]]:
    """Every method's BD-rate (%) against ``reference`` per metric key: ``{method: {key:
    value}}``, where a value that cannot be computed is the reason (a string)."""
    by_method = curves(points)
    if reference not in by_method:
        raise BDRateError(
            f"reference method {reference!r} has no points; methods: {sorted(by_method)}"
        )
    ref = by_method[reference]
    keys = [_metric_key(ref, m) or m for m in metrics]
    table: dict[str, dict[str, float | str]] = {}
    for name, pts in by_method.items():
        if name == reference:
            continue
        row: dict[str, float | str] = {}
        for key in keys:
            try:
                if _metric_key(ref, key) is None or _metric_key(pts, key) is None:
                    raise BDRateError("metric missing")
                row[key] = bd_rate(
                    [p.bpp for p in ref],
                    [p.metrics[key] for p in ref],
                    [p.bpp for p in pts],
                    [p.metrics[key] for p in pts],
                    higher_better=higher_is_better(key),
                    method=method,
                )
            except BDRateError as exc:
                row[key] = _short(exc)
        table[name] = row
    return table


def bd_rate_table(
    points: Iterable[RDPoint],
    reference: str,
    metrics: Sequence[str] = PLOT_METRICS,
    method: Literal["pchip", "cubic"] = "pchip",
) -> str:
    """Markdown table of every method's BD-rate against ``reference``, one column per metric.

    Cells that cannot be computed say why ("n/a: ..."); a column computed with a random
    backbone is headed as such.
    """
    table = bd_rates(points, reference, metrics, method)
    ref = curves(points)[reference]
    keys = [_metric_key(ref, m) or m for m in metrics]
    header = "| method | " + " | ".join(f"BD-rate {k}" for k in keys) + " |"
    lines = [
        f"BD-rate against **{reference}** ({method}; negative = fewer bits at equal quality)",
        "",
        header,
        "|---|" + "---:|" * len(keys),
    ]
    for name, row in table.items():
        cells = [
            f"{value:+.1f} %" if isinstance(value, float) else f"n/a: {value}"
            for value in (row[key] for key in keys)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _short(exc: Exception) -> str:
    text = str(exc).split(":")[0] if "monotonic" not in str(exc) else "not monotonic"
    return text.replace("|", "/")[:60]


# ---------------------------------------------------------------------------------------
# plots


def plot_rd(
    points: Iterable[RDPoint],
    metric: str,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """One PNG: ``metric`` against bpp, one line per method. Returns the path written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_method = curves(points)
    fig = Figure(figsize=(5.0, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = None
    for name, pts in by_method.items():
        key = _metric_key(pts, metric)
        if key is None:
            continue
        plotted = key
        ys = [p.metrics[key] for p in pts]
        ax.plot(
            [p.bpp for p in pts],
            [y if math.isfinite(y) else np.nan for y in ys],
            marker="o",
            label=name,
        )
    if plotted is None:
        raise EvaluationError(f"no method has metric {metric!r} to plot")
    base = plotted.removesuffix(RANDOM_SUFFIX)
    label = _LABELS.get(base, base)
    direction = "higher" if HIGHER_IS_BETTER.get(base, True) else "lower"
    heading = title or f"{label} vs rate"
    if plotted != base:
        heading += "\nRANDOM BACKBONE: numbers not comparable"
    ax.set_xlabel("bpp")
    ax.set_ylabel(f"{label} ({direction} is better)")
    ax.set_title(heading, color="red" if plotted != base else "black")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_rd_all(
    points: Iterable[RDPoint],
    out_dir: str | os.PathLike[str],
    metrics: Sequence[str] = PLOT_METRICS,
) -> list[Path]:
    """``rd_<metric>.png`` in ``out_dir`` for every metric some method has."""
    pts = list(points)
    written = []
    for metric in metrics:
        if any(_metric_key([p], metric) for p in pts):
            written.append(plot_rd(pts, metric, Path(out_dir) / f"rd_{metric}.png"))
    return written


# ---------------------------------------------------------------------------------------
# files (DVC plots / metrics)


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    import io

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # inf stays "inf" (what float() and pandas read back); NaN becomes an empty cell
        writer.writerow(
            {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        )
    return buf.getvalue()


def write_frame_rows_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Per-frame metric rows (:class:`~pipeline.eval.metrics.MetricResult`) as CSV (DVC plots)."""
    path = Path(path)
    write_text_atomic(path, _csv_text(rows))
    return path


def write_points(points: Iterable[RDPoint], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """RD points for DVC plots: ``points.json`` and ``points.csv`` (all methods), plus
    ``by_method/<method>.csv`` (one series per file, what a DVC ``plots`` entry with
    ``x: bpp`` and one ``y`` per file overlays on one chart)."""
    out = Path(out_dir)
    pts = list(points)
    rows = [p.row() for p in pts]
    written = {"json": out / "points.json", "csv": out / "points.csv"}
    write_text_atomic(written["json"], json.dumps(json_safe(rows), indent=2) + "\n")
    write_text_atomic(written["csv"], _csv_text(rows))
    for name, mpts in curves(pts).items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        written[name] = out / "by_method" / f"{safe}.csv"
        write_text_atomic(written[name], _csv_text([p.row() for p in mpts]))
    return written


def read_points_json(path: str | os.PathLike[str]) -> list[RDPoint]:
    """Points written by :func:`write_points` (``points.json``)."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{path}: cannot read RD points: {exc}") from exc
    if not isinstance(rows, list):
        raise EvaluationError(f"{path}: expected a JSON list of RD points")
    try:
        return [RDPoint.from_row(r) for r in rows]
    except (KeyError, TypeError, ValueError) as exc:
        raise EvaluationError(f"{path}: malformed RD point: {exc}") from exc
