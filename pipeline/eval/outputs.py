"""The files of one evaluation (``reports/qualities/<q>/``, ``reports/baselines/``): metrics.json,
frames.csv, RD points, GOP profiles, sources.json and images; layout in ``docs/evaluation.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.eval.measure import EvaluationResult, is_metric_key
from pipeline.eval.metrics import EvaluationError, json_safe
from pipeline.eval.rd import (
    write_frame_rows_csv,
    write_points,
)
from pipeline.io import write_bytes_atomic

__all__ = [
    "BASELINES",
    "clear_folder",
    "evaluation_dir",
    "gop_profile",
    "safe_name",
    "write_evaluation",
    "write_png",
]


#: the anchors' evaluation, beside the qualities' (``evaluate_baselines``)
BASELINES = "baselines"


def evaluation_dir(reports: str | os.PathLike[str], name: str) -> Path:
    """Where evaluation ``name`` (a quality, or :data:`BASELINES`) writes under ``paths.reports``:
    ``qualities/<q>/`` (one folder the report stage can depend on, whichever qualities
    ``params.qualities`` lists) or ``baselines/``."""
    base = Path(reports)
    return base / BASELINES if name == BASELINES else base / "qualities" / name


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise EvaluationError(f"{path}: OpenCV cannot encode this image as PNG")
    write_bytes_atomic(path, buf.tobytes())


def clear_folder(folder: Path, suffix: str) -> None:
    """Remove this stage's earlier files of one kind (a method may be gone since)."""
    if folder.is_dir():
        for f in folder.glob(f"*{suffix}"):
            f.unlink()


def gop_profile(rows: Sequence[Mapping[str, Any]], gops: Mapping[str, int]) -> list[dict[str, Any]]:
    """Means per position in the GOP (0: the I-frame) of ``bpp`` and every per-frame
    metric of ``rows`` (one method's), with the ``count`` of frames averaged."""
    sums: dict[int, dict[str, float]] = {}
    counts: dict[int, dict[str, int]] = {}
    for row in rows:
        pos = int(row["frame"]) % gops[row["video"]]
        for key, value in row.items():
            if key != "bpp" and not is_metric_key(key):
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
                continue
            sums.setdefault(pos, {})[key] = sums.get(pos, {}).get(key, 0.0) + value
            counts.setdefault(pos, {})[key] = counts.get(pos, {}).get(key, 0) + 1
        counts.setdefault(pos, {})
        counts[pos]["#"] = counts[pos].get("#", 0) + 1
    out = []
    for pos in sorted(counts):
        entry: dict[str, Any] = {"position": pos, "count": counts[pos]["#"]}
        for key, total in sums.get(pos, {}).items():
            entry[key] = total / counts[pos][key]
        out.append(entry)
    return out


def write_evaluation(result: EvaluationResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``result``'s files (module docstring) into ``out_dir``; returns them by name."""
    from pipeline.io import write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for sub, suffix in (("by_method", ".csv"), ("gop_profile", ".csv"), ("images", ".png")):
        clear_folder(out / sub, suffix)
    sources = {"sequences": result.sequences, "methods": result.sources}
    write_json_atomic(out / "sources.json", json_safe(sources))
    written["sources"] = out / "sources.json"
    written["frames"] = write_frame_rows_csv(result.rows, out / "frames.csv")
    for name, path in write_points(result.points, out).items():
        written[name if name in ("json", "csv") else f"by_method/{name}"] = path
    gops = {s["name"]: s["gop"] for s in result.sequences}
    series: dict[str, list[dict[str, Any]]] = {}
    single_point = len({(r["method"], r["point"]) for r in result.rows}) == len(
        {r["method"] for r in result.rows}
    )
    for row in result.rows:
        key = row["method"] if single_point else f"{row['method']}_{row['point']}"
        series.setdefault(key, []).append(row)
    for key, rows in series.items():
        path = out / "gop_profile" / f"{safe_name(key)}.csv"
        written[f"gop_profile/{key}"] = write_frame_rows_csv(gop_profile(rows, gops), path)
    for name, image in result.images.items():
        path = out / "images" / f"{safe_name(name)}.png"
        write_png(path, image)
        written[f"images/{name}"] = path
    # last: its presence means the evaluation's files are complete
    write_json_atomic(out / "metrics.json", result.metrics_json())
    written["metrics"] = out / "metrics.json"
    return written
