"""Bad data, odd flags and resumes: odd data folders, datasets with nothing to learn, flags, resume and --predict.

Real files throughout: symlinks made with os.symlink, unreadable images written as bytes, runs
trained by the scripts themselves. Signals, full disks and damaged caches: tests/test_signals.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import data
import evaluate
import train_parta
import train_partb
from conftest import CLASSES, assert_one_line_error, make_dataset, read_rows, run_cli, train_args, write_image
from inat_classifier.cli import UserError
from inat_classifier.optim import lr_factor


def parta(args: list[str]):
    return train_parta.main(train_parta.get_args_parser().parse_args(args))


@pytest.fixture
def two_classes(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds", CLASSES[:2], n_train=6, n_val=2)


def counts(root: Path) -> tuple[int, int]:
    ds = data.discover(root)
    return len(ds.train), len(ds.heldout)


# ----------------------------------------------------------------------------- symlinks
def test_a_link_back_to_the_parent_is_skipped_and_reported_not_walked_forever(two_classes):
    clean = counts(two_classes)
    os.symlink("..", two_classes / "train" / CLASSES[0] / "up")  # -> train/, which holds this class
    proc = run_cli("data.py", "stats", "--data_dir", two_classes, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: skipping {two_classes / 'train' / CLASSES[0] / 'up'}" in proc.stderr
    assert counts(two_classes) == clean


def test_a_self_link_puts_no_photo_in_both_train_and_validation(two_classes, tmp_path, capsys):
    clean = counts(two_classes)
    os.symlink(".", two_classes / "train" / CLASSES[0] / "self")
    assert counts(two_classes) == clean
    assert "self: a link to" in capsys.readouterr().err
    state = parta(train_args(two_classes, tmp_path / "runs", "r", 1))
    split = json.loads((tmp_path / "runs" / "r" / "split.json").read_text())
    real = lambda paths: {os.path.realpath(two_classes / p) for p in paths}  # noqa: E731
    assert not real(split["train"]) & real(split["val"]) and state.epoch == 1


def test_two_links_to_one_folder_count_its_photos_once(two_classes, tmp_path):
    extra = tmp_path / "more_photos"
    for i in range(3):
        write_image(extra / f"x{i}.jpg", (40, 60, 210), seed=500 + i)
    for name in ("link1", "link2"):
        os.symlink(extra, two_classes / "train" / CLASSES[0] / name)
    ds = data.discover(two_classes)
    assert len(ds.train) == 12 + 3
    assert sum(os.path.realpath(p).startswith(str(extra)) for p, _ in ds.train) == 3


def test_a_symlinked_class_folder_is_an_ordinary_class(two_classes, tmp_path):
    moved = tmp_path / "elsewhere" / CLASSES[1]
    shutil.move(two_classes / "train" / CLASSES[1], moved)
    os.symlink(moved, two_classes / "train" / CLASSES[1])
    assert counts(two_classes) == (12, 4)


@pytest.mark.parametrize("where", ["other class", "held-out split"])
def test_a_photo_reachable_from_two_places_is_an_error_naming_both(two_classes, where):
    photo = two_classes / "train" / CLASSES[0] / f"{CLASSES[0]}_001.jpg"
    split, cls = ("train", CLASSES[1]) if where == "other class" else ("val", CLASSES[0])
    os.symlink(photo, two_classes / split / cls / "copy.jpg")
    with pytest.raises(UserError, match="the same photo is in two places") as e:
        data.discover(two_classes)
    assert str(photo) in str(e.value) and "copy.jpg" in str(e.value)


# ----------------------------------------------------------------------------- nothing to learn
def garbage(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"not_an_image_{i}.jpg").write_bytes(b"this is text, not a JPEG " * 20)


def truncated_jpeg(path: Path, seed: int) -> None:
    """A camera-size JPEG cut in half: its header reads, its pixels do not."""
    write_image(path, (200, 30, 30), seed=seed, size=640)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_dataset_of_unreadable_files_is_refused_before_any_run_folder(tmp_path):
    for split in ("train", "val"):
        for cls in CLASSES[:2]:
            garbage(tmp_path / "ds" / split / cls, 4)
    proc = run_cli("train_parta.py", *train_args(tmp_path / "ds", tmp_path / "runs", "r", 1))
    assert_one_line_error(proc, "none of the", "can be read")
    assert proc.returncode == 2 and not (tmp_path / "runs" / "r").exists()


def test_a_class_without_one_readable_image_is_named(two_classes, tmp_path):
    shutil.rmtree(two_classes / "train" / CLASSES[1])
    garbage(two_classes / "train" / CLASSES[1], 5)
    with pytest.raises(UserError, match=f"class {CLASSES[1]} in .* has no readable image"):
        parta(train_args(two_classes, tmp_path / "runs", "r", 1))
    assert not (tmp_path / "runs" / "r").exists()


@pytest.mark.parametrize("cache", ["decoded", "off"])
def test_a_class_of_truncated_photos_is_named_and_leaves_no_run_folder(two_classes, tmp_path, cache):
    """Headers read, pixels do not: found by the cache build, or (--cache off) by the first epoch."""
    shutil.rmtree(two_classes / "train" / CLASSES[1])
    for i in range(6):
        truncated_jpeg(two_classes / "train" / CLASSES[1] / f"cut_{i}.jpg", seed=i)
    args = train_args(two_classes, tmp_path / "runs", "r", 2)
    if cache == "off":
        args += ["--cache", "off"]
    with pytest.raises(UserError, match=f"class {CLASSES[1]} in .* has no readable image"):
        train_parta.main(train_parta.get_args_parser().parse_args(args))
    assert not any((tmp_path / "runs" / "r").glob("*.pt"))


def test_one_class_alone_is_refused(tmp_path):
    root = make_dataset(tmp_path / "ds", CLASSES[:1], n_train=6, n_val=2)
    with pytest.raises(UserError, match="has 1 class folder .*needs at least 2"):
        parta(train_args(root, tmp_path / "runs", "r", 1))
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize(
    "flag,value",
    [
        ("--mixup", "nan"),
        ("--grad_clip", "nan"),
        ("--warmup_epochs", "nan"),
        ("--lr", "inf"),
        ("--weight_decay", "-inf"),
        ("--ema", "nan"),
    ],
)
def test_nan_and_inf_are_refused_naming_the_flag_before_anything_is_created(two_classes, tmp_path, flag, value):
    with pytest.raises(UserError, match=f"{flag} must be a finite number"):
        parta(train_args(two_classes, tmp_path / "runs", "r", 1, f"{flag}={value}"))
    assert not (tmp_path / "runs").exists()


def test_nan_is_one_line_with_exit_code_2(two_classes, tmp_path):
    proc = run_cli("train_partb.py", "--data_dir", two_classes, "--out_dir", tmp_path / "runs", "--lr_mult", "nan")
    assert_one_line_error(proc, "--lr_mult must be a finite number")
    assert proc.returncode == 2 and not (tmp_path / "runs").exists()


def test_nan_poll_interval_of_the_sweep_runner_is_refused(tmp_path):
    proc = run_cli("sweep_offline.py", "--config", "sweep.yaml", "--sweep_dir", tmp_path / "s", "--poll_s", "nan")
    assert_one_line_error(proc, "--poll_s must be a number > 0, got nan")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--device", f"cuda:{torch.cuda.device_count()}"], "--device"),  # one past the last visible GPU
        (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a GPU"),
        (["--image_size", "100000"], "--image_size must be <= 2048"),
        (["--ema", "1.5"], r"--ema must be in \(0, 1\)"),
    ],
)
def test_bad_flags_found_late_leave_no_orphan_run_folder(two_classes, tmp_path, flags, message):
    args = train_args(two_classes, tmp_path / "runs", "r", 1)
    with pytest.raises((UserError, ValueError), match=message):
        parta(args + flags)
    assert not (tmp_path / "runs" / "r").exists()


@pytest.mark.parametrize("name", ["../outside", "a/b", "..", "."])
def test_run_name_stays_inside_out_dir(two_classes, tmp_path, name):
    out = tmp_path / "box" / "runs"
    with pytest.raises(UserError, match="--run_name must be a plain folder name"):
        parta(train_args(two_classes, out, name, 1))
    assert not (tmp_path / "box").exists()


def test_freeze_last_k_beyond_the_stages_is_refused_naming_them(two_classes, tmp_path):
    proc = run_cli(
        "train_partb.py",
        "--data_dir",
        two_classes,
        "--out_dir",
        tmp_path / "runs",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--freeze",
        "last:999",
        "--image_size",
        "32",
        "--workers",
        "0",
        "--wandb",
        "disabled",
        "--device",
        "cpu",
    )
    assert_one_line_error(proc, "--freeze last:999", "0..6", "conv1, bn1, layer1, layer2, layer3, layer4")
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- resume
def test_resume_with_more_epochs_trains_them_and_a_finished_run_says_so(two_classes, tmp_path, capsys):
    out = tmp_path / "runs"
    parta(train_args(two_classes, out, "r", 1))
    run = out / "r"
    assert json.loads((run / "result.json").read_text())["epochs"] == 1
    resumed = train_parta.get_args_parser().parse_args(
        ["--resume", str(run), "--epochs", "3", "--workers", "0", "--device", "cpu", "--wandb", "disabled"]
    )
    state = train_parta.main(resumed)
    assert state.epoch == 3 and [int(r["epoch"]) for r in read_rows(run / "metrics.csv")] == [1, 2, 3]
    assert json.loads((run / "result.json").read_text())["epochs"] == 3
    capsys.readouterr()
    again = train_parta.get_args_parser().parse_args(["--resume", str(run), "--workers", "0", "--device", "cpu"])
    assert train_parta.main(again).epoch == 3
    assert f"nothing to train: {run} has trained all its 3 epochs" in capsys.readouterr().out
    fewer = train_parta.get_args_parser().parse_args(["--resume", str(run), "--epochs", "2", "--device", "cpu"])
    with pytest.raises(UserError, match="--epochs 2 is fewer than the 3 epochs"):
        train_parta.main(fewer)


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
def test_resume_with_more_epochs_stretches_the_schedule_to_the_new_total(two_classes, tmp_path, scheduler):
    """2 epochs, then --epochs 4: epochs 3-4 run at the LRs of a 4-epoch schedule from the start."""
    out, flags = tmp_path / "runs", ("--scheduler", scheduler, "--warmup_epochs", "1", "--batch_size", "4")
    parta(train_args(two_classes, out, "short", 2, *flags))
    train_parta.main(
        train_parta.get_args_parser().parse_args(
            ["--resume", str(out / "short"), "--epochs", "4", "--workers", "0", "--device", "cpu"]
        )
    )
    parta(train_args(two_classes, out, "long", 4, *flags))
    lrs = lambda name: [float(r["lr"]) for r in read_rows(out / name / "metrics.csv")]  # noqa: E731
    assert len(lrs("short")) == 4 and lrs("short")[2:] == pytest.approx(lrs("long")[2:], rel=1e-9)
    if scheduler == "cosine":  # the first 2 epochs ran a 2-epoch schedule: epoch 2 at its last step, not half way
        steps = torch.load(out / "short" / "last.pt", map_location="cpu", weights_only=True)["scheduler"]["last_epoch"]
        per_epoch = steps // 4
        end_of_two = 0.005 * lr_factor(2 * per_epoch - 1, 2 * per_epoch, per_epoch, "cosine")  # --lr 0.005
        assert lrs("short")[1] == pytest.approx(end_of_two, rel=1e-9) and lrs("short")[1] < lrs("long")[1]


def test_resume_after_the_data_folder_changed_names_what_is_missing(two_classes, tmp_path):
    out = tmp_path / "runs"
    parta(train_args(two_classes, out, "r", 1))
    split = json.loads((out / "r" / "split.json").read_text())
    (two_classes / split["train"][0]).unlink()
    proc = run_cli("train_parta.py", "--resume", out / "r", "--epochs", "2", "--workers", "0", "--device", "cpu")
    assert_one_line_error(proc, "1 of the run's", "no longer in", split["train"][0], "data folder changed")
    proc = run_cli("evaluate.py", "--ckpt", out / "r" / "best.pt", "--split", "val", "--workers", "0")
    assert_one_line_error(proc, "no longer in", split["train"][0])


def test_a_run_folder_without_a_checkpoint_is_started_again_by_either_command(two_classes, tmp_path):
    """What Ctrl-C before the first epoch leaves (split.json and args.json): no dead end."""
    out = tmp_path / "runs"
    parta(train_args(two_classes, out, "r", 1))
    for f in (out / "r").iterdir():
        if f.name not in ("split.json", "args.json"):
            f.unlink()
    state = train_parta.main(
        train_parta.get_args_parser().parse_args(
            ["--resume", str(out / "r"), "--workers", "0", "--device", "cpu", "--wandb", "disabled"]
        )
    )
    assert state.epoch == 1 and (out / "r" / "last.pt").is_file()
    for f in (out / "r").iterdir():
        if f.name not in ("split.json", "args.json"):
            f.unlink()
    assert parta(train_args(two_classes, out, "r", 1)).epoch == 1  # the same command as the first time


# ----------------------------------------------------------------------------- evaluate --predict
def test_predict_with_nothing_readable_is_an_error_and_keeps_the_csv(trained_run, tmp_path):
    garbage(tmp_path / "photos", 3)
    csv = tmp_path / "predictions.csv"
    # an earlier run's predictions
    earlier = "path,class_1,prob_1,class_2,prob_2,class_3,prob_3\nold.jpg,Aves,0.9,Fungi,0.05,Mammalia,0.05\n"
    csv.write_text(earlier)
    proc = run_cli(
        "evaluate.py",
        "--ckpt",
        trained_run.run_dir / "best.pt",
        "--predict",
        tmp_path / "photos",
        "--csv",
        csv,
        "--workers",
        "0",
    )
    assert_one_line_error(proc, "none of the 3 image files could be read")
    assert proc.returncode == 2 and csv.read_text() == earlier


def test_csv_without_predict_is_refused(trained_run, tmp_path):
    args = evaluate.get_args_parser().parse_args(
        ["--ckpt", str(trained_run.run_dir / "best.pt"), "--csv", str(tmp_path / "p.csv")]
    )
    with pytest.raises(UserError, match="--csv writes the predictions of --predict"):
        evaluate.main(args)
    assert not (tmp_path / "p.csv").exists()


def test_partb_checks_its_own_flags_before_building_anything(two_classes, tmp_path):
    args = train_partb.get_args_parser().parse_args(
        ["--data_dir", str(two_classes), "--out_dir", str(tmp_path / "o"), "--backbone_lr", "inf", "--weights", "none"]
    )
    with pytest.raises(UserError, match="--backbone_lr must be a finite number"):
        train_partb.main(args)
