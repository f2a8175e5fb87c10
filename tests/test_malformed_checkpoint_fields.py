"""Every field a checkpoint carries is checked by type when it is read (checkpoint.load_checkpoint): a
malformed one is one line naming the field, for every reader (evaluate.py, --predict, visualize.py, --resume)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, run_cli, train_args, write_image


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    """A private copy of the trained run (best.pt, last.pt, args.json, split.json)."""
    copy = tmp_path / "trained"
    shutil.copytree(trained_run.run_dir, copy, ignore=shutil.ignore_patterns(".run.lock"))
    return copy


def edit(path: Path, **fields) -> None:
    """Rewrite the checkpoint with some fields replaced (None: removed)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in fields.items():
        if value is None:
            ckpt.pop(key, None)
            ckpt.get("preprocess", {}).pop(key, None)
        else:
            ckpt[key] = value
    torch.save(ckpt, path)


def preprocess_without(run: Path, key: str) -> dict:
    pre = dict(torch.load(run / "best.pt", map_location="cpu", weights_only=True)["preprocess"])
    del pre[key]
    return pre


BAD_FIELDS = {
    "class_names": [0, 1, 2, 3],
    "preprocess": "224",
    "split": {"train": "all"},
    "config": ["lr", 0.1],
    "spec": {"kind": "convnet", "kwargs": "filters=8"},
    "model_state": {"conv.weight": [1.0]},
    "epoch": "3",
    "metrics": "none",
}


@pytest.mark.parametrize("field", sorted(BAD_FIELDS))
def test_evaluate_names_the_malformed_field(run, field):
    edit(run / "best.pt", **{field: BAD_FIELDS[field]})
    proc = run_cli("evaluate.py", "--ckpt", run / "best.pt", "--device", "cpu")
    assert_one_line_error(proc, "malformed checkpoint", f"'{field}'")
    assert proc.returncode == 2


def test_a_preprocess_entry_without_a_key_is_one_line(run):
    edit(run / "best.pt", preprocess=preprocess_without(run, "mean"))
    proc = run_cli("evaluate.py", "--ckpt", run / "best.pt", "--device", "cpu")
    assert_one_line_error(proc, "'preprocess' lacks 'mean'")


def test_class_names_with_a_newline_are_one_line(run):
    edit(run / "best.pt", class_names=["blue", "gre\nen", "red", "yellow"])
    proc = run_cli("evaluate.py", "--ckpt", run / "best.pt", "--device", "cpu")
    assert_one_line_error(proc, "'class_names'", "'gre\\nen'")


def test_every_reader_refuses_integer_class_names_in_one_line(run, tmp_path):
    for name in ("best.pt", "last.pt"):
        edit(run / name, class_names=[0, 1, 2, 3])
    photo = write_image(tmp_path / "p.jpg", (200, 40, 40))
    commands = [
        ("evaluate.py", "--ckpt", run, "--predict", photo, "--device", "cpu"),
        ("visualize.py", "predictions", "--ckpt", run, "--device", "cpu"),
        ("train_parta.py", "--resume", run, "--epochs", "4", "--device", "cpu", "--wandb", "disabled"),
    ]
    for command in commands:
        assert_one_line_error(run_cli(*command), "malformed checkpoint", "'class_names'")


@pytest.mark.parametrize("field, value", [("rng", {"torch": "seed"}), ("optimizer", [0.1]), ("batches_done", -1)])
def test_resume_names_a_malformed_training_state_field(run, field, value, trained_run):
    edit(run / "last.pt", **{field: value})
    flags = train_args(trained_run.data.root, run.parent, "unused", 4)
    proc = run_cli("train_parta.py", *flags[:2], "--resume", run, "--epochs", "4", "--device", "cpu")
    assert_one_line_error(proc, "last.pt", "malformed checkpoint", f"'{field}'")
