"""Raw Vimeo-90k septuplets on disk: resumable download, checked extraction, the manifest.

:func:`prepare_raw` is what the ``download`` stage calls. It fills ``out_dir`` (``paths.raw``)
with the Vimeo-90k septuplet layout::

    out_dir/sequences/00001/0001/im1.png .. im7.png
    out_dir/sep_trainlist.txt            one ``NNNNN/NNNN`` clip id per line
    out_dir/sep_testlist.txt
    out_dir/manifest.json                written last: its presence marks the folder complete

from one of four sources (``download.source``): ``vimeo90k`` (HTTP download of ``url`` into
``downloads_dir``, then extraction), ``zip`` (a local zip), ``folder`` (an extracted folder,
hard-linked) or ``sample`` (real video cut into septuplets, :mod:`pipeline.data.sample`).

Every folder is built under a temporary name beside ``out_dir`` and renamed into place, and
``manifest.json`` is written after that rename, through a temp file and a rename of its own. A
folder without a manifest is therefore incomplete, and :func:`prepare_raw` rebuilds it; a folder
whose manifest records the same ``settings`` is complete and is kept as it is.

``manifest.json`` fields:

``format_version``
    Version of this manifest's layout (currently 1).
``source``
    ``"vimeo90k"``, ``"zip"``, ``"folder"`` or ``"sample"``.
``settings``
    Everything that decides the folder's content (the source, the URL or path as given in the
    params, the expected size and SHA-256, the sample settings). A later run with equal settings
    skips the work.
``counts``
    ``{"train": n, "test": n}``: lines of ``sep_trainlist.txt`` / ``sep_testlist.txt``.
``file_count``, ``total_bytes``
    Files under ``out_dir`` (the manifest excluded) and their total size.
``zip_sha256``
    SHA-256 (hex) of the zip the folder came from, when known: the verified
    ``download.sha256``; ``null`` when none was given or the source is not a zip.
``zip_size_bytes``
    Size of that zip in bytes, ``null`` when the source is not a zip.
``sample``
    For the ``sample`` source, what :func:`pipeline.data.sample.build_sample` returns: its settings,
    the frame count of each video and, per clip id, the video, the split and the source frame
    range the clip covers. ``null`` for the other sources.
``created_at``
    UTC time the folder was completed, ISO 8601.

Download integrity: :func:`download_file` streams to ``<dest>.part`` and resumes it with an
HTTP ``Range`` request. A download whose size or SHA-256 does not match is moved aside to
``<dest>.corrupt`` (one such file at most, replaced by the next failure) so that nothing at
``dest`` or ``.part`` looks complete, a re-run downloads afresh, and a user who finds the
*expected* value was the mistake can still check and keep those bytes instead of fetching
them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
import zlib
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from tqdm import tqdm

from pipeline.config import DownloadConfig
from pipeline.errors import PipelineError
from pipeline.io import write_json_atomic

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "DownloadError",
    "copy_layout",
    "download_file",
    "extract_zip",
    "install_dir",
    "prepare_raw",
    "read_manifest",
    "sha256_file",
    "source_settings",
    "temp_dir_beside",
    "validate_vimeo_layout",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
TRAIN_LIST = "sep_trainlist.txt"
TEST_LIST = "sep_testlist.txt"
SEQUENCES = "sequences"

_CHUNK_BYTES = 1 << 20
_MAX_BACKOFF_S = 60.0
_MAX_RETRY_AFTER_S = 300.0
# statuses worth another try: the server or a proxy may recover
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_CLIP_ID = re.compile(r"^\d{5}/\d{4}$")
# errors from the network while reading a response body (not from writing the file)
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)


class DownloadError(PipelineError):
    """The raw data cannot be fetched, verified, extracted or is not in Vimeo-90k layout."""


class _TransientError(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# --------------------------------------------------------------------------- download


def sha256_file(path: Path, *, progress: bool = False) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB chunks."""
    path = Path(path)
    hasher = hashlib.sha256()
    _hash_into(hasher, path, progress=progress, desc=f"hashing {path.name}")
    return hasher.hexdigest()


