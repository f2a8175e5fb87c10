"""The first command a new user types on a fresh machine: the dataset arrives by itself (a loopback server stands in
for the download host), but only into the default folder, and offline it fails in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error, clean_env, make_dataset, zip_folder

URL_PATH = "/mirror/nature_12K.zip"
FAST = [
    "--epochs",
    "1",
    "--image_size",
    "32",
    "--conv_layers",
    "2",
    "--dense_neurons",
    "16",
    "--batch_size",
    "8",
    "--workers",
    "0",
    "--wandb",
    "disabled",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> bytes:
    """nature_12K.zip in miniature: inaturalist_12K/train|val/<class>/*.jpg."""
    base = tmp_path_factory.mktemp("zipsrc")
    make_dataset(base / "inaturalist_12K", ["Amphibia", "Fungi"], n_train=8, n_val=2, size=32)
    return zip_folder(base)


def first_command(cwd: Path, *extra: str, url: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python train_parta.py --filters 32 --activation relu` (+ small settings), run where the user is."""
    env = clean_env(**({"INAT12K_URL": url} if url else {}))
    cmd = [sys.executable, str(REPO / "train_parta.py"), "--filters", "32", "--activation", "relu", *FAST, *extra]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_first_run_downloads_extracts_and_trains(archive, http_server, tmp_path):
    http_server.files[URL_PATH] = archive
    proc = first_command(tmp_path, url=http_server.url(URL_PATH))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"downloading {http_server.url(URL_PATH)}" in proc.stdout
    assert (tmp_path / "data" / "inaturalist_12K" / "train" / "Fungi").is_dir()
    assert len(list((tmp_path / "runs").glob("*/best.pt"))) == 1
    assert len(http_server.requests) == 1
    again = first_command(tmp_path, url=http_server.url(URL_PATH))  # the second run reuses it
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(http_server.requests) == 1 and "downloading" not in again.stdout


def test_data_url_flag_and_no_download(archive, http_server, tmp_path):
    http_server.files[URL_PATH] = archive
    refused = first_command(tmp_path, "--download", "no", "--data_url", http_server.url(URL_PATH))
    assert_one_line_error(refused, "no dataset found")
    assert http_server.requests == []
    proc = first_command(tmp_path, "--data_url", http_server.url(URL_PATH))  # no environment variable needed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(http_server.requests) == 1


def test_a_typed_data_dir_that_is_missing_is_an_error_not_a_download(archive, http_server, tmp_path):
    http_server.files[URL_PATH] = archive
    proc = first_command(tmp_path, "--data_dir", str(tmp_path / "typo"), url=http_server.url(URL_PATH))
    assert_one_line_error(proc, "no dataset found", str(tmp_path / "typo"))
    assert http_server.requests == [] and not (tmp_path / "typo").exists()
    yes = first_command(tmp_path, "--data_dir", str(tmp_path / "typo"), "--download", url=http_server.url(URL_PATH))
    assert yes.returncode == 0, yes.stdout + yes.stderr  # --download alone means yes: into any folder


def test_offline_first_run_names_the_url_and_where_to_put_the_zip(tmp_path):
    url = "http://127.0.0.1:9/nature_12K.zip"  # the discard port: nothing listens
    proc = first_command(tmp_path, url=url, timeout=120)
    msg = assert_one_line_error(proc, url, str(Path("data") / "nature_12K.zip"), "--data_dir")
    assert "download failed" in msg
