"""Training recipes: the LR finder, MixUp/CutMix and the weight EMA."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import evaluate
import train_parta
from conftest import CLASSES, make_dataset, run_cli, train_args
from inat_classifier.checkpoint import load_checkpoint
from inat_classifier.optim import build_mix, build_optimizer, build_scheduler, param_groups_with_decay
from inat_classifier.training import Trainer, grad_scaler, lr_range_test, suggest_lr


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("recipes") / "ds", CLASSES[:3], n_train=16, n_val=6, size=32)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def test_lr_finder_restores_the_model_and_optimizer_exactly():
    """After the sweep the weights, BN statistics and optimizer LR are as before; the LRs rise geometrically."""
    model = small_net()
    x = torch.randn(64, 3, 16, 16)
    y = torch.arange(64) % 3
    x[y == 1] += 1.0
    loader = list(zip(x.split(16), y.split(16), strict=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()  # some optimizer state to restore too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu = torch.device("cpu")
    trainer = Trainer(model, opt, nn.CrossEntropyLoss(), cpu, None, grad_scaler(cpu, None))
    lrs, losses, lr = lr_range_test(trainer, loader, start=1e-6, end=1.0, steps=61)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert opt.param_groups[0]["lr"] == 1e-3
    assert len(lrs) == len(losses) > 10
    assert lrs[:3] == pytest.approx([1e-6, 1.2589254e-6, 1.5848932e-6], rel=1e-6)  # 10 ** (-6 + i / 10)


def test_suggest_lr_is_a_tenth_of_the_lr_at_the_loss_minimum():
    """On a known curve (minimum at lr 0.1, then divergence) the suggestion is 0.01."""
    lrs = [10 ** (-4 + i / 10) for i in range(41)]  # 1e-4 ... 1
    losses = [2.0 - 0.04 * i for i in range(31)] + [0.8 + 0.5 * j for j in range(1, 11)]  # lowest at i = 30
    assert suggest_lr(lrs, losses) == pytest.approx(1e-2)
    # a flat start and a single dip: the dip decides, not the start or the end of the sweep
    assert suggest_lr([1e-3, 1e-2, 1e-1, 1.0], [1.0, 1.0, 0.2, 5.0]) == pytest.approx(1e-2)
    assert math.isnan(suggest_lr([], []))


def test_lr_range_test_on_a_quadratic_suggests_a_stable_lr():
    """Least squares on two batches with whitened inputs and noisy targets: each step's Hessian is 2 I, so
    gradient descent converges for lr < 1 (the optimum lr is 0.5) and diverges above.

    The two batches have different optima, so the iterate can never rest at one (no loss of exactly 0
    that only rounding error could disturb): past lr 1 the error grows by |1 - 2 lr| a step on any build.
    The sweep must reach divergence and stop early, and its suggestion must lie in the stable range.
    """
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(8, 1, generator=g)
    batches = []
    for _ in range(2):
        q, _ = torch.linalg.qr(torch.randn(64, 8, generator=g))
        x = q * 8.0  # x.T @ x / 64 = I: the MSE loss has Hessian 2 I
        batches.append((x, x @ w_true + 0.5 * torch.randn(64, 1, generator=g)))
    model = nn.Linear(8, 1, bias=False)
    nn.init.zeros_(model.weight)
    cpu = torch.device("cpu")
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=1.0), nn.MSELoss(), cpu, None, grad_scaler(cpu, None)
    )
    lrs, losses, lr = lr_range_test(trainer, batches, start=1e-4, end=10.0, steps=100)
    assert losses[0] == pytest.approx((batches[0][1] ** 2).mean().item(), rel=1e-5)  # the first loss: w = 0
    assert len(lrs) < 100 and lrs[-1] > 1.0  # stopped on divergence, past the stability limit
    assert min(losses) < 0.5 * losses[0]  # and it did converge on the way (the smoothing lags)
    assert 0.05 < lr < 1.0, lr  # the suggestion converges (and is not uselessly small)
    assert torch.count_nonzero(model.weight) == 0  # restored


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


# ----------------------------------------------------------------------------- LR schedules
def scheduled_lrs(
    scheduler: str, epochs: int, steps_per_epoch: int, warmup_epochs: float, lrs=(0.1,), optimizer: str = "adamw"
) -> list[list[float]]:
    """Each group's LR before every optimizer step of a run built from the flags, and after the last."""
    args = train_parta.get_args_parser().parse_args(
        [
            "--scheduler",
            scheduler,
            "--epochs",
            str(epochs),
            "--warmup_epochs",
            str(warmup_epochs),
            "--optimizer",
            optimizer,
            "--lr",
            str(lrs[0]),
        ]
    )
    groups = [{"params": [nn.Parameter(torch.zeros(2))], "lr": lr, "weight_decay": 0.0} for lr in lrs]
    opt = build_optimizer(groups, args, torch.device("cpu"))
    sched = build_scheduler(opt, args, steps_per_epoch)
    seen = []
    for _ in range(epochs * steps_per_epoch):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    seen.append([g["lr"] for g in opt.param_groups])
    return seen


