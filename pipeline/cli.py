"""What every stage CLI shares: the ``--params`` flag, clean errors, a metrics file."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import PipelineError
from plvc.errors import PLVCError

__all__ = ["run_stage", "stage_parser"]


def stage_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every stage takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file to read (default: params.yaml; the paper's setting: params-full.yaml)",
    )
    return parser


def run_stage(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's ``main``; a user error (a :class:`PipelineError` or the codec's
    :class:`PLVCError`) exits 1 with its message, not a traceback."""
    from pipeline.ray_cluster import skip_known_ray_noise

    skip_known_ray_noise()
    try:
        main(argv)
    except (PipelineError, PLVCError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: outputs written so far are kept; re-run to resume", file=sys.stderr)
        sys.exit(130)
