"""BD-rate, RD plots, the BD table and the DVC plot files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.eval.metrics import RANDOM_SUFFIX
from pipeline.eval.rd import (
    BDRateError,
    RDPoint,
    bd_quality,
    bd_rate,
    bd_rate_table,
    plot_rd,
    plot_rd_all,
    read_points_json,
    write_frame_rows_csv,
    write_points,
)

RATES = [0.02, 0.05, 0.1, 0.2, 0.4]


def psnr_curve(rates: list[float]) -> list[float]:
    """A concave, realistic PSNR-rate curve."""
    return [30 + 4 * math.log2(r / 0.02) - 0.1 * math.log2(r / 0.02) ** 2 for r in rates]


def lpips_curve(rates: list[float]) -> list[float]:
    return [0.3 * (r / 0.02) ** -0.45 for r in rates]


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_bd_rate_of_a_curve_against_itself_is_zero(method: str) -> None:
    q = psnr_curve(RATES)
    assert bd_rate(RATES, q, RATES, q, method=method) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_half_the_bits_at_equal_quality_is_minus_50_percent(method: str) -> None:
    q = psnr_curve(RATES)
    half = [r / 2 for r in RATES]
    assert bd_rate(RATES, q, half, q, method=method) == pytest.approx(-50.0, abs=1e-6)
    assert bd_rate(half, q, RATES, q, method=method) == pytest.approx(100.0, abs=1e-6)
    # lower-is-better metrics keep the sign convention: fewer bits is negative
    lp = lpips_curve(RATES)
    assert bd_rate(RATES, lp, half, lp, higher_better=False, method=method) == pytest.approx(
        -50.0, abs=1e-6
    )


def test_better_lpips_at_the_same_rate_saves_bits() -> None:
    lp = lpips_curve(RATES)
    better = [v * 0.8 for v in lp]
    saving = bd_rate(RATES, lp, RATES, better, higher_better=False)
    assert saving < 0
    # treating LPIPS as higher-is-better would flip the sign: the direction matters
    with pytest.raises(BDRateError, match="monotonic"):
        bd_rate(RATES, lp, RATES, better, higher_better=True)


def test_bd_quality_of_a_shifted_curve() -> None:
    q = psnr_curve(RATES)
    assert bd_quality(RATES, q, RATES, [v + 1.0 for v in q]) == pytest.approx(1.0, abs=1e-9)
    lp = lpips_curve(RATES)
    lower = [v - 0.01 for v in lp]
    assert bd_quality(RATES, lp, RATES, lower, higher_better=False) == pytest.approx(0.01, abs=1e-9)


def test_bd_rate_refuses_what_it_cannot_measure() -> None:
    q = psnr_curve(RATES)
    with pytest.raises(BDRateError, match="not strictly monotonic"):
        bd_rate(RATES, q, RATES, [30, 33, 32, 35, 36])
    with pytest.raises(BDRateError, match="share no quality range"):
        bd_rate(RATES, q, RATES, [v + 50 for v in q])
    with pytest.raises(BDRateError, match=">= 4 points"):
        bd_rate(RATES[:3], q[:3], RATES[:3], q[:3], method="cubic")
    with pytest.raises(BDRateError, match="rates must be finite and > 0"):
        bd_rate([0.0, *RATES[1:]], q, RATES, q)
    with pytest.raises(BDRateError, match="quality must be finite"):
        bd_rate(RATES, [*q[:-1], math.inf], RATES, q)


def _points() -> list[RDPoint]:
    points = []
    for method, scale in (("x265", 1.0), ("x264", 1.4), ("plvc", 0.5)):
        rates = [r * scale for r in RATES]
        for r, p, lp in zip(rates, psnr_curve(RATES), lpips_curve(RATES), strict=True):
            metrics = {"psnr_rgb": p, "lpips": lp, "fid" + RANDOM_SUFFIX: 100 * lp}
            points.append(RDPoint(method, f"q{r:g}", r, metrics))
    # a folded FID curve for plvc: a GAN codec's FID need not be monotonic
    for i, p in enumerate(points):
        if p.method == "plvc" and i % 2:
            points[i] = RDPoint(
                p.method, p.point, p.bpp, {**p.metrics, "fid" + RANDOM_SUFFIX: 99.0}
            )
    return points


def test_bd_rate_table_in_markdown() -> None:
    table = bd_rate_table(_points(), reference="x265", metrics=("psnr_rgb", "lpips", "fid"))
    lines = table.splitlines()
    assert "x265" in lines[0]
    header = next(line for line in lines if line.startswith("| method"))
    assert f"BD-rate fid{RANDOM_SUFFIX}" in header  # a random-backbone column says so
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| x264")}
    rows.update({line.split("|")[1].strip(): line for line in lines if line.startswith("| plvc")})
    assert rows["x264"].count("+40.0 %") == 3
    plvc_cells = [c.strip() for c in rows["plvc"].split("|")[2:-1]]
    assert plvc_cells[:2] == ["-50.0 %", "-50.0 %"]
    assert plvc_cells[2].startswith("n/a")
    assert "| x265 |" not in table
    with pytest.raises(BDRateError, match="reference method 'hm'"):
        bd_rate_table(_points(), reference="hm")


def test_rd_plots_are_written(tmp_path: Path) -> None:
    written = plot_rd_all(
        _points(), tmp_path / "plots", metrics=("lpips", "fid", "kid", "psnr_rgb")
    )
    assert [p.name for p in written] == ["rd_lpips.png", "rd_fid.png", "rd_psnr_rgb.png"]
    for path in written:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    single = plot_rd(_points(), "psnr_rgb", tmp_path / "one.png", title="carphone")
    assert single.is_file()
    assert not list(tmp_path.glob(".*tmp*"))


def test_point_files_for_dvc_round_trip(tmp_path: Path) -> None:
    points = _points()
    points.append(RDPoint("lossless", "q", 8.0, {"psnr_rgb": math.inf, "lpips": 0.0}))
    written = write_points(points, tmp_path / "rd")
    text = written["json"].read_text()
    json.loads(text)  # strict JSON: no Infinity token
    assert "Infinity" not in text and '"inf"' in text
    back = read_points_json(written["json"])
    assert back == points
    with written["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(points) and rows[0]["method"] == "x265"
    assert float(rows[-1]["psnr_rgb"]) == math.inf
    with written["plvc"].open() as f:
        plvc_rows = list(csv.DictReader(f))
    assert [float(r["bpp"]) for r in plvc_rows] == sorted(r * 0.5 for r in RATES)


def test_frame_rows_csv_and_summary_points(tmp_path: Path) -> None:
    rows = [
        {"video": "a", "frame": 0, "psnr_rgb": math.inf, "tdiff_mae": math.nan},
        {"video": "a", "frame": 1, "psnr_rgb": 31.5, "tdiff_mae": 0.7, "ms_ssim_scales": 4},
    ]
    path = write_frame_rows_csv(rows, tmp_path / "frames.csv")
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert read[0]["psnr_rgb"] == "inf" and read[0]["tdiff_mae"] == ""
    assert read[1]["ms_ssim_scales"] == "4" and read[0]["ms_ssim_scales"] == ""
    summary = {"bpp": 0.1, "psnr_rgb": 31.0, "random_backbones": [], "ms_ssim_reduced_scales": True}
    point = RDPoint.from_summary("plvc", "low", summary)
    assert point.bpp == 0.1 and dict(point.metrics) == {"psnr_rgb": 31.0}
    assert np.isclose(RDPoint.from_summary("x", "p", {"psnr_rgb": 1.0}, bpp=0.2).bpp, 0.2)
