"""The anchors' rate search: CRF/QP points whose rates span a bpp range."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.config import BaselineSpec
from pipeline.eval.baselines import BaselineConfig
from pipeline.eval.metrics import EvaluationError
from pipeline.eval.rate_search import RateSearch, search_rate_points
from pipeline.eval.testset import TestSequence


def _sequence(name: str, frames: int = 7) -> TestSequence:
    pixels = np.zeros((frames, 64, 64, 3), np.uint8)
    return TestSequence(name, "vimeo", pixels, 30.0, (64, 64), (0, 0, 64, 64))


class _Model:
    """A codec whose rate halves every 6 QP (as H.264-H.266 roughly do): bpp = 2^((20-v)/6)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int]] = []

    @staticmethod
    def bpp(value: float) -> float:
        return 2 ** ((20 - value) / 6)

    def __call__(self, frames: Any, config: BaselineConfig, value: float, **_: Any) -> Any:
        self.calls.append((value, config.gop_size))
        t, _, h, w = frames.shape
        return SimpleNamespace(bitstream=bytes(round(self.bpp(value) * t * h * w / 8)))


def test_points_span_the_range_and_the_ends_are_tight() -> None:
    model = _Model()
    config = BaselineConfig(codec="x265", points=(), search=RateSearch(0.03, 0.3, points=4))
    samples = [_sequence("a"), _sequence("b")]
    outcome = search_rate_points(samples, config, config.search, gop=4, encode=model)
    first, last = outcome.points[0], outcome.points[-1]
    # the last value at or above 0.3 bpp and the first at or below 0.03 bpp
    assert model.bpp(first) >= 0.3 > model.bpp(first + 1)
    assert model.bpp(last) <= 0.03 < model.bpp(last - 1)
    assert list(outcome.points) == sorted(outcome.points) and len(outcome.points) == 4
    assert outcome.covers
    assert outcome.reached == pytest.approx((model.bpp(first), model.bpp(last)), rel=1e-2)
    # bisection: a handful of probes, each coding every sample with its own GOP
    assert len(outcome.probes) <= 2 * math.ceil(math.log2(52)) + 2
    assert len(model.calls) == 2 * len(outcome.probes)
    assert {gop for _, gop in model.calls} == {4}
    assert outcome.describe()["sequences"] == ["a", "b"]


@pytest.mark.parametrize(("codec", "scale"), [("x264", (0, 51)), ("svtav1", (1, 63))])
def test_a_range_beyond_the_codecs_scale_is_flagged(codec: str, scale: tuple[int, int]) -> None:
    """The search stays on the codec's scale (SVT-AV1's CRF 0 is not its top quality)."""
    model = _Model()
    config = BaselineConfig(codec=codec, points=(), search=RateSearch(1e-4, 500.0))
    outcome = search_rate_points([_sequence("a")], config, config.search, gop=7, encode=model)
    assert (outcome.points[0], outcome.points[-1]) == scale
    assert min(outcome.probes) == scale[0]
    assert not outcome.covers and not outcome.describe()["covers_range"]


def test_external_codec_needs_its_value_range() -> None:
    config = BaselineConfig(
        codec="external",
        rate_control="qp",
        points=(),
        name="vtm",
        encode="true {input} {stream} {value}",
        decode="true {stream} {output}",
        search=RateSearch(0.03, 0.3),
    )
    with pytest.raises(EvaluationError, match="values: \\[low, high\\]"):
        search_rate_points([_sequence("a")], config, config.search, gop=4, encode=_Model())
    ranged = RateSearch(0.03, 0.3, values=(10, 40))
    outcome = search_rate_points([_sequence("a")], config, ranged, gop=4, encode=_Model())
    assert 10 <= outcome.points[0] < outcome.points[-1] <= 40


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"codec": "x264"}, "either 'points'"),
        ({"codec": "x264", "points": [30], "search": {"bpp": [0.1, 0.2]}}, "either 'points'"),
        ({"codec": "x264", "rate_control": "bpp", "search": {"bpp": [0.1, 0.2]}}, "crf or qp"),
        ({"codec": "x264", "search": {"bpp": [0.2, 0.1]}}, "low < high"),
        ({"codec": "x264", "search": {"bpp": [0.1, 0.2], "points": 1}}, "points"),
    ],
)
def test_bad_search_params_are_named(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        BaselineSpec.model_validate(entry)


def test_bad_search_values_are_refused() -> None:
    with pytest.raises(EvaluationError, match="0 < low < high"):
        RateSearch(0.3, 0.03)
    with pytest.raises(EvaluationError, match="points >= 2"):
        RateSearch(0.03, 0.3, points=1)