# 5 epochs of 2 steps, 1 warm-up epoch: warm-up over steps 0-1 from lr/100, then 8 steps of decay.
# Worked by hand: warm-up 0.01, 0.01 + 0.99 / 2; cosine 0.5 * (1 + cos(pi * k / 8)), k = 0..8;
# step x0.1 once a third of the 8 decay steps is done (k >= 3) and again at two thirds (k >= 6).
HAND = {
    "cosine": [0.01, 0.505, 1.0, 0.9619398, 0.8535534, 0.6913417, 0.5, 0.3086583, 0.1464466, 0.0380602, 0.0],
    "step": [0.01, 0.505, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01],
    "none": [0.01, 0.505, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
}


@pytest.mark.parametrize("scheduler", sorted(HAND))
def test_schedule_with_warmup_matches_hand_computed_lrs(scheduler):
    """--scheduler with --warmup_epochs 1 over 5 epochs of 2 steps, per step, against worked values."""
    seen = scheduled_lrs(scheduler, epochs=5, steps_per_epoch=2, warmup_epochs=1, lrs=(0.1, 0.02))
    assert [s[0] for s in seen] == pytest.approx([0.1 * f for f in HAND[scheduler]], abs=1e-8)
    assert [s[1] for s in seen] == pytest.approx([0.02 * f for f in HAND[scheduler]], abs=1e-8)  # per group


def test_cosine_without_warmup_starts_at_the_peak():
    """--warmup_epochs 0: the first step already uses the full LR; 4 steps of cosine."""
    seen = scheduled_lrs("cosine", epochs=2, steps_per_epoch=2, warmup_epochs=0)
    assert [s[0] for s in seen] == pytest.approx([0.1, 0.0853553, 0.05, 0.0146447, 0.0], abs=1e-7)


def test_fractional_warmup_counts_steps():
    """--warmup_epochs 0.5 of 4 steps = 2 warm-up steps."""
    seen = scheduled_lrs("none", epochs=2, steps_per_epoch=4, warmup_epochs=0.5)
    assert [s[0] for s in seen] == pytest.approx([0.001, 0.0505] + [0.1] * 7, abs=1e-8)


@pytest.mark.parametrize("warmup_epochs,peak", [(3, 29), (0, 4), (8, 49)])
def test_onecycle_peaks_where_the_warmup_ends(warmup_epochs, peak):
    """onecycle over 10 epochs of 10 steps peaks after warmup/epochs of the run, clamped to [5%, 50%].

    3 of 10 epochs: step 29; no warm-up: 5% (step 4); 8 of 10: clamped to half (step 49). It starts
    at lr / 25 and reaches each group's own lr at the peak.
    """
    seen = scheduled_lrs("onecycle", epochs=10, steps_per_epoch=10, warmup_epochs=warmup_epochs, lrs=(0.1, 0.01))
    first = [s[0] for s in seen[:100]]
    assert first.index(max(first)) == peak
    assert seen[peak] == pytest.approx([0.1, 0.01])
    assert seen[0] == pytest.approx([0.004, 0.0004])
    assert max(first[:peak]) < 0.1 and all(a < b for a, b in zip(first[:peak], first[1 : peak + 1], strict=True))


# ----------------------------------------------------------------------------- weight decay
@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "no_bn"])
def test_weight_decay_spares_biases_and_norm_weights(batch_norm):
    """In a real ConvNet every bias and BN weight sits in a wd=0 group, every conv/linear weight in wd>0;
    one AdamW step with zero gradients leaves them unchanged and shrinks the weights by lr * wd."""
    args = train_parta.get_args_parser().parse_args(
        [
            "--image_size",
            "16",
            "--conv_layers",
            "2",
            "--filters",
            "4",
            "--dense_neurons",
            "8",
            "--lr",
            "0.1",
            "--weight_decay",
            "0.05",
            "--batch_norm",
            str(batch_norm),
        ]
    )
    torch.manual_seed(0)
    model = train_parta.build_model(args, 3)
    groups = param_groups_with_decay(model.named_parameters(), args.lr, args.weight_decay, "model")
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert sorted(wd_of) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    spared, decayed = [], []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            decayed.append(m.weight)
            spared += [m.bias] if m.bias is not None else []
        elif isinstance(m, nn.BatchNorm2d):
            spared += [m.weight, m.bias]
    assert len(spared) == (6 if batch_norm else 4)  # 2 BN x (weight, bias) or 2 conv biases; 2 linear biases
    assert len(spared) + len(decayed) == len(list(model.parameters()))
    assert all(wd_of[id(p)] == 0.0 for p in spared)
    assert all(wd_of[id(p)] == 0.05 for p in decayed)

    opt = build_optimizer(groups, args, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in spared:
        assert torch.equal(p, before[id(p)])
    for p in decayed:
        assert torch.allclose(p, before[id(p)] * 0.995, rtol=1e-6, atol=0)  # 1 - 0.1 * 0.05


# ----------------------------------------------------------------------------- weight EMA
EMA_DECAY = 0.2


@pytest.fixture(scope="module")
def ema_run(colours, tmp_path_factory):
    """A 2-epoch --ema 0.2 run, with the raw weights recorded after every optimizer step.

    The recording is torch's global optimizer step hook (fired inside the run's own optimizer.step).
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook

    out = tmp_path_factory.mktemp("ema")
    snapshots: list[list[torch.Tensor]] = []
    handle = register_optimizer_step_post_hook(
        lambda opt, a, kw: snapshots.append([p.detach().clone() for g in opt.param_groups for p in g["params"]])
    )
    try:
        args = train_parta.get_args_parser().parse_args(
            train_args(colours, out, "ema", 2, "--ema", str(EMA_DECAY), "--dropout", "0")
        )
        state = train_parta.main(args)
    finally:
        handle.remove()
    run = out / "ema"
    last = load_checkpoint(run / "last.pt")
    # Name the recorded tensors: the final snapshot is the raw weights last.pt keeps in train_state.
    names = []
    for t in snapshots[-1]:
        match = [k for k, v in last["train_state"].items() if v.shape == t.shape and torch.equal(v, t)]
        assert len(match) == 1, match
        names.append(match[0])
    history = [dict(zip(names, snap, strict=True)) for snap in snapshots]
    return run, state, last, history


def hand_ema(history: list[dict], steps: int) -> dict:
    """The EMA after `steps` updates, worked out step by step: the first update copies the weights;
    update n (n = 1, 2, ...) keeps d = min(0.2, (1 + n) / (10 + n)) of the average, i.e. 2/11 at
    n = 1 and 0.2 from n = 2 on."""
    decays = [2 / 11] + [EMA_DECAY] * (steps - 2)
    ema = {k: v.double() for k, v in history[0].items()}
    for d, w in zip(decays, history[1:steps], strict=True):
        ema = {k: ema[k] * d + w[k].double() * (1 - d) for k in ema}
    return ema


def test_ema_run_records_one_update_per_step(ema_run):
    """The EMA was updated once per optimizer step of the run (n_averaged in last.pt)."""
    run, state, last, history = ema_run
    assert len(history) >= 4 and len(history) % 2 == 0  # 2 epochs of equal length
    assert int(last["ema"]["n_averaged"]) == len(history)


def test_last_pt_keeps_the_ema_as_model_state_and_the_raw_weights_apart(ema_run):
    """last.pt: model_state is the hand-computed EMA, train_state the raw weights, and they differ."""
    run, state, last, history = ema_run
    expected = hand_ema(history, len(history))
    for k, raw in history[-1].items():
        assert torch.equal(last["train_state"][k], raw), k
        assert torch.allclose(last["model_state"][k].double(), expected[k], atol=1e-6), k
        assert (last["model_state"][k] - raw).abs().max() > 1e-4, k  # not the raw weights


def test_best_pt_holds_the_ema_of_its_epoch(ema_run):
    """best.pt (the validated weights) is the EMA after the best epoch's last step, not the raw weights."""
    run, state, last, history = ema_run
    best = load_checkpoint(run / "best.pt")
    steps = len(history) // 2 * best["epoch"]
    assert best["epoch"] == state.best_epoch
    expected = hand_ema(history, steps)
    for k in expected:
        assert torch.allclose(best["model_state"][k].double(), expected[k], atol=1e-6), k
        assert (best["model_state"][k] - history[steps - 1][k]).abs().max() > 1e-4, k


def test_validation_runs_on_the_ema_weights(colours, tmp_path):
    """With --ema, each epoch is validated on the EMA weights (the ones best.pt keeps): evaluate.py's
    loss of best.pt on the run's own validation split equals the logged val_loss of its epoch."""
    run = tmp_path / "ema-val"
    args = train_parta.get_args_parser().parse_args(
        train_args(
            colours,
            tmp_path,
            "ema-val",
            2,
            "--ema",
            "0.9",
            "--dropout",
            "0",
            "--no-augment",
            "--label_smoothing",
            "0",
            "--cache",
            "off",
        )
    )
    train_parta.main(args)
    best = load_checkpoint(run / "best.pt")
    logged = {int(float(r["epoch"])): float(r["val_loss"]) for r in csv.DictReader(open(run / "metrics.csv"))}
    result = evaluate.main(
        evaluate.get_args_parser().parse_args(
            [
                "--ckpt",
                str(run / "best.pt"),
                "--split",
                "val",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
    )
    assert result["loss"] == pytest.approx(logged[best["epoch"]], abs=1e-4)
    # and the EMA weights really differ from the raw ones at that point (else the check says nothing)
    raw = train_parta.build_model(args, len(best["class_names"]))
    raw.load_state_dict(load_checkpoint(run / "last.pt")["train_state"])
    assert any(
        not torch.allclose(v, raw.state_dict()[k]) for k, v in best["model_state"].items() if v.is_floating_point()
    )
