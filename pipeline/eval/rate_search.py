"""Rate points for an anchor from a short search, so that they span the learned codec's bpp
range (a BD-rate is only defined where both curves are).

A fixed CRF/QP list lands on different rates for every codec, preset and test set; on the
sample, x265 at CRF 30-46 and PLVC overlapped on a sliver of the bpp axis. The search codes the
first frames of a few sequences (one GOP each by default: I- and P-frames in the evaluation's
proportion) at a handful of CRF/QP values and keeps, per anchor:

* the largest value whose bpp is still at or above the range's top (bisection, since bpp
  falls as CRF/QP rises), and the smallest whose bpp is at or below its bottom;
* ``points`` values spread evenly between them: even steps in CRF/QP are roughly even steps
  in log-bpp (the rate halves every ~6 QP in H.264-H.266 and AV1), where BD-rate integrates.

The values are then used on every sequence, so a point is one CRF/QP across the test set, as
with a fixed list. What the search probed and chose goes into ``sources.json`` and the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.eval.metrics import EvaluationError

if TYPE_CHECKING:
    from pipeline.eval.baselines import BaselineConfig, BaselineResult
    from pipeline.eval.testset import TestSequence, TestSet

__all__ = [
    "OPEN_GOP_FRAMES",
    "RateSearch",
    "SearchOutcome",
    "resolve_rate_points",
    "search_rate_points",
]


#: frames searched per sequence by default when the GOP is the whole sequence (gop -1)
OPEN_GOP_FRAMES = 32


@dataclass(frozen=True)
class RateSearch:
    """``evaluate.baselines[i].search``: the bpp range the anchor's points must span."""

    bpp_low: float
    bpp_high: float
    #: rate points to spread over the range found
    points: int = 4
    #: frames coded from the start of each searched sequence (0: one GOP, or
    #: :data:`OPEN_GOP_FRAMES` for gop -1)
    frames: int = 0
    #: sequences searched, spread over the test set
    sequences: int = 4
    #: the CRF/QP interval searched (None: the codec's whole scale)
    values: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.bpp_low < self.bpp_high:
            raise EvaluationError(
                f"evaluate.baselines search: bpp must be [low, high] with 0 < low < high, "
                f"got [{self.bpp_low}, {self.bpp_high}]"
            )
        if self.points < 2 or self.sequences < 1 or self.frames < 0:
            raise EvaluationError(
                "evaluate.baselines search: points >= 2, sequences >= 1 and frames >= 0"
            )
        if self.values is not None and not 0 <= self.values[0] < self.values[1]:
            raise EvaluationError(
                f"evaluate.baselines search: values must be [low, high] with 0 <= low < high, "
                f"got {list(self.values)}"
            )


@dataclass
class SearchOutcome:
    """What one anchor's search chose and why (``sources.json`` ``rate_search``)."""

    points: tuple[float, ...]
    bpp_range: tuple[float, float]
    #: bpp of the chosen end points on the searched frames
    reached: tuple[float, float]
    #: value -> bpp of every probe, in the order probed
    probes: dict[int, float] = field(default_factory=dict)
    sequences: list[str] = field(default_factory=list)
    frames: int = 0

    @property
    def covers(self) -> bool:
        """The end points' rates enclose the whole range (else the codec's scale ran out)."""
        return self.reached[0] >= self.bpp_range[1] and self.reached[1] <= self.bpp_range[0]

    def describe(self) -> dict[str, Any]:
        return {
            "bpp_range": list(self.bpp_range),
            "reached_bpp": [round(b, 5) for b in self.reached],
            "covers_range": self.covers,
            "points": list(self.points),
            "probes": {str(v): round(b, 5) for v, b in self.probes.items()},
            "sequences": self.sequences,
            "frames_per_sequence": self.frames,
        }


Encoder = Callable[..., "BaselineResult"]


