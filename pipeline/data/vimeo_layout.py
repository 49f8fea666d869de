"""The Vimeo-90k septuplet layout on disk (``sequences/NNNNN/NNNN/im1..im7.png`` and the two
clip lists), its check, its ``manifest.json``, and building a folder of it under a temp name
that is renamed into place (layout and manifest: ``docs/data.md``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

__all__ = [
    "FRAMES_PER_CLIP",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "SEQUENCES",
    "SPLIT_LISTS",
    "TEST_LIST",
    "TRAIN_LIST",
    "DownloadError",
    "find_vimeo_root",
    "install_dir",
    "read_clip_list",
    "read_manifest",
    "remove_stale_temps",
    "temp_dir_beside",
    "tree_size",
    "validate_vimeo_layout",
]

log = logging.getLogger(__name__)


MANIFEST_NAME = "manifest.json"


MANIFEST_VERSION = 1


TRAIN_LIST = "sep_trainlist.txt"


TEST_LIST = "sep_testlist.txt"


SEQUENCES = "sequences"
#: frames of a septuplet (im1..im7)
FRAMES_PER_CLIP = 7
#: split name -> clip list file in the raw folder
SPLIT_LISTS: dict[str, str] = {"train": TRAIN_LIST, "test": TEST_LIST}


_CLIP_ID = re.compile(r"^\d{5}/\d{4}$")


class DownloadError(PipelineError):
    """The raw data cannot be fetched, verified, extracted or is not in Vimeo-90k layout."""


def read_clip_list(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise DownloadError(f"{path}: not a text file ({exc})") from exc
    except OSError as exc:
        raise DownloadError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    ids: list[str] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        clip = line.strip()
        if not clip:
            continue
        if not _CLIP_ID.match(clip):
            raise DownloadError(
                f"{path}:{lineno}: expected a clip id like 00001/0001, found {line[:80]!r}"
            )
        if clip in seen:
            raise DownloadError(f"{path}:{lineno}: clip {clip} is listed twice")
        seen.add(clip)
        ids.append(clip)
    return ids


def validate_vimeo_layout(root: str | Path) -> dict[str, int]:
    """Check ``root`` is a Vimeo-90k septuplet folder; return ``{"train": n, "test": n}``.

    Needs ``sequences/``, ``sep_trainlist.txt`` and ``sep_testlist.txt`` whose non-blank lines
    are distinct ``NNNNN/NNNN`` clip ids, no clip in both lists. Frames are not opened: the
    shard stage checks them and skips bad clips.
    """
    root = Path(root)
    if not root.is_dir():
        raise DownloadError(f"{root}: no such folder (expected a Vimeo-90k septuplet folder)")
    sequences = root / SEQUENCES
    if not sequences.is_dir():
        raise DownloadError(f"{sequences}: missing; a Vimeo-90k folder has sequences/NNNNN/NNNN/")
    lists = {}
    for split, name in (("train", TRAIN_LIST), ("test", TEST_LIST)):
        path = root / name
        if not path.is_file():
            raise DownloadError(
                f"{path}: missing; a Vimeo-90k folder lists its {split} clips there"
            )
        lists[split] = read_clip_list(path)
    both = set(lists["train"]) & set(lists["test"])
    if both:
        raise DownloadError(
            f"{root}: {len(both)} clip(s) are in both {TRAIN_LIST} and {TEST_LIST}, "
            f"e.g. {sorted(both)[0]}"
        )
    return {split: len(ids) for split, ids in lists.items()}


def temp_dir_beside(out_dir: Path) -> Path:
    """A new empty folder beside ``out_dir`` (same filesystem, so it can be renamed to it)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def install_dir(new: Path, out_dir: Path) -> None:
    """Rename the finished folder ``new`` to ``out_dir``, replacing what is there.

    A ``manifest.json`` inside ``new`` is dropped: :func:`prepare_raw` writes the manifest last.
    """
    # a manifest that came along (a copied or zipped raw folder) would mark it complete early
    (new / MANIFEST_NAME).unlink(missing_ok=True)
    if out_dir.exists() or out_dir.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "d")
        os.replace(new, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out_dir)


def remove_stale_temps(out_dir: Path) -> None:
    """Remove temp folders an interrupted run left beside ``out_dir``."""
    if not out_dir.parent.is_dir():
        return
    for prefix in (f".{out_dir.name}.tmp-", f".{out_dir.name}.old-"):
        for stale in out_dir.parent.glob(f"{prefix}*"):
            log.info("removing %s left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)


def find_vimeo_root(top: Path, *, max_depth: int = 3) -> Path:
    """The folder under ``top`` holding ``sequences/`` and ``sep_trainlist.txt``."""
    found: list[Path] = []
    level = [top]
    for _ in range(max_depth + 1):
        nxt = []
        for folder in level:
            if (folder / SEQUENCES).is_dir() and (folder / TRAIN_LIST).is_file():
                found.append(folder)
                continue
            nxt.extend(
                p
                for p in sorted(folder.iterdir())
                if p.is_dir() and p.name not in (SEQUENCES, "__MACOSX")
            )
        level = nxt
    if len(found) != 1:
        what = "no folder" if not found else f"{len(found)} folders"
        raise DownloadError(
            f"{what} with {SEQUENCES}/ and {TRAIN_LIST} found"
            + ("" if not found else f": {[str(p.relative_to(top)) for p in found]}")
        )
    return found[0]


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete raw folder, or None when there is none (or it is unreadable)."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def tree_size(root: Path) -> tuple[int, int]:
    files = size = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.path != str(root / MANIFEST_NAME):
                    files += 1
                    size += entry.stat().st_size
    return files, size
