"""The I-frame Parquet files (format: ``docs/data.md``): schema, names, metadata and the
error their readers and writer raise.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

if TYPE_CHECKING:
    pass
import re
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    pass
from pipeline.data.clips import is_uri

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IFRAME_SCHEMA",
    "MANIFEST_NAME",
    "PART_RE",
    "PNG_COMPRESSION",
    "IFrameError",
    "file_metadata",
    "list_parts",
    "read_parquet_meta",
    "resolve_filesystem",
    "row_group_sizes",
]


FORMAT_NAME = "plvc-iframes"


FORMAT_VERSION = 1


MANIFEST_NAME = "manifest.json"


#: zlib level of the stored I-frame PNGs (lossless at any level; 3 balances size and time)
PNG_COMPRESSION = 3


IFRAME_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("iframe_png", pa.binary(), nullable=False),
        pa.field("bitstream", pa.binary(), nullable=False),
        pa.field("bits", pa.int64(), nullable=False),
        pa.field("psnr_rgb", pa.float32(), nullable=False),
    ],
    metadata={"plvc.format": FORMAT_NAME, "plvc.format_version": str(FORMAT_VERSION)},
)


PART_RE = re.compile(r"^part-\d{5,}\.parquet$")


class IFrameError(PipelineError):
    """I-frames are missing, stale, misaligned with the shards, or cannot be coded."""


def resolve_filesystem(
    path: str | os.PathLike[str], filesystem: pafs.FileSystem | None
) -> tuple[pafs.FileSystem, str]:
    text = os.fspath(path)
    if filesystem is not None:
        return filesystem, text
    if is_uri(text):
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), os.path.abspath(text)


def list_parts(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Finished ``part-*.parquet`` files of a folder (full paths), sorted; [] if absent."""
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(i.path for i in infos if i.is_file and PART_RE.match(i.base_name))


def file_metadata(meta: pq.FileMetaData) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (meta.metadata or {}).items()}


def read_parquet_meta(fs: pafs.FileSystem, path: str) -> pq.FileMetaData:
    with fs.open_input_file(path) as handle:
        return pq.ParquetFile(handle).metadata


def row_group_sizes(meta: pq.FileMetaData) -> list[int]:
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
