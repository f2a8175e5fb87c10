"""download_dataset against a loopback HTTP server: extract, no-op, resume, corrupt, zip slip."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

import data
from conftest import make_dataset, run_cli, tree_bytes, zip_folder
from inat_classifier.cli import UserError
from inat_classifier.download import download_dataset

URL_PATH = "/datasets/nature_12K.zip"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A small dataset laid out like the real zip: inaturalist_12K/train|val/<class>/."""
    base = tmp_path_factory.mktemp("zipsrc")
    make_dataset(base / "inaturalist_12K", ["ant", "bee"], n_train=3, n_val=2, size=16)
    # a bigger incompressible member so the body spans several reads
    (base / "inaturalist_12K" / "blob.bin").write_bytes(bytes(range(256)) * 2000)
    return base


def extracted(dest: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree_bytes(dest).items() if k.startswith("inaturalist_12K/")}


def leftovers(dest: Path) -> list[str]:
    """Anything in dest besides the archive and its .part file."""
    return sorted(p.name for p in dest.iterdir() if not p.name.startswith("nature_12K.zip"))


def test_download_extracts_and_second_call_is_a_no_op(source, http_server, tmp_path, capsys):
    http_server.files[URL_PATH] = zip_folder(source)
    dest = tmp_path / "data"
    assert download_dataset(dest, http_server.url(URL_PATH)) == dest
    assert extracted(dest) == tree_bytes(source)
    assert len(http_server.requests) == 1 and http_server.requests[0]["range"] is None
    assert not list(dest.glob(".extract-*")) and not list(dest.glob("*.part"))
    # the result is usable as a dataset
    assert data.discover(dest).classes == ["ant", "bee"]
    mtimes = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    capsys.readouterr()
    download_dataset(dest, http_server.url(URL_PATH))
    assert len(http_server.requests) == 1  # no second request
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == mtimes  # nothing rewritten
    assert "already" in capsys.readouterr().out


def test_cut_transfer_resumes_with_a_range_request(source, http_server, tmp_path):
    body = zip_folder(source)
    http_server.files[URL_PATH] = body
    http_server.cut_first.add(URL_PATH)
    dest = tmp_path / "data"
    with pytest.raises(UserError) as e:
        download_dataset(dest, http_server.url(URL_PATH))
    assert "resume" in str(e.value)
    part = dest / "nature_12K.zip.part"
    assert part.is_file() and 0 < part.stat().st_size < len(body)
    assert not (dest / "inaturalist_12K").exists() and not (dest / "nature_12K.zip").exists()
    have = part.stat().st_size

    download_dataset(dest, http_server.url(URL_PATH))
    assert len(http_server.requests) == 2
    assert http_server.requests[1]["range"] == f"bytes={have}-"
    assert (dest / "nature_12K.zip").read_bytes() == body
    assert not part.exists()
    assert extracted(dest) == tree_bytes(source)


def test_complete_part_file_is_finished_on_416(source, http_server, tmp_path):
    body = zip_folder(source)
    http_server.files[URL_PATH] = body
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "nature_12K.zip.part").write_bytes(body)  # killed after the last byte, before the rename
    download_dataset(dest, http_server.url(URL_PATH))
    assert http_server.requests[0]["range"] == f"bytes={len(body)}-"
    assert extracted(dest) == tree_bytes(source)


def test_server_ignoring_range_restarts_cleanly(source, http_server, tmp_path):
    body = zip_folder(source)
    http_server.files[URL_PATH] = body
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "nature_12K.zip.part").write_bytes(b"garbage that is not the start of the file")
    http_server.ignore_range = True
    download_dataset(dest, http_server.url(URL_PATH))
    assert (dest / "nature_12K.zip").read_bytes() == body
    assert extracted(dest) == tree_bytes(source)


def test_http_error_is_a_user_error(http_server, tmp_path):
    with pytest.raises(UserError, match="HTTP 404"):
        download_dataset(tmp_path / "d", http_server.url("/missing.zip"))


def test_unreachable_server_is_a_user_error(tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="download failed"):
        download_dataset(tmp_path / "d", f"http://127.0.0.1:{port}/x.zip")


