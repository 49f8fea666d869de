"""Resumable HTTP download with size and SHA-256 checks (:func:`download_file`): streams to
``<dest>.part``, resumes with a ``Range`` request, retries transient failures with backoff
(``Retry-After`` honoured), and moves a file that fails its check aside to ``<dest>.corrupt``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from tqdm import tqdm

from pipeline.data.vimeo_layout import DownloadError

__all__ = [
    "CHUNK_BYTES",
    "download_file",
    "hash_into",
    "sha256_file",
    "verify_file",
]

log = logging.getLogger(__name__)


CHUNK_BYTES = 1 << 20


_MAX_BACKOFF_S = 60.0


_MAX_RETRY_AFTER_S = 300.0


# statuses worth another try: the server or a proxy may recover
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


# errors from the network while reading a response body (not from writing the file)
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)


class _TransientError(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def sha256_file(path: Path, *, progress: bool = False) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB chunks."""
    path = Path(path)
    hasher = hashlib.sha256()
    hash_into(hasher, path, progress=progress, desc=f"hashing {path.name}")
    return hasher.hexdigest()


def hash_into(hasher: Any, path: Path, *, progress: bool, desc: str) -> int:
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
        while chunk := f.read(CHUNK_BYTES):
            hasher.update(chunk)
            done += len(chunk)
            bar.update(len(chunk))
    return done


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DownloadError(f"{url!r}: not an http(s) URL (download.url)")


def verify_file(
    path: Path, size_bytes: int | None, sha256: str | None, progress: bool
) -> str | None:
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
                self.offset = hash_into(
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
        chunks = resp.raw.stream(CHUNK_BYTES, decode_content=False)
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
        problem = verify_file(dest, size_bytes, expected_sha, progress)
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