def _hash_into(hasher: Any, path: Path, *, progress: bool, desc: str) -> int:
    size = path.stat().st_size
    done = 0
    with (
        path.open("rb") as f,
        tqdm(
            total=size,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not progress,
        ) as bar,
    ):
        while chunk := f.read(_CHUNK_BYTES):
            hasher.update(chunk)
            done += len(chunk)
            bar.update(len(chunk))
    return done


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DownloadError(f"{url!r}: not an http(s) URL (download.url)")


def _verify(path: Path, size_bytes: int | None, sha256: str | None, progress: bool) -> str | None:
    """None when ``path`` matches the expected size and hash, else what differs."""
    size = path.stat().st_size
    if size_bytes is not None and size != size_bytes:
        return f"size is {size} bytes, expected {size_bytes}"
    if sha256 is not None:
        found = sha256_file(path, progress=progress)
        if found != sha256:
            return f"SHA-256 is {found}, expected {sha256}"
    return None


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/1000`` -> (100, 1000); ``bytes */1000`` -> (None, 1000)."""
    if not value:
        return None, None
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value)
    if m is None:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "")
    return min(float(value), _MAX_RETRY_AFTER_S) if value.strip().isdigit() else None


class _Transfer:
    """State of one file's download: the ``.part`` file, bytes so far and their running hash."""

    def __init__(self, url: str, part: Path, size_bytes: int | None, progress: bool) -> None:
        self.url = url
        self.part = part
        self.size_bytes = size_bytes
        self.hasher = hashlib.sha256()
        self.offset = 0
        #: bytes received by the current attempt
        self.received = 0
        self.total = size_bytes
        self.bar = tqdm(
            total=size_bytes,
            desc=part.name.removesuffix(".part"),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not progress,
        )
        if part.exists():
            have = part.stat().st_size
            if size_bytes is not None and have > size_bytes:
                log.warning(
                    "%s: %d bytes, more than expected %d: starting over", part, have, size_bytes
                )
                self.restart()
            else:
                # hash what is there once, so the finished file needs no second read
                self.offset = _hash_into(
                    self.hasher, part, progress=progress, desc=f"hashing {part.name}"
                )
                self.bar.update(self.offset)

    def restart(self) -> None:
        self.part.unlink(missing_ok=True)
        self.hasher = hashlib.sha256()
        self.offset = 0
        self.bar.reset(total=self.total)

    def complete(self) -> bool:
        return self.total is not None and self.offset == self.total

    def attempt(self, session: requests.Session, timeout_s: float) -> None:
        """One request; returns when the file is whole, raises :class:`_TransientError` if not."""
        # identity: Range offsets then count the bytes we store, not a decoded stream
        headers = {"Accept-Encoding": "identity"}
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        self.received = 0
        try:
            resp = session.get(
                self.url, headers=headers, stream=True, timeout=(timeout_s, timeout_s)
            )
        except requests.exceptions.InvalidURL as exc:
            raise DownloadError(f"{self.url}: invalid URL: {exc}") from exc
        except requests.exceptions.SSLError as exc:
            raise DownloadError(f"{self.url}: TLS failed: {exc}") from exc
        except _NETWORK_ERRORS as exc:
            raise _TransientError(f"request failed: {exc}") from exc
        except requests.RequestException as exc:
            raise DownloadError(f"{self.url}: request failed: {exc}") from exc
        with resp:
            self._handle(resp)

    def _handle(self, resp: requests.Response) -> None:
        status = resp.status_code
        if status == 416 and self.offset:
            _, total = _parse_content_range(resp.headers.get("Content-Range"))
            if total is not None and total == self.offset:
                self.total = total  # the .part already holds the whole file
                return
            log.warning(
                "%s: server refused to resume at byte %d (total %s): starting over",
                self.url,
                self.offset,
                total,
            )
            self.restart()
            raise _TransientError("range not satisfiable", retry_after_s=0.0)
        if status in _RETRY_STATUSES:
            raise _TransientError(f"HTTP {status} {resp.reason}", _retry_after(resp))
        if status >= 400:
            raise DownloadError(f"{self.url}: HTTP {status} {resp.reason}")
        if status not in (200, 206):
            raise DownloadError(f"{self.url}: unexpected HTTP {status} {resp.reason}, expected 200")
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise DownloadError(
                f"{self.url}: server sent Content-Encoding {encoding!r} although identity was "
                "asked for; cannot resume or verify such a transfer"
            )

        if status == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != self.offset:
                log.warning(
                    "%s: asked for bytes from %d, server sent from %s: starting over",
                    self.url,
                    self.offset,
                    start,
                )
                self.restart()
                raise _TransientError("partial content at the wrong offset", retry_after_s=0.0)
            self.total = total
        else:
            if self.offset:
                log.warning("%s: server ignored the Range request: starting from byte 0", self.url)
                self.restart()
            length = resp.headers.get("Content-Length")
            self.total = int(length) if length and length.isdigit() else None
        if (
            self.total is not None
            and self.size_bytes is not None
            and (self.total != self.size_bytes)
        ):
            raise DownloadError(
                f"{self.url}: server reports {self.total} bytes, expected {self.size_bytes} "
                "(download.size_bytes)"
            )
        self.bar.reset(total=self.total)
        self.bar.update(self.offset)
        self._stream(resp)

    def _stream(self, resp: requests.Response) -> None:
        chunks = resp.raw.stream(_CHUNK_BYTES, decode_content=False)
        with self.part.open("ab") as f:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                except _NETWORK_ERRORS as exc:
                    raise _TransientError(f"connection lost at byte {self.offset}: {exc}") from exc
                f.write(chunk)
                self.hasher.update(chunk)
                self.offset += len(chunk)
                self.received += len(chunk)
                self.bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        if self.total is not None and self.offset < self.total:
            raise _TransientError(f"connection closed at byte {self.offset} of {self.total}")
        if self.total is None:
            self.total = self.offset


