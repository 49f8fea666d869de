"""The codec's own error types: every failure a user can cause raises one of these."""

from __future__ import annotations

__all__ = ["BitstreamError", "IntraCodecError", "PLVCError", "VideoIOError", "WeightsError"]


class PLVCError(Exception):
    """Base class of every error the codec raises on bad input."""


class BitstreamError(PLVCError):
    """A bitstream is corrupt, truncated, foreign or of an unsupported version."""


class WeightsError(PLVCError):
    """A weights file is missing, unreadable or does not fit the model."""


class VideoIOError(PLVCError):
    """A video file cannot be read or written (format, size or frame-count problems)."""


class IntraCodecError(PLVCError):
    """An I-frame codec is unknown, unconfigured or fails to code a frame."""
