"""Per-sequence BD-rates averaged per class, from the files the evaluate stages write."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.eval.bd_classes import class_bd_rates, class_bd_table, sequence_points

SIZE = 64  # 64x64 frames
PSNRS = [28.0, 31.0, 34.0]


def _write(folder: Path, rows: list[dict[str, object]], sequences: list[dict[str, object]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sources.json").write_text(json.dumps({"sequences": sequences}))
    with (folder / "frames.csv").open("w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["method", "point", "video", "frame", "bytes", "psnr_rgb"]
        )
        writer.writeheader()
        writer.writerows(rows)


def _rows(
    video: str, method: str, rates: list[float], points: list[str]
) -> list[dict[str, object]]:
    """Two frames per point, each at ``rate`` bpp and its PSNR."""
    return [
        {
            "method": method,
            "point": point,
            "video": video,
            "frame": frame,
            "bytes": rate * SIZE * SIZE / 8,
            "psnr_rgb": psnr,
        }
        for rate, psnr, point in zip(rates, PSNRS, points, strict=False)
        for frame in range(2)
    ]


def test_bd_rate_per_sequence_then_mean_per_class(tmp_path: Path) -> None:
    """PLVC saves half the anchor's bits on the low-rate class-A sequence and none on the
    class-B one, whose rates are 20x higher: per class -50 % and 0 %, over all -25 %. A
    BD-rate of pooled points would be dominated by the high-rate sequence."""
    sequences = [
        {"name": "a1", "source": "yuv", "group": "A", "height": SIZE, "width": SIZE},
        {"name": "b1", "source": "yuv", "group": "B", "height": SIZE, "width": SIZE},
        {"name": "vimeo/00001_0001", "source": "vimeo", "height": SIZE, "width": SIZE},
    ]
    low = [0.05, 0.1, 0.2]
    high = [20 * r for r in low]
    qualities = ["low", "medium", "high"]
    crfs = ["crf=1", "crf=2", "crf=3"]
    _write(
        tmp_path / "q",
        _rows("a1", "plvc_gan", [r / 2 for r in low], qualities)
        + _rows("b1", "plvc_gan", high, qualities)
        + _rows("vimeo/00001_0001", "plvc_gan", low, qualities),
        sequences,
    )
    _write(
        tmp_path / "baselines",
        _rows("a1", "x265", low, crfs)
        + _rows("b1", "x265", high, crfs)
        + _rows("vimeo/00001_0001", "x265", low[:1], crfs[:1]),  # one point only
        sequences,
    )
    points, groups = sequence_points(
        [tmp_path / "q", tmp_path / "baselines", tmp_path / "no"], ["psnr_rgb"]
    )
    assert groups == {"a1": "A", "b1": "B", "vimeo/00001_0001": "vimeo"}
    a1 = {p.point: p for p in points["a1"]["plvc_gan"]}
    assert a1["low"].bpp == pytest.approx(0.025) and a1["low"].metrics["psnr_rgb"] == 28.0

    rates = class_bd_rates(points, groups, ["x265"], ["psnr_rgb"])
    gan = rates["x265"]["plvc_gan"]
    assert gan["A"]["psnr_rgb"] == (pytest.approx(-50.0), 1)
    assert gan["B"]["psnr_rgb"] == (pytest.approx(0.0, abs=1e-6), 1)
    # the Vimeo clip's anchor has one point: no BD-rate, not counted
    assert "vimeo" not in gan
    assert gan["all"]["psnr_rgb"] == (pytest.approx(-25.0), 2)
    table = class_bd_table(rates, "x265", ["psnr_rgb"])
    assert "| plvc_gan | -50.0 % (1) | +0.0 % (1) | -25.0 % (2) |" in table
    assert table.index("A: psnr_rgb") < table.index("all: psnr_rgb")
    assert "n/a against x264" in class_bd_table(rates, "x264", ["psnr_rgb"])

    # an anchor's rows without sizes (a frames.csv from before sequence_bytes): no points
    rows = _rows("a1", "x265", low, crfs)
    for row in rows:
        row["bytes"] = ""
    _write(tmp_path / "baselines", rows, sequences)
    points, _ = sequence_points([tmp_path / "q", tmp_path / "baselines"], ["psnr_rgb"])
    assert "x265" not in points["a1"] and "plvc_gan" in points["a1"]