def corrupt_crc_zip(source: Path, method: int) -> bytes:
    """A structurally valid zip whose first member's data is damaged."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        zf.write(source / "inaturalist_12K" / "blob.bin", "inaturalist_12K/blob.bin")
        zf.writestr("inaturalist_12K/readme.txt", "hello")
    raw = bytearray(buf.getvalue())
    start = 30 + len("inaturalist_12K/blob.bin")  # local header + name, no extra field
    for i in range(start + 100, start + 400):
        raw[i] ^= 0x5A
    return bytes(raw)


def bad_deflate_stream_zip() -> bytes:
    """A zip whose deflate stream itself is damaged: zlib fails before any CRC check."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("inaturalist_12K/a.txt", b"hello world " * 500)
    raw = bytearray(buf.getvalue())
    start = 30 + len("inaturalist_12K/a.txt")
    for i in range(start, start + 4):
        raw[i] ^= 0xFF
    return bytes(raw)


@pytest.mark.parametrize(
    "kind", ["not_a_zip", "truncated_zip", "bad_crc_stored", "bad_data_deflated", "bad_deflate_stream"]
)
def test_corrupt_archive_is_a_user_error_and_extracts_nothing(source, http_server, tmp_path, kind):
    good = zip_folder(source)
    body = {
        "not_a_zip": b"<html>captive portal</html>" * 100,
        "truncated_zip": good[: len(good) // 2],
        "bad_crc_stored": corrupt_crc_zip(source, zipfile.ZIP_STORED),
        "bad_data_deflated": corrupt_crc_zip(source, zipfile.ZIP_DEFLATED),
        "bad_deflate_stream": bad_deflate_stream_zip(),
    }[kind]
    http_server.files[URL_PATH] = body
    dest = tmp_path / "data"
    with pytest.raises(UserError) as e:
        download_dataset(dest, http_server.url(URL_PATH))
    assert "corrupt archive" in str(e.value) and "\n" not in str(e.value)
    assert leftovers(dest) == []  # no files, no temp folder, no .extracted marker


@pytest.mark.parametrize("entry", ["../evil.txt", "inaturalist_12K/../../evil.txt", "/tmp/evil_abs.txt"])
def test_zip_slip_entry_is_refused(http_server, tmp_path, entry):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("inaturalist_12K/train/a/ok.txt", "fine")
        zf.writestr(entry, "escaped")
    http_server.files[URL_PATH] = buf.getvalue()
    dest = tmp_path / "inner" / "data"
    with pytest.raises(UserError, match="refusing archive entry"):
        download_dataset(dest, http_server.url(URL_PATH))
    assert not (tmp_path / "inner" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert leftovers(dest) == []


def test_symlink_entry_is_refused(http_server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("inaturalist_12K/link")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    http_server.files[URL_PATH] = buf.getvalue()
    dest = tmp_path / "data"
    with pytest.raises(UserError, match="symbolic link"):
        download_dataset(dest, http_server.url(URL_PATH))
    assert leftovers(dest) == []


def test_ensure_data_downloads_only_when_asked(source, http_server, tmp_path):
    http_server.files[URL_PATH] = zip_folder(source)
    target = tmp_path / "data" / "inaturalist_12K"
    for download in ("no", "auto"):  # auto: a folder that is not the default one is never downloaded into
        with pytest.raises(UserError, match="download"):
            data.ensure_data(target, download=download, url=http_server.url(URL_PATH))
    assert http_server.requests == []
    assert data.ensure_data(target, download="yes", url=http_server.url(URL_PATH)) == target
    assert data.discover(target).classes == ["ant", "bee"]


def test_download_cli(source, http_server, tmp_path):
    http_server.files[URL_PATH] = zip_folder(source)
    dest = tmp_path / "cli"
    proc = run_cli("data.py", "download", "--dest", dest, "--url", http_server.url(URL_PATH), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert extracted(dest) == tree_bytes(source)
    assert f"done: {dest}" in proc.stdout
    again = run_cli("data.py", "download", "--dest", dest, "--url", http_server.url(URL_PATH), timeout=120)
    assert again.returncode == 0 and "already" in again.stdout
    assert len(http_server.requests) == 1
