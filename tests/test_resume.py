"""Resume beyond Part A's defaults (EMA + MixUp, Part B across --unfreeze_at), --patience, and the
EpochSampler that makes exact resumes and torchrun sharding possible.

Real runs in real processes; an interrupted run is stopped by SIGINT (the handler finishes the step
and writes a mid-epoch last.pt) and compared with an uninterrupted run of the same flags.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_parta
import train_partb
from conftest import REPO, clean_env, make_dataset, read_rows, run_cli, train_args
from inat_classifier.checkpoint import load_checkpoint
from inat_classifier.device_batches import EpochSampler

MACHINE_FLAGS = ["--workers", "0", "--wandb", "disabled", "--device", "cpu"]
RESUMED_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


# ----------------------------------------------------------------------------- helpers
def interrupt_after_rows(script: str, argv_for, out: Path, name: str, rows: int) -> tuple[Path, dict]:
    """Run `script`, SIGINT it once its metrics.csv has `rows` rows; (run_dir, last.pt as it was left).

    argv_for(run_name) gives the flags. A run that finished before the signal is retried under a new name.
    """
    for attempt in range(3):
        run_dir = out / f"{name}{attempt}"
        proc = subprocess.Popen(
            [sys.executable, str(REPO / script), *map(str, argv_for(run_dir.name))],
            cwd=REPO,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 240
        while proc.poll() is None and len(read_rows(run_dir / "metrics.csv")) < rows and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out_text, err = proc.communicate(timeout=240)
        if proc.returncode == 130:
            assert "Traceback" not in err and f"--resume {run_dir}" in err, err
            return run_dir, load_checkpoint(run_dir / "last.pt")
        assert proc.returncode == 0, out_text + err  # finished before the signal landed: try again
    pytest.fail("the run always finished before SIGINT arrived")


def resume(script: str, run_dir: Path):
    res = run_cli(script, "--resume", run_dir, *MACHINE_FLAGS)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def assert_same_run(run_dir: Path, ref_dir: Path, epochs: int) -> None:
    """metrics.csv to 5 decimals and every tensor of last.pt (weights, EMA, optimizer moments) within 1e-6."""
    rows, ref = read_rows(run_dir / "metrics.csv"), read_rows(ref_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    for key in RESUMED_KEYS:
        assert [round(float(r[key]), 5) for r in rows] == [round(float(r[key]), 5) for r in ref], key
    a, b = load_checkpoint(run_dir / "last.pt"), load_checkpoint(ref_dir / "last.pt")
    for part in ("model_state", "ema", "train_state"):
        assert (part in a) == (part in b), part
        if part in a:
            assert a[part].keys() == b[part].keys(), part
            for k in a[part]:
                if torch.is_tensor(a[part][k]) and a[part][k].is_floating_point():
                    assert torch.allclose(a[part][k], b[part][k], rtol=0, atol=1e-6), (part, k)
                else:
                    assert torch.equal(torch.as_tensor(a[part][k]), torch.as_tensor(b[part][k])), (part, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.allclose(sa["exp_avg"], sb["exp_avg"], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- EMA + MixUp resume
EMA_MIX_EPOCHS = 2
EMA_MIX_FLAGS = ["--ema", "0.9", "--mixup", "0.4"]  # on top of Part A's augmentation and dropout


@pytest.fixture(scope="module")
def ema_mix_reference(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ema-mix")
    train_parta.main(
        train_parta.get_args_parser().parse_args(
            train_args(image_folder.root, out, "ref", EMA_MIX_EPOCHS, *EMA_MIX_FLAGS)
        )
    )
    return out / "ref"


def test_resume_mid_epoch_with_ema_and_mixup_equals_uninterrupted_run(image_folder, ema_mix_reference, tmp_path):
    """last.pt carries the EMA average and the raw weights; MixUp's draws continue from the saved RNG:
    the resumed run validates (EMA weights) and ends exactly as the uninterrupted one."""
    run_dir, cut = interrupt_after_rows(
        "train_parta.py",
        lambda n: train_args(image_folder.root, tmp_path, n, EMA_MIX_EPOCHS, *EMA_MIX_FLAGS),
        tmp_path,
        "cut",
        rows=1,
    )
    assert cut["epoch"] == 1 and cut["batches_done"] > 0, (cut["epoch"], cut["batches_done"])
    assert {"ema", "train_state"} <= set(cut)
    # what best/last.pt hold as model_state is the average, not the weights that train
    assert any(not torch.equal(cut["model_state"][k], cut["train_state"][k]) for k in cut["model_state"])
    res = resume("train_parta.py", run_dir)
    assert f"after epoch 1, batch {cut['batches_done']}" in res.stdout
    assert_same_run(run_dir, ema_mix_reference, EMA_MIX_EPOCHS)


# ----------------------------------------------------------------------------- Part B across --unfreeze_at
PARTB_EPOCHS = 3


@pytest.fixture(scope="module")
def partb_data(tmp_path_factory) -> Path:
    """3 classes x 20 train images: 48 train / 12 validation, 12 steps an epoch at batch 4."""
    return make_dataset(
        tmp_path_factory.mktemp("partb-resume") / "ds", ["blue", "green", "red"], n_train=20, n_val=2, size=32
    )


def partb_flags(data_dir: Path, out: Path, name: str) -> list:
    # The body frozen in epoch 1, everything trains from epoch 2 (augmentation on: images every epoch).
    return [
        "--model",
        "mobilenet_v3_small",
        "--weights",
        "none",
        "--freeze",
        "all",
        "--unfreeze_at",
        "2",
        "--image_size",
        "32",
        "--batch_size",
        "4",
        "--epochs",
        PARTB_EPOCHS,
        "--data_dir",
        data_dir,
        "--out_dir",
        out,
        "--run_name",
        name,
        "--cache",
        out / "_cache",
        "--seed",
        "3",
        *MACHINE_FLAGS,
    ]


@pytest.fixture(scope="module")
def partb_reference(partb_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("partb-ref")
    train_partb.main(train_partb.get_args_parser().parse_args(list(map(str, partb_flags(partb_data, out, "ref")))))
    return out / "ref"


def body_weights(state: dict) -> dict:
    """The backbone's float parameters (not the new head, not batch-norm buffers)."""
    return {
        k: v
        for k, v in state.items()
        if not k.startswith("classifier.3.") and v.is_floating_point() and "running_" not in k
    }


