"""Where the model fails: visualize.py top_losses ranks held-out photos by their loss, and evaluate.py
names the class pairs it confuses most."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_one_line_error, run_cli
from inat_classifier.inference import heldout_samples, predict
from inat_classifier.metrics import most_confused
from inat_classifier.presets import Preprocess
from models import restore_model


def test_most_confused_lists_the_largest_off_diagonal_cells_first():
    cm = [[5, 3, 0], [1, 6, 4], [0, 0, 9]]
    pairs = most_confused(cm, ["a", "b", "c"], k=5)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("b", "c", 4), ("a", "b", 3), ("b", "a", 1)]
    assert pairs[0]["fraction"] == pytest.approx(4 / 11)
    assert most_confused([[2, 0], [0, 3]], ["a", "b"]) == []


def test_top_losses_ranks_the_held_out_photos_by_their_loss(trained_run, tmp_path):
    ckpt_path = trained_run.run_dir / "best.pt"
    proc = run_cli(
        "visualize.py", "top_losses", "--ckpt", ckpt_path, "--n", "5", "--cam", "--out", tmp_path, "--workers", "0"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = [(float(m[1]), m[2]) for m in re.finditer(r"^loss +([\d.]+) .* (\S+)$", proc.stdout, re.M)]
    assert len(shown) == 5
    # the same losses, in process, through the one inference path
    model, ckpt = restore_model(ckpt_path, torch.device("cpu"))
    samples, _ = heldout_samples(ckpt, None, "test")
    p = predict(model, samples, Preprocess.from_dict(ckpt["preprocess"]), torch.device("cpu"))
    losses = F.cross_entropy(p.outputs, p.targets, reduction="none")
    order = losses.argsort(descending=True)[:5]
    assert [loss for loss, _ in shown] == pytest.approx(losses[order].tolist(), abs=1e-3)
    assert [path for _, path in shown] == [samples[p.index[i]][0] for i in order.tolist()]
    assert (tmp_path / "top_losses.png").stat().st_size > 10_000


def test_top_losses_refuses_a_count_below_one(trained_run, tmp_path):
    proc = run_cli("visualize.py", "top_losses", "--ckpt", trained_run.run_dir, "--n", "0", "--out", tmp_path)
    assert_one_line_error(proc, "--n")


def test_evaluate_writes_the_most_confused_pairs(trained_run, tmp_path):
    run_cli("evaluate.py", "--ckpt", trained_run.run_dir, "--out", tmp_path, "--workers", "0", check=True)
    report = json.loads((tmp_path / "eval.json").read_text())
    cm = torch.tensor(report["confusion_matrix"])
    off = cm - torch.diag(cm.diag())
    counts = [p["count"] for p in report["most_confused"]]
    assert counts == sorted(off.flatten().tolist(), reverse=True)[: len(counts)]
    assert len(counts) == min(5, int((off > 0).sum()))
