"""A run with --sampler balanced and --class_weights balanced, stopped mid-epoch by SIGINT and resumed,
ends exactly as the uninterrupted run: the balanced draws of an epoch are fixed by (seed, epoch), so the
resumed epoch skips exactly the batches it trained (as tests/test_resume.py checks for the shuffled order)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_resume import assert_same_run, interrupt_after_rows, resume

import train_parta
from conftest import make_dataset, train_args

EPOCHS = 2
FLAGS = ["--sampler", "balanced", "--class_weights", "balanced", "--batch_size", "4"]


@pytest.fixture(scope="module")
def imbalanced_data(tmp_path_factory) -> Path:
    """green and red 30 train photos each, blue 3: 24 + 24 + 2 train, 14 steps an epoch at batch 4."""
    root = make_dataset(tmp_path_factory.mktemp("imbalanced") / "ds", ["green", "red"], n_train=30, n_val=2)
    return make_dataset(root, ["blue"], n_train=3, n_val=2)


@pytest.fixture(scope="module")
def balanced_reference(imbalanced_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("balanced-ref")
    train_parta.main(train_parta.get_args_parser().parse_args(train_args(imbalanced_data, out, "ref", EPOCHS, *FLAGS)))
    return out / "ref"


def test_resume_mid_epoch_with_balanced_sampler_equals_uninterrupted_run(imbalanced_data, balanced_reference, tmp_path):
    run_dir, cut = interrupt_after_rows(
        "train_parta.py",
        lambda n: train_args(imbalanced_data, tmp_path, n, EPOCHS, *FLAGS),
        tmp_path,
        "cut",
        rows=1,
    )
    assert cut["epoch"] == 1 and cut["batches_done"] > 0, (cut["epoch"], cut["batches_done"])
    assert cut["config"]["sampler"] == "balanced" and cut["config"]["class_weights"] == "balanced"
    res = resume("train_parta.py", run_dir)
    assert f"after epoch 1, batch {cut['batches_done']}" in res.stdout
    assert "balanced by --class_weights balanced and --sampler balanced" in res.stdout, res.stdout
    assert_same_run(run_dir, balanced_reference, EPOCHS)
