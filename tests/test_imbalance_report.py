"""`data.py stats` and a training run's start-up print the imbalance ratio (largest class / smallest) and
suggest --class_weights balanced or --sampler balanced when it is over 3."""

from __future__ import annotations

import train_parta
from conftest import CLASSES, make_dataset, run_cli, train_args
from inat_classifier.class_balance import imbalance_line

SUGGESTION = "consider --class_weights balanced or --sampler balanced"


def test_stats_print_the_ratio_and_suggest_the_flags_for_a_10_to_1_folder(tmp_path):
    root = make_dataset(tmp_path / "ds", ["green", "red"], n_train=20, n_val=2)
    make_dataset(root, ["blue"], n_train=2, n_val=2)
    out = run_cli("data.py", "stats", "--data_dir", root, check=True).stdout.splitlines()
    assert f"train/ class balance: imbalance ratio 10.0 (largest red 20, smallest blue 2); {SUGGESTION}" in out


def test_stats_of_a_balanced_folder_suggest_nothing(tmp_path):
    root = make_dataset(tmp_path / "ds", CLASSES[:3], n_train=4, n_val=1)
    out = run_cli("data.py", "stats", "--data_dir", root, check=True).stdout
    assert "train/ class balance: imbalance ratio 1.0" in out and "consider" not in out, out


def test_suggestion_starts_over_a_ratio_of_3_and_empty_classes_are_left_out():
    classes = ["a", "b", "c"]
    assert SUGGESTION not in imbalance_line([30, 10, 12], classes)
    assert imbalance_line([31, 10, 0], classes) == (
        f"class balance: imbalance ratio 3.1 (largest a 31, smallest b 10); {SUGGESTION}"
    )
    assert imbalance_line([31, 10, 5], classes, "--sampler balanced").endswith("; balanced by --sampler balanced")


def test_training_start_up_prints_the_ratio_of_the_training_split(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", ["green", "red"], n_train=20, n_val=2)
    make_dataset(root, ["blue"], n_train=5, n_val=2)
    train_parta.main(train_parta.get_args_parser().parse_args(train_args(root, tmp_path, "r", 1, "--batch_size", "8")))
    out = capsys.readouterr().out.splitlines()
    # the training split: 16 of red's 20 photos, 4 of blue's 5
    assert f"class balance: imbalance ratio 4.0 (largest red 16, smallest blue 4); {SUGGESTION}" in out, out
