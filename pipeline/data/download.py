"""The ``download`` stage's work (:func:`prepare_raw`): raw Vimeo-90k septuplets in
``paths.raw`` from one of four sources (``download.source``): ``vimeo90k`` (HTTP download,
:mod:`pipeline.data.fetch`, then checked extraction), ``zip``, ``folder`` (hard-linked) or
``sample`` (:mod:`pipeline.data.sample`). A folder whose ``manifest.json`` records the same
settings is kept; anything else is rebuilt under a temp name. Layout and manifest fields:
``docs/data.md``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
import zlib
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from pipeline.config import DownloadConfig
from pipeline.data.fetch import CHUNK_BYTES, download_file, verify_file
from pipeline.data.vimeo_layout import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    DownloadError,
    find_vimeo_root,
    install_dir,
    read_manifest,
    remove_stale_temps,
    temp_dir_beside,
    tree_size,
    validate_vimeo_layout,
)
from pipeline.io import write_json_atomic

__all__ = [
    "copy_layout",
    "extract_zip",
    "log",
    "prepare_raw",
    "source_settings",
]


log = logging.getLogger(__name__)


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
                root = find_vimeo_root(tmp)
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
                    shutil.copyfileobj(src, dst, CHUNK_BYTES)
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
    remove_stale_temps(out_dir)

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
            problem = verify_file(zip_path, cfg.size_bytes, settings["sha256"], progress)
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
    file_count, total_bytes = tree_size(out_dir)
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
