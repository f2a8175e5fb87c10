"""The training loop through train_parta: learning, run-folder files, checkpoints, resume, W&B offline."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import evaluate
import train_parta
from conftest import (
    DEFAULT_REF_FLAGS,
    PLAIN_REF_FLAGS,
    REF_EPOCHS,
    REPO,
    TRAINED_EPOCHS,
    clean_env,
    make_dataset,
    read_rows,
    run_cli,
    train_args,
)
from inat_classifier.checkpoint import load_checkpoint
from inat_classifier.cli import UserError
from inat_classifier.presets import IMAGENET_MEAN, IMAGENET_STD
from models import ConvNet, restore_model

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time"]


# ----------------------------------------------------------------------------- one trained run
def test_training_learns_far_above_chance(trained_run):
    hist = trained_run.state.history
    assert len(hist) == TRAINED_EPOCHS
    # 4 classes: chance is 0.25
    assert trained_run.state.best_val_acc >= 0.8, hist
    assert hist[-1]["val_acc"] >= 0.8, hist
    assert hist[-1]["train_loss"] < hist[0]["train_loss"], hist


def test_metrics_csv_has_exact_columns_and_one_row_per_epoch(trained_run):
    path = trained_run.run_dir / "metrics.csv"
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    assert header == METRIC_COLUMNS
    assert [int(r[0]) for r in rows] == list(range(1, TRAINED_EPOCHS + 1))
    for r in rows:
        values = [float(v) for v in r]
        assert all(v == v for v in values)  # no NaN
        assert 0 <= values[2] <= 1 and 0 <= values[4] <= 1 and values[6] > 0
    # the csv and the returned history agree
    assert [round(float(r[4]), 6) for r in rows] == [round(h["val_acc"], 6) for h in trained_run.state.history]


def test_run_folder_holds_curves_split_args_and_checkpoints(trained_run):
    run = trained_run.run_dir
    for name in ("curves.png", "split.json", "args.json", "best.pt", "last.pt", "metrics.csv"):
        assert (run / name).is_file(), name
    with Image.open(run / "curves.png") as img:
        assert img.format == "PNG" and img.size[0] > 100
    args = json.loads((run / "args.json").read_text())
    assert args["epochs"] == TRAINED_EPOCHS and args["image_size"] == 32 and args["batch_norm"] is True
    split = json.loads((run / "split.json").read_text())
    # the split is the stratified split of train/, as relative paths, without overlap
    ds = data.discover(trained_run.data.root)
    tr, va = data.stratified_split(ds.train, 0.2, seed=0)
    assert split == data.split_to_json(ds.root, ds.train, tr, va)
    assert not set(split["train"]) & set(split["val"])
    assert len(split["train"]) + len(split["val"]) == sum(trained_run.data.train_counts.values())


def test_checkpoint_holds_everything_needed_to_use_it(trained_run):
    ck = load_checkpoint(trained_run.run_dir / "best.pt")
    for key in ("class_names", "preprocess", "split", "config", "epoch", "metrics", "spec", "model_state"):
        assert key in ck, key
    assert ck["class_names"] == trained_run.data.classes
    # the whole preprocessing travels with the weights: 32 px crops of the short side resized to 37, every
    # photo stored at 40 px (augmentation would keep 53, the 40 px photos have no more)
    assert ck["preprocess"] == {
        "image_size": 32,
        "resize_size": 37,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "stored_side": 40,
    }
    assert ck["split"] == json.loads((trained_run.run_dir / "split.json").read_text())
    assert ck["config"]["epochs"] == TRAINED_EPOCHS and ck["config"]["data_dir"] == str(trained_run.data.root)
    assert ck["epoch"] == trained_run.state.best_epoch == ck["best_epoch"]
    assert len(ck["metrics"]) == ck["epoch"]
    assert ck["best_val_acc"] == trained_run.state.best_val_acc == max(m["val_acc"] for m in ck["metrics"])
    last = load_checkpoint(trained_run.run_dir / "last.pt")
    assert last["epoch"] == TRAINED_EPOCHS and len(last["metrics"]) == TRAINED_EPOCHS
    assert {"optimizer", "scheduler", "rng"} <= set(last)


def test_checkpoint_round_trip_gives_identical_outputs(trained_run):
    path = trained_run.run_dir / "best.pt"
    restored, ck = restore_model(path, torch.device("cpu"))
    assert not restored.training
    raw = torch.load(path, map_location="cpu", weights_only=True)
    fresh = ConvNet(num_classes=len(raw["class_names"]), **raw["spec"]["kwargs"])
    fresh.load_state_dict(raw["model_state"])
    fresh.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored(x), fresh(x))
    # a freshly initialised net differs, so the comparison above means something
    other = ConvNet(num_classes=len(raw["class_names"]), **raw["spec"]["kwargs"]).eval()
    with torch.no_grad():
        assert not torch.allclose(other(x), fresh(x))
    for k, v in raw["model_state"].items():
        assert torch.equal(restored.state_dict()[k], v), k


def test_same_seed_same_run_other_seed_other_run(image_folder, tmp_path):
    def run(name, seed):
        args = train_parta.get_args_parser().parse_args(
            train_args(image_folder.root, tmp_path, name, 1, "--seed", seed, "--no-augment", "--dropout", "0")
        )
        return train_parta.main(args).history[0]

    a, b, c = run("a", 5), run("b", 5), run("c", 6)
    assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
    assert a["train_loss"] != pytest.approx(c["train_loss"], abs=1e-6)
    assert json.loads((tmp_path / "a" / "split.json").read_text()) == json.loads(
        (tmp_path / "b" / "split.json").read_text()
    )
    assert json.loads((tmp_path / "a" / "split.json").read_text()) != json.loads(
        (tmp_path / "c" / "split.json").read_text()
    )


def test_existing_run_name_is_refused_not_overwritten(trained_run):
    args = train_parta.get_args_parser().parse_args(
        train_args(trained_run.data.root, trained_run.run_dir.parent, "trained", 1)
    )
    before = (trained_run.run_dir / "best.pt").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        train_parta.main(args)
    assert (trained_run.run_dir / "best.pt").read_bytes() == before


# ----------------------------------------------------------------------------- resume (subprocess)
def interrupted_run(
    data_dir: Path, out: Path, name: str, epochs: int, extra: list, after_rows: int = 1
) -> tuple[Path, str]:
    """Start a run, SIGINT it once metrics.csv has `after_rows` rows; returns (run_dir, stderr).

    If the run finished before the signal landed, try again under a new name (rare, slow machines).
    """
    for attempt in range(3):
        run_dir = out / f"{name}{attempt}"
        cmd = [sys.executable, str(REPO / "train_parta.py"), *train_args(data_dir, out, run_dir.name, epochs, *extra)]
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 180
        while (
            proc.poll() is None and len(read_rows(run_dir / "metrics.csv")) < after_rows and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 130:
            return run_dir, err
        assert proc.returncode == 0, err  # finished before the signal: nothing to resume
    pytest.fail("the run always finished before SIGINT arrived")


def resume_matches_uninterrupted(reference, tmp_path, extra):
    """Interrupt a run with the reference's flags mid-epoch, resume it: returns (rows, ref_rows, run_dir, last).

    `last` is last.pt as the interruption left it: it must be mid-epoch (batches_done > 0) with the
    epoch's partial sums, else this would only test an end-of-epoch resume.
    """
    epochs = REF_EPOCHS
    run_dir, err = interrupted_run(reference.data.root, tmp_path, "cut", epochs, extra, after_rows=1)
    assert "interrupted" in err and f"--resume {run_dir}" in err and "Traceback" not in err
    rows_before = read_rows(run_dir / "metrics.csv")
    assert 1 <= len(rows_before) < epochs
    last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == len(rows_before)
    batch = int(reference.args.batch_size)
    steps = len(json.loads((run_dir / "split.json").read_text())["train"]) // batch
    assert 0 < last["batches_done"] < steps + 1, last["batches_done"]  # stopped inside an epoch
    part = last["partial"]
    # the epoch's running sums so far: every finished step counted (the truncated image never reaches a batch)
    assert part["seen"] == last["batches_done"] * batch, part
    assert part["loss"] > 0 and 0 <= part["correct"] <= part["seen"], part

    res = run_cli("train_parta.py", "--resume", run_dir, "--workers", "0", "--wandb", "disabled", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert f"resuming {run_dir} after epoch {len(rows_before)}, batch {last['batches_done']}\n" in res.stdout
    rows = read_rows(run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))  # no duplicates, nothing missing
    assert rows[: len(rows_before)] == rows_before  # history kept as it was
    ref = read_rows(reference.run_dir / "metrics.csv")
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert [round(float(r[key]), 5) for r in rows] == [round(float(r[key]), 5) for r in ref], key
    a = load_checkpoint(run_dir / "last.pt")["model_state"]
    b = load_checkpoint(reference.run_dir / "last.pt")["model_state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=1e-6), k
    return rows, ref, run_dir, last


def test_interrupt_and_resume_equals_uninterrupted_run(plain_reference, tmp_path):
    """No dropout, augmentation or batch norm: the replay depends only on seed, batch order and saved state."""
    resume_matches_uninterrupted(plain_reference, tmp_path, PLAIN_REF_FLAGS)


def test_resume_mid_epoch_with_dropout_and_augmentation_replays_exactly(default_reference, tmp_path):
    """Default flags, batch 4: stopped inside epoch 2, the resumed run equals the uninterrupted one."""
    resume_matches_uninterrupted(default_reference, tmp_path, DEFAULT_REF_FLAGS)


@pytest.mark.parametrize("cache", ["dir", "off"])
def test_truncated_image_is_reported_once_and_training_completes(image_folder, tmp_path, cache):
    # with the decoded cache it is found while the cache is built; with --cache off, in every epoch
    extra = ["--cache", "off"] if cache == "off" else []
    proc = run_cli("train_parta.py", *train_args(image_folder.root, tmp_path, "r", 3, *extra))
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "skipping unreadable image" in ln]
    assert len(warnings) == 1 and str(image_folder.truncated) in warnings[0], proc.stdout + proc.stderr
    assert len(read_rows(tmp_path / "r" / "metrics.csv")) == 3


# ----------------------------------------------------------------------------- W&B without an account
def test_wandb_offline_needs_no_account(tmp_path):
    root = make_dataset(tmp_path / "ds", ["blue", "red"], n_train=8, n_val=2, size=32)
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(HOME=home, XDG_CONFIG_HOME=home / ".config", XDG_CACHE_HOME=home / ".cache")
    env.pop("NETRC", None)
    proc = run_cli(
        "train_parta.py", *train_args(root, tmp_path / "runs", "wb", 1, "--wandb", "offline"), env=env, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "API key" not in out
    offline = list((tmp_path / "runs" / "wb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), out
    assert not (home / ".netrc").exists()


# ----------------------------------------------------------------------------- real photos
@pytest.mark.integration
def test_one_epoch_on_real_photos(tmp_path, imagenette):
    """20 train + 5 val photos per class of Imagenette (224 px JPEGs, some greyscale) at 32 px."""
    root = tmp_path / "imagenette"
    classes = sorted(d.name for d in (imagenette / "train").iterdir() if d.is_dir())
    for split, n in (("train", 20), ("val", 5)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for f in sorted((imagenette / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    args = train_parta.get_args_parser().parse_args(
        train_args(root, tmp_path / "runs", "real", 1, "--filters", "8", "--conv_layers", "3")
    )
    state = train_parta.main(args)
    assert len(state.history) == 1
    row = state.history[0]
    assert 0 <= row["val_acc"] <= 1 and row["train_loss"] == row["train_loss"]
    rows = read_rows(tmp_path / "runs" / "real" / "metrics.csv")
    assert len(rows) == 1
    model, ck = restore_model(tmp_path / "runs" / "real" / "best.pt", torch.device("cpu"))
    assert ck["class_names"] == classes and len(classes) == 10
    metrics = evaluate.main(
        evaluate.get_args_parser().parse_args(
            ["--ckpt", str(tmp_path / "runs" / "real" / "best.pt"), "--workers", "0", "--device", "cpu"]
        )
    )
    assert metrics["n"] == 5 * len(classes)
    assert sum(map(sum, metrics["confusion_matrix"])) == 5 * len(classes)


def test_the_epoch_row_has_one_schema_for_the_csv_the_console_and_wandb(trained_run, tmp_path):
    """cli.EPOCH_ROW: metrics.csv's columns in order, every field on the console line; a row with a key the
    schema lacks is refused rather than reaching W&B alone."""
    from inat_classifier.cli import EPOCH_ROW, METRIC_FIELDS
    from inat_classifier.runs import epoch_line, write_metrics_csv

    assert list(read_rows(trained_run.run_dir / "metrics.csv")[0]) == list(METRIC_FIELDS) == list(EPOCH_ROW)
    history = trained_run.state.history
    assert all(set(row) == set(METRIC_FIELDS) for row in history)
    line = epoch_line(history[0], TRAINED_EPOCHS)
    assert line.startswith(f"epoch   1/{TRAINED_EPOCHS}  train_loss ")
    assert all(name in line for name in METRIC_FIELDS if name not in ("epoch", "epoch_time"))
    assert line.endswith(f"{history[0]['epoch_time']:.1f}s")
    with pytest.raises(ValueError, match="EPOCH_ROW"):
        write_metrics_csv(tmp_path, [{**history[0], "new_metric": 1.0}])
