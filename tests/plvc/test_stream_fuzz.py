"""Structure-aware fuzzing of the decoder: a real stream parsed with the project's reader, one
field changed, rewritten with fresh CRCs, decoded in a subprocess whose memory is measured.

Allowed outcomes: the project's own error (a :class:`plvc.errors.PLVCError`) or frames of the
declared count and size. Never another exception, a hang, or a peak resident size more than
:data:`MAX_GROWTH_MIB` above the process's peak before the first forged stream (imports, the
models and the real encode: ~1.3 GiB with torch and CompressAI loaded; decoding the 5-frame
150x100 stream adds almost nothing, a forged size that the decoder trusted would add GiBs).
The decoding runs under an address-space limit (:data:`ADDRESS_SPACE_HEADROOM_MIB` above the
set-up's), so such a blow-up is a MemoryError in one case, not an exhausted machine.
"""

from __future__ import annotations

import dataclasses
import json
import random
import resource
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CASES = 140
SEED = 2026
MAX_GROWTH_MIB = 256
#: address space the decoding may add to what the set-up mapped (threads' stacks, buffers)
ADDRESS_SPACE_HEADROOM_MIB = 2048

MUTATIONS = (
    "p_string_bytes",
    "p_string_length",
    "p_latent_size",
    "p_string_count",
    "intra_sizes",
    "intra_string_bytes",
    "intra_config",
    "intra_fingerprint",
    "header_size",
    "record_order",
)