def download_file(
    url: str,
    dest: str | Path,
    *,
    size_bytes: int | None = None,
    sha256: str | None = None,
    timeout_s: float = 60.0,
    retries: int = 5,
    progress: bool = True,
    backoff_s: float = 1.0,
) -> Path:
    """Download ``url`` to ``dest``, resuming an interrupted transfer; return ``dest``.

    Bytes go to ``<dest>.part``; a later call resumes it with ``Range: bytes=N-`` (a server that
    ignores the range and answers 200 is read from byte 0 again). Connection errors, timeouts
    (``timeout_s`` for connecting and between reads) and HTTP 408/429/5xx are retried up to
    ``retries`` times in a row with exponential backoff from ``backoff_s``; an attempt that
    received bytes resets that count. The SHA-256 is computed while streaming (the existing
    ``.part`` first). On a size or checksum mismatch the bytes are moved to ``<dest>.corrupt`` and
    :class:`DownloadError` is raised. Only a verified file is renamed to ``dest``; a ``dest`` that
    already exists and verifies is returned without any request, one that does not verify is
    moved to ``<dest>.corrupt`` and downloaded again.
    """
    _check_url(url)
    dest = Path(dest)
    expected_sha = sha256.lower() if sha256 else None
    part = dest.with_name(dest.name + ".part")
    corrupt = dest.with_name(dest.name + ".corrupt")

    if dest.exists():
        problem = _verify(dest, size_bytes, expected_sha, progress)
        if problem is None:
            log.info("%s: already downloaded and verified", dest)
            return dest
        log.warning(
            "%s exists but its %s: moving it to %s and downloading again", dest, problem, corrupt
        )
        os.replace(dest, corrupt)
    dest.parent.mkdir(parents=True, exist_ok=True)

    transfer = _Transfer(url, part, size_bytes, progress)
    failures = 0
    try:
        with requests.Session() as session:
            while not transfer.complete():
                try:
                    transfer.attempt(session, timeout_s)
                except _TransientError as exc:
                    failures = 1 if transfer.received else failures + 1
                    if failures > retries:
                        raise DownloadError(
                            f"{url}: download failed after {failures} attempts in a row "
                            f"(download.retries = {retries}): {exc}; {part} keeps "
                            f"{transfer.offset} bytes and a re-run resumes from there"
                        ) from exc
                    wait = exc.retry_after_s
                    if wait is None:
                        wait = min(backoff_s * 2 ** (failures - 1), _MAX_BACKOFF_S)
                    log.warning("%s: %s; retry %d/%d in %.1f s", url, exc, failures, retries, wait)
                    time.sleep(wait)
    finally:
        transfer.bar.close()

    part.touch()  # an empty file never opened one
    problem = None
    if size_bytes is not None and transfer.offset != size_bytes:
        problem = f"size is {transfer.offset} bytes, expected {size_bytes} (download.size_bytes)"
    elif expected_sha is not None and transfer.hasher.hexdigest() != expected_sha:
        problem = (
            f"SHA-256 is {transfer.hasher.hexdigest()}, expected {expected_sha} (download.sha256)"
        )
    if problem is not None:
        os.replace(part, corrupt)
        raise DownloadError(
            f"{url}: downloaded file's {problem}. The bytes were moved to {corrupt}: delete it, "
            f"or if the expected value is wrong, check it and rename it to {dest}. "
            "A re-run downloads afresh."
        )
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------- layout


