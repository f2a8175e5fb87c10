"""What discovery leaves out is said: a val/ beside test/ whose classes differ is named in one line, and
`data.py stats` reports empty classes instead of refusing the dataset (training still refuses them)."""

from __future__ import annotations

import shutil

from conftest import assert_one_line_error, make_dataset, run_cli, train_args


def test_a_val_folder_with_other_classes_beside_test_is_named_in_one_line(tmp_path):
    root = make_dataset(tmp_path / "ds", ["blue", "red"], n_train=2, n_val=1)
    shutil.copytree(root / "val", root / "test")
    (root / "val" / "red").rename(root / "val" / "green")
    proc = run_cli("data.py", "stats", "--data_dir", root)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if str(root / "val") in ln]
    assert len(lines) == 1 and lines[0].startswith("warning:"), proc.stderr
    assert "not used" in lines[0] and "only in val: green" in lines[0] and "only in train: red" in lines[0]


def test_a_val_folder_with_the_same_classes_beside_test_says_nothing(tmp_path):
    root = make_dataset(tmp_path / "ds", ["blue", "red"], n_train=2, n_val=1)
    shutil.copytree(root / "val", root / "test")
    proc = run_cli("data.py", "stats", "--data_dir", root, check=True)
    assert "warning" not in proc.stderr


def test_stats_reports_empty_classes_and_training_refuses_them(tmp_path):
    root = make_dataset(tmp_path / "ds", ["blue", "red"], n_train=2, n_val=1)
    (root / "train" / "green").mkdir()
    (root / "val" / "green").mkdir()
    (root / "train" / "green" / "notes.txt").write_text("no photos yet\n")
    proc = run_cli("data.py", "stats", "--data_dir", root, "--json", tmp_path / "stats.json", check=True)
    assert "empty classes in train/ (no image files): green" in proc.stdout
    assert "empty classes in val/ (no image files): green" in proc.stdout
    assert any(ln.split() == ["green", "0", "0"] for ln in proc.stdout.splitlines()), proc.stdout
    proc = run_cli("train_parta.py", *train_args(root, tmp_path / "runs", "r", 1))
    assert_one_line_error(proc, "green")
