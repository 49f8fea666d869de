"""pipeline.data.download: resumable HTTP download, zip extraction, layout checks, prepare_raw."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

import pipeline.data.download as download_module
from pipeline.config import DownloadConfig, SampleConfig
from pipeline.data.download import copy_layout, extract_zip, prepare_raw
from pipeline.data.fetch import download_file
from pipeline.data.vimeo_layout import MANIFEST_NAME, DownloadError, validate_vimeo_layout

# larger than the 1 MiB read size, so an interruption keeps some bytes to resume from
PAYLOAD = np.random.default_rng(7).bytes(2_600_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
CUT_AT = 1_500_000


# --------------------------------------------------------------------------- HTTP server


@dataclass
class ServerState:
    """What the test server serves and how it misbehaves; ``requests`` logs what it was asked."""

    base_url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[dict[str, str | None]] = field(default_factory=list)
    #: next response: send this many body bytes, then drop the connection (once)
    cut_after: int | None = None
    #: next response: send this many body bytes, then stall for stall_s (once)
    stall_after: int | None = None
    stall_s: float = 2.0
    #: answer 200 with the whole file even to a Range request
    ignore_range: bool = False
    #: statuses to answer the next requests with, one each
    fail_statuses: list[int] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


class RangeHandler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        state = self.server.state
        state.requests.append({"path": self.path, "range": self.headers.get("Range")})
        if state.fail_statuses:
            self.send_error(state.fail_statuses.pop(0))
            return
        data = state.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start = 0
        requested = self.headers.get("Range")
        if requested and not state.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", requested)
            assert m, requested
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut, state.cut_after = state.cut_after, None
        stall, state.stall_after = state.stall_after, None
        if cut is not None or stall is not None:
            self.wfile.write(body[: cut if cut is not None else stall])
            self.wfile.flush()
            if stall is not None:
                time.sleep(state.stall_s)
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a stalled handler writes to a socket the client already closed


@pytest.fixture
def server() -> Iterator[ServerState]:
    httpd = _Server(("127.0.0.1", 0), RangeHandler)
    httpd.state = ServerState(base_url=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.state.files["data.bin"] = PAYLOAD
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield httpd.state
    finally:
        httpd.shutdown()
        httpd.server_close()


def fetch(state: ServerState, dest: Path, **kwargs: object) -> Path:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("backoff_s", 0.01)
    return download_file(state.url("data.bin"), dest, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- download_file


def test_download_resumes_after_interruption_with_range_request(
    server: ServerState, tmp_path: Path
) -> None:
    server.cut_after = CUT_AT
    dest = fetch(server, tmp_path / "data.bin", sha256=PAYLOAD_SHA, size_bytes=len(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 2
    assert server.requests[0]["range"] is None
    m = re.fullmatch(r"bytes=(\d+)-", server.requests[1]["range"] or "")
    assert m is not None, server.requests
    assert 0 < int(m.group(1)) <= CUT_AT
    assert not (tmp_path / "data.bin.part").exists()


def test_download_resumes_part_left_by_earlier_run(server: ServerState, tmp_path: Path) -> None:
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:1000])
    dest = fetch(server, tmp_path / "data.bin", sha256=PAYLOAD_SHA)
    # the hash covers the resumed prefix too: a wrong prefix would have failed the check
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == ["bytes=1000-"]


def test_download_server_ignoring_range_restarts_from_zero(
    server: ServerState, tmp_path: Path
) -> None:
    server.ignore_range = True
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:1000])
    dest = fetch(server, tmp_path / "data.bin", sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == ["bytes=1000-"]


def test_download_complete_part_answered_416_is_finished(
    server: ServerState, tmp_path: Path
) -> None:
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    dest = fetch(server, tmp_path / "data.bin", sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == [f"bytes={len(PAYLOAD)}-"]


def test_download_oversized_part_answered_416_starts_over(
    server: ServerState, tmp_path: Path
) -> None:
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD + b"junk")
    dest = fetch(server, tmp_path / "data.bin")
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == [f"bytes={len(PAYLOAD) + 4}-", None]


def test_download_checksum_mismatch_leaves_nothing_complete(
    server: ServerState, tmp_path: Path
) -> None:
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError, match=r"SHA-256 is [0-9a-f]{64}, expected 0{64}") as err:
        fetch(server, dest, sha256="0" * 64)
    assert server.url("data.bin") in str(err.value)
    assert not dest.exists()
    assert not (tmp_path / "data.bin.part").exists()
    assert (tmp_path / "data.bin.corrupt").read_bytes() == PAYLOAD
    # a re-run starts clean: a fresh request without Range
    fetch(server, dest, sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1]["range"] is None


def test_download_size_mismatch_is_refused(server: ServerState, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError, match=rf"{len(PAYLOAD)} bytes, expected {len(PAYLOAD) + 1}"):
        fetch(server, dest, size_bytes=len(PAYLOAD) + 1)
    assert not dest.exists()


def test_download_http_404_names_url_without_retrying(server: ServerState, tmp_path: Path) -> None:
    url = server.url("missing.zip")
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        download_file(url, tmp_path / "missing.zip", progress=False, backoff_s=0.01)
    assert url in str(err.value)
    assert len(server.requests) == 1
    assert not (tmp_path / "missing.zip").exists()


def test_download_retries_server_errors(server: ServerState, tmp_path: Path) -> None:
    server.fail_statuses = [503, 502]
    dest = fetch(server, tmp_path / "data.bin", sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 3


def test_download_gives_up_after_retries(server: ServerState, tmp_path: Path) -> None:
    server.fail_statuses = [503] * 10
    with pytest.raises(DownloadError, match=r"3 attempts in a row.*retries = 2.*HTTP 503"):
        fetch(server, tmp_path / "data.bin", retries=2)
    assert len(server.requests) == 3


def test_download_stalled_transfer_times_out_and_resumes(
    server: ServerState, tmp_path: Path
) -> None:
    server.stall_after = CUT_AT
    dest = fetch(server, tmp_path / "data.bin", sha256=PAYLOAD_SHA, timeout_s=0.3)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[1]["range"] is not None


def test_download_connection_refused_names_url(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data.bin"
    with pytest.raises(DownloadError, match="2 attempts") as err:
        download_file(url, tmp_path / "data.bin", retries=1, progress=False, backoff_s=0.01)
    assert url in str(err.value)


@pytest.mark.parametrize("url", ["not a url", "ftp://example.org/x.zip", "http:///x.zip"])
def test_download_rejects_non_http_urls(url: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="not an http"):
        download_file(url, tmp_path / "x.zip", progress=False)


def test_download_complete_file_is_skipped_without_request(
    server: ServerState, tmp_path: Path
) -> None:
    dest = tmp_path / "data.bin"
    dest.write_bytes(PAYLOAD)
    assert fetch(server, dest, sha256=PAYLOAD_SHA, size_bytes=len(PAYLOAD)) == dest
    assert server.requests == []


def test_download_existing_file_that_fails_check_is_moved_aside(
    server: ServerState, tmp_path: Path
) -> None:
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"stale")
    fetch(server, dest, sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD
    assert (tmp_path / "data.bin.corrupt").read_bytes() == b"stale"


# --------------------------------------------------------------------------- layout and zips

TRAIN = ["00001/0001", "00001/0002", "00002/0001"]
TEST = ["00003/0001"]


def _png(seed: int) -> bytes:
    frame = np.random.default_rng(seed).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    return cv2.imencode(".png", frame)[1].tobytes()


def vimeo_files(train: list[str] = TRAIN, test: list[str] = TEST) -> dict[str, bytes]:
    """Relative path -> bytes of a tiny Vimeo-90k folder (lists end in a blank line, as real)."""
    files = {
        f"sequences/{clip}/im{t}.png": _png(i * 7 + t)
        for i, clip in enumerate(train + test)
        for t in range(1, 8)
    }
    files["sep_trainlist.txt"] = ("\n".join(train) + "\n\n").encode()
    files["sep_testlist.txt"] = ("\n".join(test) + "\n").encode()
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def write_zip(path: Path, files: dict[str, bytes], top: str = "vimeo_septuplet/") -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        if top:
            zf.writestr(top, b"")
        for rel, data in files.items():
            zf.writestr(top + rel, data)
    return path


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_validate_layout_counts_and_ignores_blank_lines(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "v", vimeo_files())
    assert validate_vimeo_layout(root) == {"train": 3, "test": 1}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r / "sep_testlist.txt").unlink(), r"sep_testlist\.txt: missing"),
        (lambda r: (r / "sep_trainlist.txt").unlink(), r"sep_trainlist\.txt: missing"),
        (lambda r: (r / "sequences").rename(r / "seq"), r"sequences: missing"),
        (
            lambda r: (r / "sep_trainlist.txt").write_text("00001/0001\n1/2\n"),
            r"sep_trainlist\.txt:2: expected a clip id like 00001/0001, found '1/2'",
        ),
        (
            lambda r: (r / "sep_trainlist.txt").write_text("00001/0001\n00001/0001\n"),
            r"sep_trainlist\.txt:2: clip 00001/0001 is listed twice",
        ),
        (
            lambda r: (r / "sep_testlist.txt").write_text("00001/0002\n"),
            r"1 clip\(s\) are in both .* 00001/0002",
        ),
    ],
)
def test_validate_layout_names_what_is_wrong(damage, message: str, tmp_path: Path) -> None:
    root = write_tree(tmp_path / "v", vimeo_files())
    damage(root)
    with pytest.raises(DownloadError, match=message):
        validate_vimeo_layout(root)


@pytest.mark.parametrize("top", ["vimeo_septuplet/", ""])
def test_extract_zip_finds_vimeo_root(top: str, tmp_path: Path) -> None:
    files = vimeo_files()
    zip_path = write_zip(tmp_path / "v.zip", files, top=top)
    out = tmp_path / "raw" / "vimeo_septuplet"
    assert extract_zip(zip_path, out, progress=False) == out
    assert read_tree(out) == files
    assert validate_vimeo_layout(out) == {"train": 3, "test": 1}
    assert leftovers(out.parent) == []


def test_extract_zip_corrupt_file_names_it(tmp_path: Path) -> None:
    zip_path = tmp_path / "broken.zip"
    zip_path.write_bytes(write_zip(tmp_path / "v.zip", vimeo_files()).read_bytes()[:-300])
    out = tmp_path / "raw"
    with pytest.raises(DownloadError, match=r"broken\.zip: not a readable zip"):
        extract_zip(zip_path, out, progress=False)
    assert not out.exists()


def test_extract_zip_damaged_member_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    files = vimeo_files()
    zip_path = tmp_path / "v.zip"
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
    raw = bytearray(zip_path.read_bytes())
    target = files["sequences/00002/0001/im3.png"]
    at = bytes(raw).index(target) + len(target) // 2
    raw[at] ^= 0xFF
    zip_path.write_bytes(bytes(raw))
    out = tmp_path / "raw"
    with pytest.raises(DownloadError, match=r"v\.zip: member 'sequences/00002/0001/im3\.png'"):
        extract_zip(zip_path, out, progress=False)
    assert not out.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("evil", ["../evil.txt", "vimeo_septuplet/../../evil.txt", "/etc/evil"])
def test_extract_zip_refuses_paths_outside_target(evil: str, tmp_path: Path) -> None:
    zip_path = write_zip(tmp_path / "v.zip", vimeo_files())
    with zipfile.ZipFile(zip_path, "a") as zf:
        zf.writestr(zipfile.ZipInfo(evil), b"x")
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "raw"
    with pytest.raises(DownloadError, match=r"refusing 1 member\(s\)"):
        extract_zip(zip_path, out, progress=False)
    assert not out.exists()
    assert not (tmp_path / "evil.txt").exists()
    assert leftovers(tmp_path / "work") == []


def test_extract_zip_without_vimeo_layout_is_refused(tmp_path: Path) -> None:
    files = {k: v for k, v in vimeo_files().items() if k != "sep_trainlist.txt"}
    zip_path = write_zip(tmp_path / "v.zip", files)
    with pytest.raises(DownloadError, match=r"v\.zip: not a Vimeo-90k septuplet zip"):
        extract_zip(zip_path, tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


def test_copy_layout_hard_links_files(tmp_path: Path) -> None:
    files = vimeo_files()
    src = write_tree(tmp_path / "src", files)
    out = copy_layout(src, tmp_path / "raw", progress=False)
    assert read_tree(out) == files
    frame = "sequences/00001/0001/im1.png"
    assert (out / frame).stat().st_ino == (src / frame).stat().st_ino


def test_copy_layout_refuses_invalid_or_overlapping_source(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", vimeo_files())
    with pytest.raises(DownloadError, match="overlap"):
        copy_layout(src, src / "raw", progress=False)
    (src / "sep_testlist.txt").unlink()
    with pytest.raises(DownloadError, match=r"sep_testlist\.txt: missing"):
        copy_layout(src, tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


# --------------------------------------------------------------------------- prepare_raw


def _must_not_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("the raw folder was rebuilt although it was complete")


def _check_manifest(out: Path, manifest: dict, source: str) -> None:
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest
    assert manifest["source"] == source
    assert manifest["counts"] == validate_vimeo_layout(out)
    files = [p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
    assert manifest["file_count"] == len(files)
    assert manifest["total_bytes"] == sum(p.stat().st_size for p in files)
    assert manifest["created_at"].endswith("+00:00")


def test_prepare_raw_zip_writes_manifest_and_second_call_skips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zip_path = write_zip(tmp_path / "v.zip", vimeo_files())
    sha = hashlib.sha256(zip_path.read_bytes()).hexdigest()
    cfg = DownloadConfig(source="zip", zip_path=zip_path, sha256=sha)
    out = tmp_path / "raw"
    manifest = prepare_raw(cfg, out, tmp_path / "dl", progress=False)
    _check_manifest(out, manifest, "zip")
    assert manifest["counts"] == {"train": 3, "test": 1}
    assert manifest["file_count"] == 4 * 7 + 2
    assert manifest["zip_sha256"] == sha
    assert manifest["zip_size_bytes"] == zip_path.stat().st_size
    assert manifest["settings"]["zip_path"] == str(zip_path)

    monkeypatch.setattr(download_module, "extract_zip", _must_not_run)
    assert prepare_raw(cfg, out, tmp_path / "dl", progress=False) == manifest


def test_prepare_raw_zip_with_wrong_checksum_is_refused(tmp_path: Path) -> None:
    zip_path = write_zip(tmp_path / "v.zip", vimeo_files())
    cfg = DownloadConfig(source="zip", zip_path=zip_path, sha256="a" * 64)
    with pytest.raises(DownloadError, match=r"v\.zip: SHA-256 is .* expected a{64}"):
        prepare_raw(cfg, tmp_path / "raw", tmp_path / "dl", progress=False)
    assert not (tmp_path / "raw").exists()


def test_prepare_raw_folder_writes_manifest_and_second_call_skips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_tree(tmp_path / "src", vimeo_files())
    cfg = DownloadConfig(source="folder", folder=src)
    out = tmp_path / "raw"
    manifest = prepare_raw(cfg, out, tmp_path / "dl", progress=False)
    _check_manifest(out, manifest, "folder")
    assert manifest["zip_sha256"] is None and manifest["sample"] is None
    monkeypatch.setattr(download_module, "copy_layout", _must_not_run)
    assert prepare_raw(cfg, out, tmp_path / "dl", progress=False) == manifest


def test_prepare_raw_sample_writes_manifest_and_second_call_skips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.data.sample

    cfg = DownloadConfig(
        source="sample",
        sample=SampleConfig(videos=["carphone_pristine"], height=64, width=128, min_clips=1),
    )
    out = tmp_path / "raw"
    manifest = prepare_raw(cfg, out, tmp_path / "dl", progress=False)
    _check_manifest(out, manifest, "sample")
    assert manifest["counts"] == {"train": 21, "test": 6}
    assert manifest["sample"]["settings"] == cfg.sample.model_dump(mode="json")
    assert len(manifest["sample"]["clips"]) == 27
    monkeypatch.setattr(pipeline.data.sample, "build_sample", _must_not_run)
    assert prepare_raw(cfg, out, tmp_path / "dl", progress=False) == manifest


def test_prepare_raw_vimeo90k_downloads_then_extracts(server: ServerState, tmp_path: Path) -> None:
    files = vimeo_files()
    data = write_zip(tmp_path / "v.zip", files).read_bytes()
    server.files["dataset/vimeo_septuplet.zip"] = data
    sha = hashlib.sha256(data).hexdigest()
    cfg = DownloadConfig(
        source="vimeo90k",
        url=server.url("dataset/vimeo_septuplet.zip"),
        sha256=sha,
        size_bytes=len(data),
    )
    out, downloads = tmp_path / "raw", tmp_path / "dl"
    manifest = prepare_raw(cfg, out, downloads, progress=False)
    _check_manifest(out, manifest, "vimeo90k")
    assert read_tree(out) == files
    assert manifest["zip_sha256"] == sha
    # the zip stays in downloads_dir, so rebuilding the raw folder needs no new download
    assert (downloads / "vimeo_septuplet.zip").read_bytes() == data
    (out / MANIFEST_NAME).unlink()
    prepare_raw(cfg, out, downloads, progress=False)
    assert len(server.requests) == 1


def test_prepare_raw_redoes_folder_without_manifest(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", vimeo_files())
    out = tmp_path / "raw"
    write_tree(out, {"sequences/00009/0001/im1.png": b"half-written", "junk.txt": b"x"})
    (tmp_path / ".raw.tmp-stale").mkdir()  # left by a killed run
    manifest = prepare_raw(
        DownloadConfig(source="folder", folder=src), out, tmp_path / "dl", progress=False
    )
    _check_manifest(out, manifest, "folder")
    assert read_tree(out) == read_tree(src)
    assert leftovers(tmp_path) == []


def test_prepare_raw_rebuilds_when_settings_change(tmp_path: Path) -> None:
    src_a = write_tree(tmp_path / "a", vimeo_files())
    src_b = write_tree(tmp_path / "b", vimeo_files(train=["00005/0001"], test=["00006/0001"]))
    out = tmp_path / "raw"
    prepare_raw(DownloadConfig(source="folder", folder=src_a), out, tmp_path / "dl", progress=False)
    manifest = prepare_raw(
        DownloadConfig(source="folder", folder=src_b), out, tmp_path / "dl", progress=False
    )
    assert manifest["counts"] == {"train": 1, "test": 1}
    assert manifest["settings"]["folder"] == str(src_b)
    assert read_tree(out) == read_tree(src_b)


def test_prepare_raw_failed_rebuild_keeps_complete_folder(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", vimeo_files())
    out = tmp_path / "raw"
    before = prepare_raw(
        DownloadConfig(source="folder", folder=src), out, tmp_path / "dl", progress=False
    )
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DownloadError, match=r"bad\.zip: not a readable zip"):
        prepare_raw(
            DownloadConfig(source="zip", zip_path=bad_zip), out, tmp_path / "dl", progress=False
        )
    assert json.loads((out / MANIFEST_NAME).read_text()) == before
    assert read_tree(out) == read_tree(src)
    assert leftovers(tmp_path) == []


def test_prepare_raw_rebuilds_when_manifest_present_but_layout_broken(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", vimeo_files())
    out = tmp_path / "raw"
    cfg = DownloadConfig(source="folder", folder=src)
    prepare_raw(cfg, out, tmp_path / "dl", progress=False)
    (out / "sep_testlist.txt").unlink()
    prepare_raw(cfg, out, tmp_path / "dl", progress=False)
    assert validate_vimeo_layout(out) == {"train": 3, "test": 1}
