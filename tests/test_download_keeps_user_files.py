"""data.py download never deletes what the user has, and every cut-off download resumes.

A loopback HTTP server stands in for the host (responses without a size, stalls, redirect loops);
full disks are real tmpfs mounts in a private mount namespace, as in tests/test_signals.py.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_signals import needs_tmpfs, on_small_disk

from conftest import REPO, assert_one_line_error, make_dataset, run_cli, tree_bytes, write_image, zip_folder
from inat_classifier.cli import UserError
from inat_classifier.download import download_dataset
from inat_classifier.storage import HOST

URL_PATH = "/datasets/nature_12K.zip"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """inaturalist_12K/train|val/<class>/ in miniature, with an incompressible member spanning many reads."""
    base = tmp_path_factory.mktemp("zipsrc")
    make_dataset(base / "inaturalist_12K", ["ant", "bee"], n_train=2, n_val=1, size=16)
    (base / "inaturalist_12K" / "noise.bin").write_bytes(random.Random(0).randbytes(300_000))
    return base


@pytest.fixture
def served(source, http_server) -> bytes:
    http_server.files[URL_PATH] = zip_folder(source)
    return http_server.files[URL_PATH]


def temp_folders(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.glob(".extract-*"))


# ----------------------------------------------------------------------------- the user's files
def test_an_existing_dataset_folder_is_merged_and_the_users_files_stay(source, served, http_server, tmp_path):
    dest = tmp_path / "data"
    mine = {
        "inaturalist_12K/train/wasp/wasp_0.jpg": None,  # a class folder the user added
        "inaturalist_12K/notes.txt": b"my notes\n",
        "inaturalist_12K/train/ant/ant_000.png": (source / "inaturalist_12K/train/ant/ant_000.png").read_bytes(),
    }  # the last one: an earlier extraction by hand, identical to the archive's
    write_image(dest / "inaturalist_12K/train/wasp/wasp_0.jpg", (1, 2, 3))
    for rel, body in mine.items():
        if body is not None:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(body)
    before = tree_bytes(dest)
    download_dataset(dest, http_server.url(URL_PATH))
    after = tree_bytes(dest)
    assert {k: after[k] for k in before} == before  # every file of the user's, unchanged
    assert {k: after[k] for k in tree_bytes(source)} == tree_bytes(source)  # and the whole archive
    assert (dest / ".extracted").is_file() and temp_folders(dest) == []


@pytest.mark.parametrize("kind", ["different_file", "file_where_the_archive_has_a_folder"])
def test_something_in_the_way_is_refused_in_one_line_and_nothing_is_touched(served, http_server, tmp_path, kind):
    dest = tmp_path / "data"
    if kind == "different_file":
        in_the_way = dest / "inaturalist_12K/train/ant/ant_000.png"
    else:
        in_the_way = dest / "inaturalist_12K/val"
    in_the_way.parent.mkdir(parents=True)
    in_the_way.write_bytes(b"the user's own file")
    (dest / "inaturalist_12K/train/wasp").mkdir(parents=True)
    (dest / "inaturalist_12K/train/wasp/w.txt").write_text("kept")
    before = tree_bytes(dest)
    proc = run_cli("data.py", "download", "--dest", dest, "--url", http_server.url(URL_PATH), timeout=120)
    assert_one_line_error(proc, str(in_the_way), "in the way")
    assert {k: v for k, v in tree_bytes(dest).items() if k != "nature_12K.zip"} == before  # nothing merged in
    assert not (dest / ".extracted").exists() and temp_folders(dest) == []


def test_temp_folders_of_dead_extractions_are_removed_and_live_ones_kept(served, http_server, tmp_path):
    dest = tmp_path / "data"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        for name in (f".extract-{dead.pid}", f".extract-{HOST}-{dead.pid}", f".extract-{live.pid}"):
            (dest / name / "inaturalist_12K" / "train").mkdir(parents=True)  # as Ctrl-C or kill -9 left it
            (dest / name / "inaturalist_12K" / "train" / "half.jpg").write_bytes(b"\xff\xd8")
        download_dataset(dest, http_server.url(URL_PATH))
        assert temp_folders(dest) == [f".extract-{live.pid}"]  # another extraction still at work
    finally:
        live.kill()
        live.wait()
    assert not (dest / "inaturalist_12K" / "train" / "half.jpg").exists()


# ----------------------------------------------------------------------------- partial downloads
def test_a_cut_download_without_a_size_is_kept_and_resumed(source, served, http_server, tmp_path):
    http_server.no_length.add(URL_PATH)
    http_server.cut_first.add(URL_PATH)
    dest = tmp_path / "data"
    with pytest.raises(UserError, match="resume") as e:
        download_dataset(dest, http_server.url(URL_PATH))
    assert "\n" not in str(e.value)
    part = dest / "nature_12K.zip.part"
    assert part.read_bytes() == served[: len(served) // 2]
    assert not (dest / "nature_12K.zip").exists() and not (dest / "inaturalist_12K").exists()
    download_dataset(dest, http_server.url(URL_PATH))
    assert http_server.requests[-1]["range"] == f"bytes={len(served) // 2}-"
    assert (dest / "nature_12K.zip").read_bytes() == served and not part.exists()
    assert {k: v for k, v in tree_bytes(dest).items() if k.startswith("inaturalist_12K/")} == tree_bytes(source)


def test_a_page_without_a_size_that_is_no_zip_is_called_corrupt_on_the_next_run_not_resumed_forever(
    http_server, tmp_path
):
    http_server.files[URL_PATH] = b"<html>please log in to the network</html>"
    http_server.no_length.add(URL_PATH)
    http_server.ignore_range = True  # as a captive portal answers
    dest = tmp_path / "data"
    with pytest.raises(UserError, match="resume"):
        download_dataset(dest, http_server.url(URL_PATH))
    with pytest.raises(UserError, match="corrupt archive"):
        download_dataset(dest, http_server.url(URL_PATH))
    assert http_server.requests[-1]["range"] is not None


def test_a_stalled_download_keeps_what_arrived_and_resumes(served, http_server, tmp_path):
    http_server.stall_first.add(URL_PATH)
    dest = tmp_path / "data"
    with pytest.raises(UserError, match="resume"):
        download_dataset(dest, http_server.url(URL_PATH), stall_timeout=0.5)
    http_server.release.set()
    part = dest / "nature_12K.zip.part"
    assert part.read_bytes() == served[: len(served) // 2]  # every byte that came before the stall
    download_dataset(dest, http_server.url(URL_PATH))
    assert http_server.requests[-1]["range"] == f"bytes={len(served) // 2}-"
    assert (dest / "nature_12K.zip").read_bytes() == served


def test_a_redirect_loop_is_one_line(http_server, tmp_path):
    http_server.redirects["/loop.zip"] = "/loop.zip"
    proc = run_cli("data.py", "download", "--dest", tmp_path / "d", "--url", http_server.url("/loop.zip"), timeout=120)
    assert_one_line_error(proc, "download failed", "redirect", http_server.url("/loop.zip"))
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1, proc.stderr


# ----------------------------------------------------------------------------- full disks
@needs_tmpfs
@pytest.mark.parametrize("kind", ["size_known", "size_unknown", "extracting"])
def test_a_full_disk_names_the_folder_and_the_space(http_server, tmp_path, kind):
    if kind == "extracting":  # 8 MiB of zeros in a few KiB of zip: the download fits, its contents do not
        src = tmp_path / "src"
        (src / "inaturalist_12K").mkdir(parents=True)
        (src / "inaturalist_12K" / "zeros.bin").write_bytes(bytes(8 << 20))
        http_server.files[URL_PATH] = zip_folder(src)
    else:
        http_server.files[URL_PATH] = zip_folder_of_noise(tmp_path / "src", 3 << 20)
    if kind == "size_unknown":
        http_server.no_length.add(URL_PATH)
    dest = tmp_path / "small"
    done = on_small_disk(
        dest, 2, [sys.executable, REPO / "data.py", "download", "--dest", dest, "--url", http_server.url(URL_PATH)]
    )
    what = "for extracting nature_12K.zip" if kind == "extracting" else "for nature_12K.zip"
    line = assert_one_line_error(done, f"not enough disk space in {dest} {what}", "MiB", "free")
    assert "resume" not in line and done.returncode == 2


def zip_folder_of_noise(folder: Path, size: int) -> bytes:
    (folder / "inaturalist_12K").mkdir(parents=True)
    (folder / "inaturalist_12K" / "noise.bin").write_bytes(random.Random(1).randbytes(size))
    return zip_folder(folder)
