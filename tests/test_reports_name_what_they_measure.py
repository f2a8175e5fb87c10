"""Reports name what they measure: the per-class column of evaluate.py is recall, and an epoch's lr is the
LR it trained with (its last optimizer step's), not the LR after it, which reads 0 at the end of a cosine run."""

from __future__ import annotations

import json

import pytest
import torch

import evaluate
import train_parta
from conftest import make_dataset, read_rows, train_args
from inat_classifier.optim import lr_factor

CLASSES3 = ["blue", "green", "red"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-colour dataset and a runs folder; each test trains a 32 px run (train_args: cosine, no warm-up, lr 0.005)."""
    root = make_dataset(tmp_path_factory.mktemp("repdata") / "ds", CLASSES3, n_train=8, n_val=4, size=32)
    out = tmp_path_factory.mktemp("repruns")
    return root, out


def test_per_class_column_is_named_recall(run, tmp_path, capsys):
    root, out = run
    train_parta.main(train_parta.get_args_parser().parse_args(train_args(root, out, "recall", 1)))
    capsys.readouterr()
    args = ["--ckpt", str(out / "recall" / "best.pt"), "--out", str(tmp_path), "--workers", "0", "--device", "cpu"]
    evaluate.main(evaluate.get_args_parser().parse_args(args))
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("class "))
    assert header.split() == ["class", "recall", "precision", "f1", "support"]
    report = json.loads((tmp_path / "eval.json").read_text())
    cm = report["confusion_matrix"]
    for i, name in enumerate(CLASSES3):
        per_class = report["per_class"][name]
        assert set(per_class) == {"recall", "precision", "f1", "support"}
        assert per_class["recall"] == pytest.approx(cm[i][i] / sum(cm[i]))  # the share of the class found


def test_each_epoch_reports_the_lr_its_last_step_trained_with(run, capsys):
    root, out = run
    train_parta.main(train_parta.get_args_parser().parse_args(train_args(root, out, "lr", 2)))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    steps = torch.load(out / "lr" / "last.pt", map_location="cpu", weights_only=True)["scheduler"]["last_epoch"]
    per_epoch = steps // 2
    expected = [0.005 * lr_factor(e * per_epoch - 1, steps, 0, "cosine") for e in (1, 2)]
    rows = read_rows(out / "lr" / "metrics.csv")
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-9)
    assert expected[1] > 0  # the LR after the last step is 0: not what the last epoch trained with
    assert [f"lr {lr:.2e}" in line for lr, line in zip(expected, lines, strict=True)] == [True, True]
    assert "lr 0.00e+00" not in "\n".join(lines)
