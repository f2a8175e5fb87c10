"""--class_weights balanced: the training loss weighs each class n_samples / (n_classes * count) of the
training split (scikit-learn's "balanced"), with label smoothing, from the first step on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import train_parta
from conftest import make_dataset, train_args
from inat_classifier import dataset
from inat_classifier.checkpoint import load_checkpoint
from inat_classifier.class_balance import balanced_class_weights, class_counts
from inat_classifier.devices import Dist
from inat_classifier.training import build_trainer, train_step

CPU = torch.device("cpu")


def ten_to_one(root):
    """train/: red and green 20 photos each, blue 2 (a 10:1 dataset); val/: 2 each."""
    make_dataset(root, ["green", "red"], n_train=20, n_val=2)
    return make_dataset(root, ["blue"], n_train=2, n_val=2)


def test_balanced_weights_are_n_samples_over_n_classes_times_count():
    counts = [20, 2, 20]
    weights = balanced_class_weights(counts)
    assert weights.tolist() == pytest.approx([42 / 60, 42 / 6, 42 / 60])
    # every class weighs the same in total, as many as the samples
    assert (weights * torch.tensor(counts)).tolist() == pytest.approx([14.0, 14.0, 14.0])


def hand_loss(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Weighted cross-entropy with label smoothing, written out: per sample (1 - eps) w_y (-log p_y)
    + eps / C * sum_c w_c (-log p_c), averaged over the samples."""
    nll = -torch.log_softmax(logits, 1)
    per_sample = (1 - eps) * w[y] * nll.gather(1, y[:, None])[:, 0] + eps / logits.shape[1] * (nll * w).sum(1)
    return per_sample.mean()


@pytest.mark.parametrize("smoothing", ["0", "0.1"])
def test_first_step_loss_and_gradient_equal_the_hand_computed_weighted_loss(tmp_path, smoothing):
    """The counts of a real 10:1 folder, through build_trainer and train_step: the first step's loss and the
    gradient it applies are those of the hand-written weighted (and smoothed) cross-entropy."""
    ds = dataset.discover(ten_to_one(tmp_path / "ds"))
    counts = class_counts((label for _, label in ds.train), len(ds.classes))
    assert counts == [2, 20, 20]  # blue, green, red
    args = train_parta.get_args_parser().parse_args(
        ["--class_weights", "balanced", "--label_smoothing", smoothing, "--amp", "off"]
    )
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    groups = [{"params": list(model.parameters()), "lr": args.lr, "weight_decay": args.weight_decay}]
    trainer = build_trainer(args, model, groups, CPU, 4, 3, Dist(), class_counts=counts)
    loss, _ = train_step(trainer, x, y)

    w = torch.tensor([42 / 6, 42 / 60, 42 / 60])
    wr, br = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    expected = hand_loss(x @ wr.T + br, y, w, float(smoothing))
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # the gradients the optimizer stepped with (kept until the next step clears them)
    assert torch.allclose(model.weight.grad, wr.grad, atol=1e-6)
    assert torch.allclose(model.bias.grad, br.grad, atol=1e-6)
    unweighted = hand_loss(x @ w0.T + b0, y, torch.ones(3), float(smoothing))
    assert abs(loss.item() - unweighted.item()) > 1e-3  # the weights changed the step


def test_a_run_with_balanced_weights_trains_and_keeps_the_flag_in_its_files(tmp_path, capsys):
    root = ten_to_one(tmp_path / "ds")
    args = train_parta.get_args_parser().parse_args(
        train_args(root, tmp_path, "w", 1, "--class_weights", "balanced", "--batch_size", "8")
    )
    train_parta.main(args)
    out = capsys.readouterr().out
    # blue's 2 photos: 1 trains, 1 validates
    line = "class balance: imbalance ratio 16.0 (largest red 16, smallest blue 1); balanced by --class_weights balanced"
    assert line in out.splitlines(), out
    last = load_checkpoint(tmp_path / "w" / "last.pt")
    assert last["config"]["class_weights"] == "balanced" and last["config"]["sampler"] == "random"
    assert '"class_weights": "balanced"' in (tmp_path / "w" / "args.json").read_text()
