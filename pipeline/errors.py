"""The pipeline's error base: every failure a user can cause (a bad param, a missing file,
a corrupt clip, an unreachable server) raises a subclass, and ``run_stage`` reports any of
them in one line instead of a traceback. The codec's own errors derive from
:class:`plvc.errors.PLVCError` (``plvc`` must not import the pipeline)."""

from __future__ import annotations

__all__ = ["PipelineError"]


class PipelineError(RuntimeError):
    """Base class of every error the pipeline raises on bad input or environment."""
