"""GOP-parallel coding (:mod:`plvc.parallel`): the same bytes and frames as serial coding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plvc.codec import decode_video, encode_video
from plvc.determinism import CodingMode
from plvc.errors import PLVCError
from plvc.parallel import decode_video_parallel, encode_video_parallel, gop_spans

from .test_codec import make_codec_pair


def test_gop_spans() -> None:
    assert gop_spans(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert gop_spans(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert gop_spans(3, -1) == [(0, 3)]
    assert gop_spans(2, 1) == [(0, 1), (1, 2)]


def test_parallel_coding_gives_the_serial_bytes_and_frames(
    carphone: torch.Tensor, tmp_path: Path
) -> None:
    """Three GOPs over two worker processes: the stream is byte for byte the serial encoder's
    with the same thread count, and the parallel decode is the serial decode."""
    model, intra, _ = make_codec_pair(tmp_path)
    frames = carphone[:5, :, :64, :96].contiguous()
    mode = CodingMode(entropy_parameters="exact")
    serial = encode_video(
        frames, model, intra, gop=2, num_threads=1, mode=mode, return_reconstruction=True
    )
    parallel = encode_video_parallel(
        frames,
        model,
        intra,
        gop=2,
        workers=2,
        num_threads=1,
        mode=mode,
        return_reconstruction=True,
    )
    assert parallel.data == serial.data
    assert torch.equal(parallel.reconstruction, serial.reconstruction)
    assert [s.index for s in parallel.frame_stats] == [0, 1, 2, 3, 4]
    assert [s.frame_type for s in parallel.frame_stats] == ["I", "P", "I", "P", "I"]
    assert all(s.seconds is not None and s.seconds > 0 for s in parallel.frame_stats)

    decoded, seconds = decode_video_parallel(serial.data, model, intra, workers=2)
    assert torch.equal(decoded, decode_video(serial.data, model, intra=intra))
    assert len(seconds) == 5 and all(s > 0 for s in seconds)

    with pytest.raises(PLVCError, match="workers and num_threads must be >= 1"):
        encode_video_parallel(frames, model, intra, gop=2, workers=0)