def test_partb_resume_past_unfreeze_at_trains_the_body_and_equals_uninterrupted_run(
    partb_data, partb_reference, tmp_path
):
    """Stopped in epoch 3 (the body unfroze at epoch 2), the resumed process builds the body frozen
    (--freeze all) and must unfreeze it again at its first epoch: the body keeps training and the run
    ends as the uninterrupted one."""
    run_dir, cut = interrupt_after_rows(
        "train_partb.py", lambda n: partb_flags(partb_data, tmp_path, n), tmp_path, "cut", rows=2
    )
    assert cut["epoch"] == 2 and 0 < cut["batches_done"] < 12, (cut["epoch"], cut["batches_done"])
    res = resume("train_partb.py", run_dir)
    assert f"resuming {run_dir} after epoch 2, batch {cut['batches_done']}" in res.stdout
    assert "epoch 3: unfreezing the whole model" in res.stdout, res.stdout
    final = load_checkpoint(run_dir / "last.pt")
    before, after = body_weights(cut["model_state"]), body_weights(final["model_state"])
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} body tensors trained after resume"
    assert_same_run(run_dir, partb_reference, PARTB_EPOCHS)


def test_partb_body_is_frozen_before_unfreeze_at_and_trains_after(partb_reference):
    """The uninterrupted reference itself: epoch 1 leaves the body at its initial weights, epochs 2-3 move it."""
    args = train_partb.get_args_parser().parse_args(
        ["--model", "mobilenet_v3_small", "--weights", "none", "--freeze", "all", "--seed", "3"]
    )
    backbone = train_partb.build_backbone_for(args, 3)
    init = body_weights(backbone.model.state_dict())
    best = load_checkpoint(partb_reference / "best.pt")
    last = body_weights(load_checkpoint(partb_reference / "last.pt")["model_state"])
    assert sum(not torch.equal(init[k], last[k]) for k in init) > len(init) // 2
    # From scratch at 32 px the model stays at chance for 3 epochs (deterministic on CPU), so best.pt
    # keeps the epoch-1 weights: the frozen body has not moved from its initial weights.
    assert best["epoch"] == 1, best["metrics"]
    epoch1 = body_weights(best["model_state"])
    assert all(torch.equal(init[k], epoch1[k]) for k in init)