def _read_clip_list(path: Path) -> list[str]:
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
        lists[split] = _read_clip_list(path)
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


def _remove_stale_temps(out_dir: Path) -> None:
    """Remove temp folders an interrupted run left beside ``out_dir``."""
    if not out_dir.parent.is_dir():
        return
    for prefix in (f".{out_dir.name}.tmp-", f".{out_dir.name}.old-"):
        for stale in out_dir.parent.glob(f"{prefix}*"):
            log.info("removing %s left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _find_vimeo_root(top: Path, *, max_depth: int = 3) -> Path:
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


def _unsafe_member(name: str) -> bool:
    posix = name.replace("\\", "/")
    return (
        posix.startswith("/")
        or re.match(r"^[A-Za-z]:", posix) is not None
        or ".." in PurePosixPath(posix).parts
    )


def extract_zip(zip_path: str | Path, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Extract a Vimeo-90k zip to ``out_dir`` (replacing it only once complete); return it.

    Members with absolute paths or ``..`` are refused before anything is written. The zip is
    extracted into a temp folder beside ``out_dir``; the Vimeo root inside (the folder holding
    ``sequences/`` and ``sep_trainlist.txt``, ``vimeo_septuplet/`` in the official zip) is
    validated with :func:`validate_vimeo_layout` and renamed to ``out_dir``.
    """
    zip_path, out_dir = Path(zip_path), Path(out_dir)
    if not zip_path.is_file():
        raise DownloadError(f"{zip_path}: no such zip file")
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{zip_path}: not a readable zip file ({exc})") from exc
    except OSError as exc:
        raise DownloadError(f"{zip_path}: cannot open: {exc.strerror or exc}") from exc
    with zf:
        members = zf.infolist()
        unsafe = [m.filename for m in members if _unsafe_member(m.filename)]
        if unsafe:
            raise DownloadError(
                f"{zip_path}: refusing {len(unsafe)} member(s) with an absolute path or '..' "
                f"(they would land outside the target folder), e.g. {unsafe[0]!r}"
            )
        encrypted = [m.filename for m in members if m.flag_bits & 0x1]
        if encrypted:
            raise DownloadError(
                f"{zip_path}: {len(encrypted)} encrypted member(s), e.g. "
                f"{encrypted[0]!r}; an unencrypted zip is expected"
            )
        needed = sum(m.file_size for m in members)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out_dir.parent).free
        if needed > free:
            raise DownloadError(
                f"{zip_path}: extraction needs {needed / 1e9:.1f} GB, only {free / 1e9:.1f} GB "
                f"free under {out_dir.parent}"
            )
        tmp = temp_dir_beside(out_dir)
        try:
            _extract_members(zf, zip_path, members, tmp, needed, progress)
            try:
                root = _find_vimeo_root(tmp)
            except DownloadError as exc:
                top = sorted(p.name for p in tmp.iterdir())[:10]
                raise DownloadError(
                    f"{zip_path}: not a Vimeo-90k septuplet zip: {exc} (top-level entries: {top})"
                ) from None
            try:
                validate_vimeo_layout(root)
            except DownloadError as exc:
                raise DownloadError(f"{zip_path}: {exc}") from None
            install_dir(root, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _extract_members(
    zf: zipfile.ZipFile,
    zip_path: Path,
    members: list[zipfile.ZipInfo],
    target: Path,
    total_bytes: int,
    progress: bool,
) -> None:
    with tqdm(
        total=total_bytes,
        desc=f"extracting {zip_path.name}",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
    ) as bar:
        for member in members:
            path = target.joinpath(*PurePosixPath(member.filename.replace("\\", "/")).parts)
            if member.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(member) as src, path.open("wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK_BYTES)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
                raise DownloadError(
                    f"{zip_path}: member {member.filename!r} is corrupt or unsupported ({exc}); "
                    "the zip is damaged: delete it and download it again"
                ) from exc
            bar.update(member.file_size)


def _link_or_copy_tree(src: Path, dst: Path, progress: bool) -> None:
    """Hard-link every file of ``src`` into ``dst`` (copy where linking fails)."""
    can_link = True
    with tqdm(desc=f"linking {src.name}", unit=" files", disable=not progress) as bar:
        for folder, dirnames, filenames in os.walk(src, followlinks=True):
            rel = Path(folder).relative_to(src)
            dirnames.sort()
            (dst / rel).mkdir(parents=True, exist_ok=True)
            for name in sorted(filenames):
                if rel == Path(".") and name == MANIFEST_NAME:
                    continue
                s, d = Path(folder) / name, dst / rel / name
                if can_link:
                    try:
                        os.link(s, d)
                        bar.update(1)
                        continue
                    except OSError:
                        # other filesystem or no link support: it will fail for every file
                        can_link = False
                        log.info("cannot hard-link from %s: copying instead", src)
                shutil.copy2(s, d)
                bar.update(1)


def copy_layout(src: str | Path, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Bring an extracted Vimeo-90k folder to ``out_dir``: validate, hard-link, rename; return it.

    Files are hard-linked (copied across filesystems), so the copy costs no space. A hard link
    shares the file: do not edit the source's frames in place afterwards.
    """
    src, out_dir = Path(src), Path(out_dir)
    validate_vimeo_layout(src)
    s, o = src.resolve(), out_dir.resolve()
    if s == o or s in o.parents or o in s.parents:
        raise DownloadError(
            f"download.folder {src} and the output {out_dir} overlap; point download.folder "
            "at a folder outside the output"
        )
    tmp = temp_dir_beside(out_dir)
    try:
        _link_or_copy_tree(src, tmp, progress)
        validate_vimeo_layout(tmp)
        install_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------- prepare_raw


def source_settings(cfg: DownloadConfig) -> dict[str, Any]:
    """What decides the raw folder's content for ``cfg`` (recorded as the manifest's settings).

    Paths are kept as given in the params (not resolved), so the manifest is the same on every
    machine. Knobs that change how, not what, is fetched (timeouts, retries) are left out.
    """
    if cfg.source == "sample":
        from pipeline.data.sample import SAMPLE_FORMAT_VERSION

        return {
            "source": "sample",
            "sample": cfg.sample.model_dump(mode="json"),
            "sample_format": SAMPLE_FORMAT_VERSION,
        }
    if cfg.source == "folder":
        return {"source": "folder", "folder": str(cfg.folder)}
    common = {
        "size_bytes": cfg.size_bytes,
        "sha256": cfg.sha256.lower() if cfg.sha256 else None,
    }
    if cfg.source == "zip":
        return {"source": "zip", "zip_path": str(cfg.zip_path), **common}
    return {"source": "vimeo90k", "url": cfg.url, **common}


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete raw folder, or None when there is none (or it is unreadable)."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tree_size(root: Path) -> tuple[int, int]:
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


def _zip_name(url: str) -> str:
    name = PurePosixPath(urlsplit(url).path).name
    if not name:
        raise DownloadError(f"{url}: the URL names no file (download.url must end in a file name)")
    return name


def prepare_raw(
    cfg: DownloadConfig, out_dir: str | Path, downloads_dir: str | Path, *, progress: bool = True
) -> dict[str, Any]:
    """Fill ``out_dir`` with Vimeo-90k septuplets from ``cfg.source``; return its manifest.

    Skips the work when ``out_dir`` holds a manifest with the same :func:`source_settings` (and
    still validates); rebuilds a folder without a manifest. ``downloads_dir`` keeps the zip of
    the ``vimeo90k`` source (partial or whole) between runs.
    """
    out_dir, downloads_dir = Path(out_dir), Path(downloads_dir)
    settings = source_settings(cfg)
    _remove_stale_temps(out_dir)

    if out_dir.exists():
        existing = read_manifest(out_dir)
        if existing is not None and existing.get("settings") == settings:
            try:
                validate_vimeo_layout(out_dir)
            except DownloadError as exc:
                log.warning("%s: manifest present but %s: rebuilding", out_dir, exc)
            else:
                log.info("%s: complete for these settings (manifest.json): skipped", out_dir)
                return existing
        if existing is None:
            # no manifest: an interrupted run; nothing in it can be trusted
            log.warning(
                "%s has no %s (incomplete): removing it and starting again", out_dir, MANIFEST_NAME
            )
            if out_dir.is_dir() and not out_dir.is_symlink():
                shutil.rmtree(out_dir)
            else:
                out_dir.unlink()

    zip_sha256: str | None = None
    zip_size: int | None = None
    sample: dict[str, Any] | None = None
    if cfg.source == "sample":
        from pipeline.data.sample import build_sample

        sample = build_sample(out_dir, cfg.sample, progress=progress)
    elif cfg.source == "folder":
        assert cfg.folder is not None  # DownloadConfig guarantees it
        copy_layout(cfg.folder, out_dir, progress=progress)
    else:
        if cfg.source == "zip":
            assert cfg.zip_path is not None  # DownloadConfig guarantees it
            zip_path = Path(cfg.zip_path)
            if not zip_path.is_file():
                raise DownloadError(f"{zip_path}: no such zip file (download.zip_path)")
            problem = _verify(zip_path, cfg.size_bytes, settings["sha256"], progress)
            if problem is not None:
                raise DownloadError(f"{zip_path}: {problem} (download.size_bytes / sha256)")
        else:
            zip_path = download_file(
                cfg.url,
                downloads_dir / _zip_name(cfg.url),
                size_bytes=cfg.size_bytes,
                sha256=cfg.sha256,
                timeout_s=cfg.timeout_s,
                retries=cfg.retries,
                progress=progress,
            )
        zip_sha256 = settings["sha256"]
        zip_size = zip_path.stat().st_size
        extract_zip(zip_path, out_dir, progress=progress)

    counts = validate_vimeo_layout(out_dir)
    file_count, total_bytes = _tree_size(out_dir)
    manifest = {
        "format_version": MANIFEST_VERSION,
        "source": cfg.source,
        "settings": settings,
        "counts": counts,
        "file_count": file_count,
        "total_bytes": total_bytes,
        "zip_sha256": zip_sha256,
        "zip_size_bytes": zip_size,
        "sample": sample,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return manifest

