"""Any class name a folder can have either works end to end (train with the decoded cache, evaluate, the
figure) or is refused when the dataset is discovered, with one line that quotes it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error, make_dataset, run_cli, train_args

# Spaces, quotes, a comma, TeX-like '$...$', '%' and braces, a leading dash, accents, CJK and an emoji.
ODD_NAMES = ["US$ \\frac{1}$ x", 'it\'s, "odd" %d {x}', "-dash", "Café 日本 🐦"]


def with_class(root: Path, name: bytes) -> Path:
    """The tiny dataset plus a class folder of this (byte) name, a copy of red's photos."""
    for split in ("train", "val"):
        shutil.copytree(bytes(root / split / "red"), bytes(root / split) + b"/" + name)
    return root


def train_and_evaluate(root: Path, tmp_path: Path) -> Path:
    run_cli("train_parta.py", *train_args(root, tmp_path / "runs", "r", 1), check=True)  # cache on
    run = tmp_path / "runs" / "r"
    run_cli("evaluate.py", "--ckpt", run, "--device", "cpu", "--workers", "0", check=True)
    return run


def test_odd_but_printable_class_names_train_evaluate_and_draw(tmp_path):
    root = make_dataset(tmp_path / "ds", ["blue", "red"], n_train=3, n_val=1)
    for name in ODD_NAMES:
        with_class(root, os.fsencode(name))
    run = train_and_evaluate(root, tmp_path)
    assert (run / "confusion_matrix.png").stat().st_size > 0
    proc = run_cli("visualize.py", "predictions", "--ckpt", run, "--device", "cpu", "--rows", "2", "--cols", "2")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "missing from font" not in proc.stderr


def test_a_photo_named_in_another_encoding_trains_with_the_cache(tmp_path):
    root = make_dataset(tmp_path / "ds", ["blue", "red"], n_train=3, n_val=1)
    for split in ("train", "val"):
        photo = next((root / split / "red").glob("*.png"))
        os.rename(bytes(photo), bytes(photo.parent) + b"/caf\xe9.png")
    train_and_evaluate(root, tmp_path)


@pytest.mark.parametrize(
    "name, shown",
    [(b"caf\xe9", "b'caf\\xe9'"), (b"two\nlines", "'two\\nlines'"), (b"tab\there", "'tab\\there'")],
)
def test_a_class_name_no_line_can_show_is_refused_at_discovery(tmp_path, name, shown):
    root = with_class(make_dataset(tmp_path / "ds", ["blue", "red"], n_train=2, n_val=1), name)
    proc = run_cli("train_parta.py", *train_args(root, tmp_path / "runs", "r", 1))
    line = assert_one_line_error(proc, f"class folder {shown} in {root / 'train'}", "rename")
    assert proc.returncode == 2 and len((proc.stdout + proc.stderr).strip().splitlines()) == 1, line
    assert not (tmp_path / "runs" / "r").exists()
    proc = run_cli("data.py", "stats", "--data_dir", root)
    assert_one_line_error(proc, shown)
