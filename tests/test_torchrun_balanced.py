"""Under torchrun, --sampler balanced shards one epoch's draws between the processes and --class_weights
balanced weighs the loss by the whole training split: 2 gloo processes x 8 photos end as 1 process x 16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_robustness import torchrun

import train_parta
from conftest import PLAIN_REF_FLAGS, make_dataset, read_rows, train_args
from inat_classifier.checkpoint import load_checkpoint

EPOCHS = 2
FLAGS = [*PLAIN_REF_FLAGS, "--sampler", "balanced", "--class_weights", "balanced"]  # batch 16 (train_args)


@pytest.fixture(scope="module")
def imbalanced_data(tmp_path_factory) -> Path:
    """green and red 24 train photos each, blue 4: 19 + 19 + 3 train (2 steps of 16), a ratio over 6."""
    root = make_dataset(tmp_path_factory.mktemp("ddp-balanced") / "ds", ["green", "red"], n_train=24, n_val=2)
    return make_dataset(root, ["blue"], n_train=4, n_val=2)


def test_torchrun_two_processes_with_balanced_draws_and_weights_equal_one_process(imbalanced_data, tmp_path):
    """No dropout, augmentation or batch norm: each global batch is the one process's batch (rank r takes
    every other draw), each process's loss is the mean over its samples with the split's weights, and DDP
    averages the halves. Weights counted on a shard, or draws differing between processes, would change
    the weights far beyond 1e-5."""
    ref = tmp_path / "ref"
    train_parta.main(train_parta.get_args_parser().parse_args(train_args(imbalanced_data, ref, "one", EPOCHS, *FLAGS)))
    out = tmp_path / "runs"
    done = torchrun("train_parta.py", train_args(imbalanced_data, out, "ddp", EPOCHS, *FLAGS), tmp_path / "logs")
    assert done.returncode == 0, done.stdout + done.stderr
    rows, ref_rows = read_rows(out / "ddp" / "metrics.csv"), read_rows(ref / "one" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert [float(r[key]) for r in rows] == pytest.approx([float(r[key]) for r in ref_rows], abs=2e-5), key
    a, b = (
        load_checkpoint(out / "ddp" / "last.pt")["model_state"],
        load_checkpoint(ref / "one" / "last.pt")["model_state"],
    )
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())