# ----------------------------------------------------------------------------- --patience
def test_patience_stops_after_n_epochs_without_a_better_val_acc(tmp_path, capsys):
    """lr 1e-9: val_acc cannot improve after epoch 1, so --patience 2 stops after epoch 3 of 8."""
    root = make_dataset(tmp_path / "ds", ["blue", "red"], n_train=6, n_val=2, size=32)
    args = train_parta.get_args_parser().parse_args(
        train_args(root, tmp_path, "p", 8, "--lr", "1e-9", "--patience", "2", "--batch_size", "4")
    )
    state = train_parta.main(args)
    out = capsys.readouterr().out
    rows = read_rows(tmp_path / "p" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3], out
    assert len({r["val_acc"] for r in rows}) == 1  # never better: the precondition of the stop
    assert state.best_epoch == 1 and load_checkpoint(tmp_path / "p" / "best.pt")["epoch"] == 1
    assert out.count("early stop: no better val_acc for 2 epochs") == 1, out
    assert load_checkpoint(tmp_path / "p" / "last.pt")["epoch"] == 3


# ----------------------------------------------------------------------------- EpochSampler
def test_validation_shards_cover_every_index_exactly_once():
    """pad=False (validation): an odd count over 2 ranks, every sample on exactly one rank, len() true."""
    for shuffle in (False, True):
        shards = [EpochSampler(9, seed=1, shuffle=shuffle, rank=r, world=2, pad=False) for r in range(2)]
        lists = [list(s) for s in shards]
        assert sorted(lists[0] + lists[1]) == list(range(9)), lists
        assert [len(s) for s in shards] == [len(x) for x in lists] == [5, 4]


def test_training_shards_are_padded_to_equal_length_and_interleave_the_epoch_order():
    """pad=True (trainer): both ranks get ceil(n/2); together they are the 1-process order, wrapped once."""
    one = EpochSampler(9, seed=4)
    one.set_epoch(3)
    order = list(one)
    shards = [EpochSampler(9, seed=4, rank=r, world=2) for r in range(2)]
    for s in shards:
        s.set_epoch(3)
    lists = [list(s) for s in shards]
    assert [len(x) for x in lists] == [len(s) for s in shards] == [5, 5]
    padded = order + order[:1]
    assert lists == [padded[0::2], padded[1::2]]  # global step i = the 1-process batch i
    assert set(lists[0]) | set(lists[1]) == set(range(9))


def test_skip_drops_exactly_the_first_k_of_the_same_order():
    for world, rank in ((1, 0), (2, 1)):
        full = EpochSampler(23, seed=7, rank=rank, world=world)
        full.set_epoch(2)
        whole = list(full)
        for k in (0, 1, 5, len(whole) - 1):
            s = EpochSampler(23, seed=7, rank=rank, world=world)
            s.set_epoch(2, skip=k)
            assert list(s) == whole[k:] and len(s) == len(whole) - k, (world, k)


def test_order_is_fixed_by_seed_and_epoch():
    def order(seed, epoch):
        s = EpochSampler(50, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(1, 3) == order(1, 3)
    assert sorted(order(1, 3)) == list(range(50))
    assert order(1, 3) != order(1, 4)
    assert order(1, 3) != order(2, 3)
    unshuffled = EpochSampler(50, seed=1, shuffle=False)
    unshuffled.set_epoch(5)
    assert list(unshuffled) == list(range(50))
