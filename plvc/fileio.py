"""Writing files so that a reader never sees half of one: a temp sibling, then a rename.

The codec's own copy of the pipeline's ``pipeline.io`` (``plvc`` must not import the
pipeline): streams, weights files and decoded frames all go through here.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_torch_save", "atomic_write_bytes", "temp_sibling"]


def temp_sibling(target: Path) -> Path:
    """A fresh hidden name beside ``target`` (same filesystem, so it can be renamed to it)."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary sibling of ``path``, fsync it and rename it over ``path``."""
    target = Path(path)
    tmp = temp_sibling(target)
    try:
        with open(tmp, "xb") as f:  # "x": default permissions (umask), never clobbers
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
