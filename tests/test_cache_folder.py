"""The default decoded-image cache folder unusable: a file in the way, or a parent the user may not write.

--cache auto then trains without the cache (one warning line saying so); a --cache DIR that cannot
be used is a one-line error. Real files in tmp_path; the unwritable parent is a real root-owned
folder, with the training run as an unprivileged user (setpriv).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import train_parta
from conftest import CLASSES, REPO, clean_env, make_dataset, train_args
from inat_classifier.cli import UserError


def parta(args: list[str]):
    return train_parta.main(train_parta.get_args_parser().parse_args(args))


@pytest.fixture
def ds(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds", CLASSES[:2], n_train=4, n_val=2)


def assert_ran_without_cache(err: str, folder: Path) -> None:
    warned = [ln for ln in err.splitlines() if "decoded-image cache folder" in ln]
    assert len(warned) == 1, err
    assert warned[0].startswith(f"warning: the decoded-image cache folder {folder} cannot be used (")
    assert "decoding every epoch instead" in warned[0] and "Errno" not in warned[0]


@pytest.mark.parametrize("variable", ["INAT_CACHE_DIR", "XDG_CACHE_HOME"])
def test_a_file_where_the_cache_folder_goes_trains_without_the_cache(variable, ds, tmp_path, monkeypatch, capsys):
    in_the_way = tmp_path / "not_a_folder"
    in_the_way.write_text("a file\n")
    monkeypatch.delenv("INAT_CACHE_DIR")
    monkeypatch.setenv(variable, str(in_the_way))
    state = parta(train_args(ds, tmp_path / "runs", "r", 1, "--cache", "auto"))  # the last --cache wins
    folder = in_the_way if variable == "INAT_CACHE_DIR" else in_the_way / "inat-classifier"
    assert_ran_without_cache(capsys.readouterr().err, folder)
    assert state.epoch == 1 and in_the_way.read_text() == "a file\n"


def test_a_cache_dir_flag_naming_a_file_is_a_one_line_error(ds, tmp_path):
    in_the_way = tmp_path / "cache_file"
    in_the_way.write_text("a file\n")
    with pytest.raises(UserError, match=f"--cache {in_the_way} cannot hold the decoded-image cache .*--cache off"):
        parta(train_args(ds, tmp_path / "runs", "r", 1, "--cache", str(in_the_way)))


@pytest.fixture
def shared_folder():
    """A 0755 folder outside pytest's private (0700) tmp, so that another user can reach into it."""
    folder = Path(tempfile.mkdtemp(prefix="cache-folder-test-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_a_cache_parent_the_user_cannot_write_trains_without_the_cache(shared_folder):
    root = make_dataset(shared_folder / "ds", CLASSES[:2], n_train=4, n_val=2)
    locked = shared_folder / "locked"  # root's, mode 0755: not writable by the run's user
    locked.mkdir(mode=0o755)
    runs = shared_folder / "runs"
    runs.mkdir()
    os.chown(runs, 65534, 65534)
    env = clean_env(INAT_CACHE_DIR=locked / "cache", HOME=shared_folder, MPLCONFIGDIR=runs / ".mpl")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    proc = subprocess.run(
        [*nobody, sys.executable, str(REPO / "train_parta.py"), *train_args(root, runs, "r", 1, "--cache", "auto")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_ran_without_cache(proc.stderr, locked / "cache")
    assert (runs / "r" / "best.pt").exists() and not list(locked.iterdir())


def test_part_b_features_are_keyed_alike_with_and_without_the_decoded_cache(ds, tmp_path, monkeypatch):
    """The cache, --cache off and the fallback of an unusable cache folder decode every photo the same way
    (one batch pipeline): their features are the same, so one key serves all three."""
    from inat_classifier.features import feature_cache_key
    from inat_classifier.presets import Preprocess
    from models import build_backbone

    backbone = build_backbone("resnet18", "none", 2)
    samples = [(str(p), 0) for p in sorted((ds / "train").rglob("*.png"))]
    assert samples

    def key(cache: str, pre: Preprocess | None = None) -> str:
        args = argparse.Namespace(model="resnet18", cache=cache, amp="off")
        return feature_cache_key(args, backbone, pre or Preprocess.for_size(32), samples)

    monkeypatch.setenv("INAT_CACHE_DIR", str(tmp_path / "cache"))
    working, off = key("auto"), key("off")
    (tmp_path / "not_a_folder").write_text("a file\n")
    monkeypatch.setenv("INAT_CACHE_DIR", str(tmp_path / "not_a_folder"))
    assert key("auto") == off == working
    assert key("off", Preprocess.for_size(32).with_stored_side(True, 0.5, 100)) != off  # other pixels, other key
