"""Writing files and folders so that a reader never sees half of one.

Every stage writes through these: a temp file (or folder) beside the target, then one rename.
An interrupted stage leaves the previous output intact and, at worst, a ``.<name>.*.tmp`` file
(or ``.<name>.tmp-*`` folder) that the next run removes. ``plvc/`` keeps its own small copy
(``plvc.weights.atomic_path``) because the codec must not import the pipeline.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "TMP_SUFFIX",
    "atomic_path",
    "is_temp_name",
    "replace_dir",
    "write_bytes_atomic",
    "write_csv_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

#: every temp file or folder made here starts with "." and ends with this
TMP_SUFFIX = ".tmp"

T = TypeVar("T")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once, at import: os.umask can only be read by setting it, which would race with files
# other threads create meanwhile (the evaluation writes images from a thread pool)
_UMASK = _read_umask()


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of this module's temp files (left by an interrupted run)."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block ends cleanly, rename it to ``path``.

    For writers that take a path (Parquet, ``savefig``, ``torch.save``). On an exception the
    temp file is removed and ``path`` is untouched; a block that removes the temp file itself
    (it decided there is nothing to write) renames nothing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    # mkstemp makes the file private (0600); the output gets the permissions of any new file
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        if not tmp.exists():
            return
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` through a temp file and a rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path``, fsynced, through a rename."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), fsync=True)


def write_csv_atomic(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> None:
    """Rows as CSV (``columns`` in order, blanks where a row lacks one) via temp + rename."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def replace_dir(final: str | os.PathLike[str], build: Callable[[Path], T]) -> T:
    """Fill a new temp folder beside ``final`` with ``build(tmp)``, then swap it in.

    The old ``final`` (if any) is renamed aside first and restored if the swap fails, so a
    reader sees the old folder or the new one, never a mix. Returns what ``build`` returned.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    old = final.parent / f".{final.name}.old-{tag}"
    tmp.mkdir()
    try:
        value = build(tmp)
        if final.exists() or final.is_symlink():
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return value