def search_rate_points(
    samples: Sequence[TestSequence],
    config: BaselineConfig,
    search: RateSearch,
    *,
    gop: int,
    encode: Encoder | None = None,
) -> SearchOutcome:
    """The CRF/QP values for ``config`` whose rates span ``search``'s bpp range on
    ``samples`` (the first frames of a few test sequences, coded with their own GOP)."""
    from pipeline.eval.baselines import CODECS, encode_decode

    if config.rate_control not in ("crf", "qp"):
        raise EvaluationError(
            f"evaluate.baselines ({config.method}): search picks CRF or QP values; "
            f"rate_control {config.rate_control!r} takes target bpp directly"
        )
    if search.values is not None:
        low, high = search.values
    elif config.external is None:
        low, high = CODECS[config.codec].min_value, CODECS[config.codec].max_value
    else:
        raise EvaluationError(
            f"evaluate.baselines ({config.method}): an external codec's search needs "
            "'values: [low, high]', the range of its own QP/CRF scale"
        )
    if not samples:
        raise EvaluationError(f"evaluate.baselines ({config.method}): nothing to search on")
    encode = encode or encode_decode
    probes: dict[int, float] = {}

    def bpp(value: int) -> float:
        if value not in probes:
            bits = pixels = 0
            for seq in samples:
                frames = torch.from_numpy(seq.frames).permute(0, 3, 1, 2).float() / 255
                per_sequence = dataclasses.replace(config, gop_size=seq.gop(gop), fps=seq.fps)
                result = encode(frames, per_sequence, float(value), matrix=seq.matrix)
                bits += 8 * len(result.bitstream)
                pixels += seq.num_frames * seq.height * seq.width
            probes[value] = bits / pixels
        return probes[value]

    # bpp falls as the value rises: the last value at or above the top, the first at or below
    # the bottom
    first = _last_true(low, high, lambda v: bpp(v) >= search.bpp_high)
    last = _first_true(first, high, lambda v: bpp(v) <= search.bpp_low)
    values = np.unique(np.rint(np.linspace(first, last, search.points)).astype(int))
    return SearchOutcome(
        points=tuple(float(v) for v in values),
        bpp_range=(search.bpp_low, search.bpp_high),
        reached=(bpp(first), bpp(last)),
        probes=probes,
        sequences=[s.name for s in samples],
        frames=max(s.num_frames for s in samples),
    )


def _last_true(low: int, high: int, predicate: Callable[[int], bool]) -> int:
    """The largest value in [low, high] where a (true-then-false) predicate holds; ``low``
    when it holds nowhere."""
    if predicate(high):
        return high
    return max(low, _first_true(low, high, lambda v: not predicate(v)) - 1)


def _first_true(low: int, high: int, predicate: Callable[[int], bool]) -> int:
    """The smallest value in [low, high] where a (false-then-true) predicate holds; ``high``
    when it holds nowhere."""
    if predicate(low):
        return low
    if not predicate(high):
        return high
    while high - low > 1:
        mid = (low + high) // 2
        if predicate(mid):
            high = mid
        else:
            low = mid
    return high


def resolve_rate_points(
    test_set: TestSet,
    configs: Sequence[BaselineConfig],
    *,
    gop: int,
    log: Callable[[str], None] = print,
) -> tuple[list[BaselineConfig], dict[str, SearchOutcome]]:
    """``configs`` with every ``search`` replaced by the points it found, and the searches'
    outcomes by method name. The searched frames are read once for all anchors."""
    searched = [c for c in configs if c.search is not None]
    if not searched:
        return list(configs), {}
    frames = max(c.search.frames for c in searched if c.search is not None)
    count = max(c.search.sequences for c in searched if c.search is not None)
    heads = test_set.heads(frames or (gop if gop > 0 else OPEN_GOP_FRAMES), count)
    resolved, outcomes = [], {}
    for cfg in configs:
        if cfg.search is None:
            resolved.append(cfg)
            continue
        n = cfg.search.frames or max(s.gop(gop) for s in heads)
        samples = [_head(s, n) for s in heads[: cfg.search.sequences]]
        outcome = search_rate_points(samples, cfg, cfg.search, gop=gop)
        outcomes[cfg.method] = outcome
        low, high = outcome.reached
        log(
            f"[rate search] {cfg.method}: {cfg.rate_control} {_values(outcome.points)} for "
            f"{outcome.bpp_range[0]:g}-{outcome.bpp_range[1]:g} bpp (reached {high:.4f}-"
            f"{low:.4f} on the first {n} frames of {len(samples)} sequences, "
            f"{len(outcome.probes)} probes)"
            + ("" if outcome.covers else "; the codec's scale does not cover the whole range")
        )
        resolved.append(dataclasses.replace(cfg, points=outcome.points))
    return resolved, outcomes


def _head(seq: TestSequence, frames: int) -> TestSequence:
    return dataclasses.replace(seq, frames=seq.frames[:frames])


def _values(points: Sequence[float]) -> str:
    return "/".join(f"{p:g}" for p in points)