def _mutate(
    kind: str, rng: random.Random, header: Any, records: list[Any]
) -> tuple[Any, list[Any]]:
    from plvc.bitstream import FrameRecord, FrameType, pack_fields, unpack_fields

    records = list(records)
    p_index = rng.choice([i for i, r in enumerate(records) if r.frame_type is FrameType.P])
    i_index = rng.choice([i for i, r in enumerate(records) if r.frame_type is FrameType.I])
    p, intra = records[p_index], records[i_index]
    if kind == "p_string_bytes":
        which = rng.randrange(len(p.strings))
        data = bytearray(p.strings[which])
        for _ in range(rng.randint(1, 8)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        strings = list(p.strings)
        strings[which] = bytes(data)
        records[p_index] = FrameRecord(p.frame_type, tuple(strings), p.shape)
    elif kind == "p_string_length":
        which = rng.randrange(len(p.strings))
        s = p.strings[which]
        new = s[: rng.randrange(len(s) + 1)] if rng.random() < 0.5 else s + rng.randbytes(64)
        strings = list(p.strings)
        strings[which] = new
        records[p_index] = FrameRecord(p.frame_type, tuple(strings), p.shape)
    elif kind == "p_latent_size":
        assert p.shape is not None
        shape = rng.choice(
            [
                (p.shape[0] + 1, p.shape[1]),
                (p.shape[0], max(1, p.shape[1] - 1)),
                (rng.randint(1, 4096), rng.randint(1, 4096)),
                (16384, 16384),
                (1, 1),
            ]
        )
        records[p_index] = FrameRecord(p.frame_type, p.strings, shape)
    elif kind == "p_string_count":
        strings = p.strings[:1] if rng.random() < 0.5 else (*p.strings, b"\x00" * 8)
        records[p_index] = FrameRecord(p.frame_type, tuple(strings), p.shape)
    elif kind == "intra_sizes":
        ints, strings = unpack_fields(intra.strings[0])
        pick = rng.randrange(len(ints))
        ints[pick] = rng.choice([0, 1, ints[pick] + 1, ints[pick] * 4, 16384, 2**20])
        records[i_index] = FrameRecord(intra.frame_type, (pack_fields(ints, strings),))
    elif kind == "intra_string_bytes":
        ints, strings = unpack_fields(intra.strings[0])
        which = rng.randrange(len(strings))
        data = bytearray(strings[which])
        for _ in range(rng.randint(1, 8)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        strings[which] = bytes(data)
        records[i_index] = FrameRecord(intra.frame_type, (pack_fields(ints, strings),))
    elif kind == "intra_config":
        config = dict(header.intra_config)
        change = rng.choice(
            [
                {"allow_random_init": True},
                {"quality": 99},
                {"architecture": "bmshj2018-nothing"},
                {"weights": "/nonexistent/intra.pt"},
                {"weights_sha256": "0" * 64},
                {"decode_threads": 4},
                {"unknown_key": 1},
            ]
        )
        config.update(change)
        header = dataclasses.replace(header, intra_config=config)
    elif kind == "intra_fingerprint":
        fingerprint = rng.choice([bytes(8), rng.randbytes(8)])
        header = dataclasses.replace(header, intra_fingerprint=fingerprint)
    elif kind == "header_size":
        factor = rng.choice([2, 4, 64])
        header = dataclasses.replace(
            header,
            width=min(16384, header.width * factor) if rng.random() < 0.5 else header.width,
            height=min(16384, header.height * factor),
        )
    else:
        raise ValueError(kind)
    return header, records


def _varint_size(value: int) -> int:
    return max(1, (int(value).bit_length() + 6) // 7)


def _reorder_records(rng: random.Random, data: bytes, records: list[Any]) -> bytes:
    """Reorder, drop or repeat whole records in the raw bytes (our writer refuses a record
    order the GOP does not allow; a forger does not use our writer), with a fresh CRC32."""
    import zlib

    from plvc.bitstream import FrameType, read_header

    _, start = read_header(data)
    spans, pos = [], start
    for record in records:  # the record layout of docs/bitstream.md
        size = 1 + sum(_varint_size(len(s)) + len(s) for s in record.strings)
        if record.frame_type is FrameType.P:
            size += sum(_varint_size(n) for n in record.shape)
        spans.append(data[pos : pos + size])
        pos += size
    assert pos == len(data) - 4, "record layout differs from docs/bitstream.md"
    change = rng.choice(["swap", "p_first", "drop", "repeat"])
    if change == "swap":
        a, b = rng.sample(range(len(spans)), 2)
        spans[a], spans[b] = spans[b], spans[a]
    elif change == "p_first":
        p = rng.choice([i for i, r in enumerate(records) if r.frame_type is FrameType.P])
        spans.insert(0, spans.pop(p))
    elif change == "drop":
        spans.pop(rng.randrange(len(spans)))
    else:
        at = rng.randrange(len(spans))
        spans.insert(at, spans[at])
    body = b"".join(spans)
    return data[:start] + body + zlib.crc32(body).to_bytes(4, "little")


def run_cases(folder: Path, cases: int, seed: int) -> dict[str, Any]:
    """Worker (run in a subprocess): encode a real clip, decode ``cases`` mutated streams."""
    import torch

    from plvc.bitstream import decode_container, encode_container
    from plvc.codec import decode_video, encode_video
    from plvc.errors import PLVCError
    from tests.plvc.conftest import read_frames, sample_video_path
    from tests.plvc.test_codec import make_codec_pair

    torch.set_num_threads(1)
    from plvc.weights import load_codec

    model, intra, weights = make_codec_pair(folder)
    bundle = load_codec(weights)  # what `plvc decode --weights` decodes with
    frames = read_frames(sample_video_path("carphone_pristine"), 5)[:, :, :100, :150]
    stream = encode_video(frames.contiguous(), model, intra, gop=3, quality="low").data
    header, records = decode_container(stream)
    baseline = _peak_rss_mib()
    _limit_address_space(ADDRESS_SPACE_HEADROOM_MIB)
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    failures = []
    for case in range(cases):
        kind = MUTATIONS[case % len(MUTATIONS)]
        if kind == "record_order":
            new_header, data = header, _reorder_records(rng, stream, records)
        else:
            new_header, new_records = _mutate(kind, rng, header, records)
            try:
                data = encode_container(new_header, new_records)
            except PLVCError:
                outcomes[f"{kind}: not writable"] += 1
                continue
        try:
            decoded = decode_video(data, bundle.model, intra=bundle.intra)
        except PLVCError as exc:
            if "alloc" in str(exc).lower():  # the address-space limit, wrapped by the decoder
                failures.append(f"case {case} {kind}: allocation refused: {exc}"[:300])
                continue
            outcomes[f"{kind}: {type(exc).__name__}"] += 1
            continue
        except Exception as exc:  # exactly what the fuzzing looks for
            failures.append(f"case {case} {kind}: {type(exc).__name__}: {exc}"[:300])
            continue
        expected = (new_header.frame_count, 3, new_header.height, new_header.width)
        if tuple(decoded.shape) == expected:
            outcomes[f"{kind}: decoded"] += 1
        else:
            failures.append(f"case {case} {kind}: decoded {tuple(decoded.shape)} != {expected}")
    return {
        "outcomes": dict(outcomes),
        "failures": failures,
        "baseline_peak_rss_mib": baseline,
        "peak_rss_mib": _peak_rss_mib(),
    }


def _limit_address_space(headroom_mib: int) -> None:
    """Cap this process's address space at its current size plus ``headroom_mib``: a decoder
    that trusted a forged size gets a MemoryError (a failed case), not the machine's memory."""
    if not hasattr(resource, "RLIMIT_AS"):  # pragma: no cover - not Linux
        return
    size_kib = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            size_kib = int(line.split()[1])
    if size_kib:
        limit = (size_kib // 1024 + headroom_mib) << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _peak_rss_mib() -> float:
    """This process's peak resident size. Linux's ``ru_maxrss`` survives ``execve``, so a
    subprocess of a large pytest process would report its parent's size; ``VmHWM`` belongs to
    the process's own address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_mutated_streams_give_frames_or_the_projects_error(tmp_path: Path) -> None:
    code = (
        "import json, sys; from pathlib import Path; "
        "from tests.plvc.test_stream_fuzz import run_cases; "
        f"print(json.dumps(run_cases(Path(sys.argv[1]), {CASES}, {SEED})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1, sort_keys=True))  # the outcomes per mutation, with -s
    assert report["failures"] == []
    assert sum(report["outcomes"].values()) == CASES
    growth = report["peak_rss_mib"] - report["baseline_peak_rss_mib"]
    assert growth < MAX_GROWTH_MIB, report
    # every kind of mutation was exercised, and some forged streams still decode (frames of
    # the declared size): the test sees both outcomes
    kinds = {key.split(":")[0] for key in report["outcomes"]}
    assert kinds == set(MUTATIONS)
    assert any(key.endswith("decoded") for key in report["outcomes"])


if __name__ == "__main__":  # pragma: no cover - manual run: python -m tests.plvc.test_stream_fuzz
    pytest.main([__file__, "-s", "-q"])
