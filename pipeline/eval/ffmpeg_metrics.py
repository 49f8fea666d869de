"""VMAF and XPSNR per frame through ffmpeg's ``libvmaf`` and ``xpsnr`` filters.

Both need no download: the ffmpeg of the imageio-ffmpeg wheel (9.0.2, found like the anchors'
by :func:`pipeline.eval.baselines.find_ffmpeg`) carries libvmaf with its built-in models and
the XPSNR filter. Frames go in as YUV 4:2:0 8-bit, converted from RGB by
:func:`pipeline.eval.baselines.yuv420_bytes` (the conversion the anchors are coded from), the
same way for the original and the decoded video.

* ``vmaf``: VMAF with the default model ``vmaf_v0.6.1``; ``vmaf_neg``: its "no enhancement
  gain" variant ``vmaf_v0.6.1neg``, which does not reward sharpening or contrast boosts (what a
  GAN decoder may add). Scores 0-100, one per frame; libvmaf runs with one thread (its scores
  do not depend on the thread count, the timing does).
* ``xpsnr``: the luma XPSNR of each frame (Helmrich et al., the ``xpsnr`` filter: PSNR weighted
  by the reference's local visual activity), in dB.

Sequence figures are the means of the per-frame scores, as for PSNR in
:mod:`pipeline.eval.metrics`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from torch import Tensor

from pipeline.eval.metrics import FFMPEG_METRICS, EvaluationError

__all__ = ["ffmpeg_filters", "ffmpeg_frame_metrics"]
_FILTER = {"vmaf": "libvmaf", "vmaf_neg": "libvmaf", "xpsnr": "xpsnr"}
_VMAF_MODELS = {"vmaf": "vmaf_v0.6.1", "vmaf_neg": "vmaf_v0.6.1neg"}
_XPSNR_LINE = re.compile(r"n:\s*(\d+)\s+XPSNR y:\s*(\S+)")


@functools.cache
def ffmpeg_filters(ffmpeg: Path) -> frozenset[str]:
    """Names of the filters ``ffmpeg`` was built with."""
    from pipeline.eval.baselines import ffmpeg_listing

    names = set()
    for line in ffmpeg_listing(ffmpeg, "-filters").splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.startswith(" ="):
            names.add(parts[1])
    return frozenset(names)


def _run(cmd: list[str], timeout_s: float, what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise EvaluationError(f"{what}: ffmpeg ran past {timeout_s:g} s") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise EvaluationError(f"{what}: ffmpeg exited {proc.returncode}: {err}")


def ffmpeg_frame_metrics(
    originals: Tensor,
    decoded: Tensor,
    metrics: Iterable[str],
    *,
    video: str = "video",
    ffmpeg: str | Path | None = None,
    matrix: Literal["bt601", "bt709"] = "bt601",
    timeout_s: float = 3600.0,
) -> dict[str, list[float]]:
    """Per-frame scores ``{metric: [frame 0, frame 1, ...]}`` of ``decoded`` against
    ``originals`` (both float ``[T, 3, H, W]`` in [0, 1], even H and W) for each of ``metrics``
    that is in :data:`FFMPEG_METRICS`."""
    from pipeline.eval.baselines import find_ffmpeg, yuv420_bytes

    wanted = [m for m in FFMPEG_METRICS if m in set(metrics)]
    if not wanted:
        return {}
    binary = find_ffmpeg(ffmpeg)
    missing = sorted({_FILTER[m] for m in wanted} - ffmpeg_filters(binary))
    if missing:
        raise EvaluationError(
            f"{binary} has no {', '.join(missing)} filter ({', '.join(wanted)}): set "
            "evaluate.ffmpeg to an ffmpeg built with them (the imageio-ffmpeg wheel's has both)"
        )
    t = int(originals.shape[0])
    ref, w, h = yuv420_bytes(originals, matrix)
    dist, _, _ = yuv420_bytes(decoded, matrix)
    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="plvc-vmaf-") as tmp:
        ref_path, dist_path = Path(tmp) / "ref.yuv", Path(tmp) / "dist.yuv"
        ref_path.write_bytes(ref)
        dist_path.write_bytes(dist)
        raw = ["-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{w}x{h}", "-r", "25"]
        # both filters take the distorted video first and the reference second
        inputs = [*raw, "-i", str(dist_path), *raw, "-i", str(ref_path)]
        head = [str(binary), "-hide_banner", "-nostdin", "-loglevel", "error"]
        vmaf = [m for m in wanted if m in _VMAF_MODELS]
        if vmaf:
            log = Path(tmp) / "vmaf.json"
            # ':' inside an option value is escaped twice: once for the filter's options, once
            # for the filtergraph around them
            models = "|".join(f"version={_VMAF_MODELS[m]}\\\\:name={m}" for m in vmaf)
            graph = f"[0:v][1:v]libvmaf=model={models}:log_fmt=json:log_path={log}:n_threads=1"
            _run([*head, *inputs, "-lavfi", graph, "-f", "null", "-"], timeout_s, f"{video}: VMAF")
            frames = json.loads(log.read_text())["frames"]
            if len(frames) != t:
                raise EvaluationError(f"{video}: VMAF scored {len(frames)} frames, expected {t}")
            for m in vmaf:
                out[m] = [float(f["metrics"][m]) for f in frames]
        if "xpsnr" in wanted:
            log = Path(tmp) / "xpsnr.log"
            graph = f"[0:v][1:v]xpsnr=stats_file={log}"
            _run([*head, *inputs, "-lavfi", graph, "-f", "null", "-"], timeout_s, f"{video}: XPSNR")
            scores = [_xpsnr_value(v) for _, v in _XPSNR_LINE.findall(log.read_text())]
            if len(scores) != t:
                raise EvaluationError(f"{video}: XPSNR scored {len(scores)} frames, expected {t}")
            out["xpsnr"] = scores
    return out


def _xpsnr_value(text: str) -> float:
    # identical frames: the filter writes "inf"
    value = float(text)
    return value if math.isfinite(value) else math.inf
