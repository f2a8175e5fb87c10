"""Training recipes: the LR finder, MixUp/CutMix and the weight EMA."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import train_parta
from conftest import CLASSES, make_dataset, run_cli, train_args
from amp import Training, grad_scaler
from checkpoint import load_checkpoint
from optim import build_mix, lr_range_test


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("recipes") / "ds", CLASSES[:3], n_train=16, n_val=6, size=32)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def test_lr_finder_restores_the_model_exactly_and_suggests_a_finite_lr():
    model = small_net()
    x = torch.randn(64, 3, 16, 16)
    y = torch.arange(64) % 3
    x[y == 1] += 1.0
    loader = list(zip(x.split(16), y.split(16)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()  # some optimizer state to restore too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu = torch.device("cpu")
    training = Training(model, opt, nn.CrossEntropyLoss(), cpu, None, grad_scaler(cpu, None))
    lrs, losses, lr = lr_range_test(training, loader, steps=60)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert opt.param_groups[0]["lr"] == 1e-3
    assert math.isfinite(lr) and 1e-7 <= lr <= 10
    assert len(lrs) == len(losses) > 10 and lrs == sorted(lrs)


def test_lr_find_flag_writes_the_plot_and_trains_nothing(colours, tmp_path):
    proc = run_cli("train_parta.py", *train_args(colours, tmp_path, "lrf", 1), "--lr_find")
    assert proc.returncode == 0, proc.stderr
    assert "suggested --lr" in proc.stdout
    run = tmp_path / "lrf"
    assert (run / "lr_find.png").stat().st_size > 1000 and not (run / "best.pt").exists()


@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mix_keeps_shapes_and_soft_labels_sum_to_one(mixup, cutmix):
    args = train_parta.get_args_parser().parse_args(["--mixup", str(mixup), "--cutmix", str(cutmix)])
    mix = build_mix(args, 5)
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 5
    mx, my = mix(x, y)
    assert mx.shape == x.shape and my.shape == (8, 5)
    assert torch.allclose(my.sum(1), torch.ones(8))
    assert not torch.equal(mx, x)
    assert (my[torch.arange(8), y] > 0).all()  # each sample keeps a share of its own label
    assert ((my > 0).sum(1) <= 2).all()  # mixed with one partner only


def test_mix_is_off_by_default():
    assert build_mix(train_parta.get_args_parser().parse_args([]), 5) is None


def test_ema_differs_from_the_model_and_is_what_gets_validated_and_saved(colours, tmp_path):
    args = train_parta.get_args_parser().parse_args(train_args(colours, tmp_path, "ema", 2, "--ema", "0.9"))
    state = train_parta.main(args)
    run = tmp_path / "ema"
    last = load_checkpoint(run / "last.pt")
    ema_w, raw_w = last["model_state"], last["train_state"]
    assert any(not torch.equal(ema_w[k], raw_w[k]) for k in ema_w if ema_w[k].is_floating_point())
    # best.pt holds the EMA weights; evaluating them on the run's val split reproduces the val_acc
    # the loop logged for that epoch, so the EMA is what was validated.
    proc = run_cli("evaluate.py", "--ckpt", str(run / "best.pt"), "--split", "val", "--workers", "0",
                   "--out", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr
    import json

    acc = json.loads((tmp_path / "ev" / "eval.json").read_text())["accuracy"]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert acc == pytest.approx(float(rows[state.best_epoch - 1]["val_acc"]), abs=1e-6)
