"""Messages that say what is wrong: unreadable folders, full disks, odd flags, F1 without a class, late signals.

Each one used to mislead (an empty class, a bare errno, "not found", a C++ overflow, a class
counted as F1 0, exit code -15); the tests run the scripts or the module that speaks.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from test_signals import needs_tmpfs, on_small_disk

import train_parta
import train_partb
from conftest import CLASSES, REPO, assert_one_line_error, clean_env, make_dataset, train_args
from inat_classifier.cli import UserError
from inat_classifier.metrics import classification_metrics, print_report
from models import build_backbone

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def runs_as_nobody() -> bool:
    try:
        probe = subprocess.run(
            [*NOBODY, sys.executable, "-c", "import torch"], cwd=REPO, capture_output=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


# ----------------------------------------------------------------------------- unreadable class folder
@pytest.mark.skipif(not runs_as_nobody(), reason="needs setpriv and a Python another user may run")
def test_a_class_folder_nobody_may_read_is_named_as_unreadable_not_empty():
    """Root reads a mode-000 folder anyway, so the script runs as another user (pytest's tmp is private)."""
    top = Path(tempfile.mkdtemp())
    try:
        top.chmod(0o755)
        data = make_dataset(top / "ds", CLASSES[:2], n_train=3, n_val=1)
        locked = data / "train" / CLASSES[0]
        locked.chmod(0o000)
        cmd = [
            *NOBODY,
            sys.executable,
            str(REPO / "train_parta.py"),
            *train_args(data, top / "runs", "r", 1, "--cache", "off"),
        ]
        done = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
        line = assert_one_line_error(done, str(locked), "cannot be read", "Permission denied")
        assert "has no images" not in line
        assert done.returncode == 2
    finally:
        for d in top.rglob("*"):
            if d.is_dir():
                d.chmod(0o755)
        shutil.rmtree(top, ignore_errors=True)


# ----------------------------------------------------------------------------- a full --out_dir
def on_full_disk(folder: Path, argv: list) -> subprocess.CompletedProcess:
    """Run argv with a fresh 1 MiB tmpfs on folder (seen by this process alone), filled up to the last byte."""
    fill = 'cat /dev/zero > "$0/filler" 2>/dev/null; exec "$@"'
    return on_small_disk(folder, 1, ["sh", "-c", fill, folder, *argv])


@needs_tmpfs
def test_a_full_out_dir_is_one_line_naming_the_folder_and_sizes(tmp_path):
    data = make_dataset(tmp_path / "ds", CLASSES[:2], n_train=3, n_val=1)
    out = tmp_path / "full"
    done = on_full_disk(
        out, [sys.executable, REPO / "train_parta.py", *train_args(data, out, "r", 1, "--cache", "off")]
    )
    line = assert_one_line_error(done, f"not enough disk space in {out / 'r'}", "split.json", "free")
    assert "Errno" not in line and done.returncode == 2


WRITERS = """
import sys
from pathlib import Path
import argparse
import data
from inat_classifier import figures, metrics, runs, storage, tracking
folder = Path(sys.argv[1]) / "run"
photos = argparse.Namespace(command="stats", data_dir=sys.argv[2], json=str(folder / "stats.json"))
folder.mkdir()
row = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5, "lr": 0.1, "epoch_time": 1.0}
writers = {
    "metrics.csv": lambda: runs.write_metrics_csv(folder, [row]),
    "curves.png": lambda: tracking.plot_curves({"r": [row]}, folder / "curves.png"),
    "result.json": lambda: runs.write_result(folder, 1, 0.5, 1),
    "confusion_matrix.png": lambda: metrics.plot_confusion(
        [[1, 0], [0, 1]], ["a", "b"], folder / "confusion_matrix.png"
    ),
    "eval.json": lambda: storage.atomic_write_text(folder / "eval.json", "{}"),
    "gradcam.png": lambda: figures.save_figure(figures.pyplot().figure(), folder / "gradcam.png", 50),
    "stats.json": lambda: data.main(photos),
}
for name, write in writers.items():
    try:
        write()
        print(name, "WROTE")
    except Exception as e:
        print(name, type(e).__name__, e)
"""


FULL_DISK_FILES = {
    "metrics.csv",
    "curves.png",
    "result.json",
    "confusion_matrix.png",
    "eval.json",
    "gradcam.png",
    "stats.json",
}


@needs_tmpfs
def test_every_run_file_on_a_full_disk_is_the_one_line_error(tmp_path):
    out = tmp_path / "full"
    photos = make_dataset(tmp_path / "ds", CLASSES[:2], n_train=2, n_val=1)
    done = on_full_disk(out, [sys.executable, "-c", WRITERS, out, photos])
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.split(" ", 1)[0] in FULL_DISK_FILES)
    assert set(lines) == FULL_DISK_FILES, done
    for name, said in lines.items():
        assert said.startswith(f"UserError not enough disk space in {out / 'run'} for {name}: needs "), said
        assert "free; free some space" in said, said


# ----------------------------------------------------------------------------- --weights
def test_weights_naming_a_folder_says_it_is_a_folder(tmp_path, monkeypatch):
    (tmp_path / "r18").mkdir()
    monkeypatch.chdir(tmp_path)
    for given in (str(tmp_path / "r18"), "r18"):  # a path, and a bare name that is a folder here
        with pytest.raises(ValueError, match="is a folder; expected a weights file") as e:
            build_backbone("resnet18", given, 2)
        assert "not found" not in str(e.value)


def test_unknown_weights_list_default_once():
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET9K'") as e:
        build_backbone("resnet18", "IMAGENET9K", 2)
    assert str(e.value).count("DEFAULT") == 1, e.value
    assert "IMAGENET1K_V1" in str(e.value)


# ----------------------------------------------------------------------------- --seed
@pytest.mark.parametrize("script", [train_parta, train_partb])
@pytest.mark.parametrize("seed", ["100000000000000000000", "-1", "4294967296"])
def test_a_seed_out_of_range_names_the_range(script, seed, tmp_path):
    args = script.get_args_parser().parse_args(["--seed", seed, "--data_dir", str(tmp_path / "none")])
    with pytest.raises(UserError, match=r"^--seed must be an integer in \[0, 4294967295\], got -?\d+$"):
        script.main(args)


def test_the_largest_seed_trains(tmp_path):
    data = make_dataset(tmp_path / "ds", CLASSES[:2], n_train=3, n_val=1)
    args = train_parta.get_args_parser().parse_args(
        train_args(data, tmp_path, "r", 1, "--seed", "4294967295", "--cache", "off")
    )
    assert train_parta.main(args).epoch == 1


# ----------------------------------------------------------------------------- macro F1
def test_a_class_without_test_photos_is_left_out_of_macro_f1_and_named(capsys):
    # a: 2 right; b: 1 right, 1 taken for a; c: no test photo at all (support 0)
    cm = torch.tensor([[2, 0, 0], [1, 1, 0], [0, 0, 0]])
    m = classification_metrics(cm, ["a", "b", "c"])
    f1_a, f1_b = 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)
    assert m["macro_f1_excluded"] == ["c"] and m["per_class"]["c"]["support"] == 0
    print_report(m, "t")
    out = capsys.readouterr().out
    assert "macro F1 over 2 of 3 classes: c has no readable test photo (support 0)" in out
    full = classification_metrics(torch.tensor([[2, 0], [1, 1]]), ["a", "b"])
    assert full["macro_f1_excluded"] == [] and full["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)


# ----------------------------------------------------------------------------- signals as a finished run exits
STAND_IN = """
import sys, threading, time
sys.path.insert(0, sys.argv[1])
from inat_classifier import startup
startup.stop_quietly()
import argparse
from inat_classifier import cli

class SlowTeardown:  # like a library object whose cleanup runs while the interpreter finalizes
    def __del__(self):
        print("exiting", flush=True)
        time.sleep(1.5)

keep = SlowTeardown()

def main(args):
    if sys.argv[2] == "thread":  # like W&B's last upload: a thread the exit waits for
        threading.Thread(target=time.sleep, args=(1.5,)).start()
        print("exiting", flush=True)

cli.run_cli(main, argparse.ArgumentParser(), [])
"""


@pytest.mark.parametrize("moment", ["thread", "teardown"])
def test_sigterm_after_the_work_finished_exits_0(moment):
    proc = subprocess.Popen(
        [sys.executable, "-c", STAND_IN, str(REPO), moment],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "exiting"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, (proc.returncode, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) <= 1, err
    if moment == "thread":  # Python still runs handlers: it says why it stopped waiting
        assert lines == ["SIGTERM after the work finished: exiting; everything it wrote is complete"], err


# ----------------------------------------------------------------------------- how a torchrun process ends
ENDING = """
import atexit, sys, threading, time
sys.path.insert(0, sys.argv[1])
import argparse
from inat_classifier import cli

class FreedInTeardown:  # like gloo's process group, which outlives destroy_process_group
    def __del__(self):
        print("teardown", flush=True)

keep = FreedInTeardown()
atexit.register(print, "exit handler", flush=True)

def main(args):
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread joined", flush=True))).start()
    print("work done", flush=True)
    if sys.argv[2] == "error":
        raise cli.UserError("bad input")

cli.run_cli(main, argparse.ArgumentParser(), [])
"""


@pytest.mark.parametrize("world_size,ending", [("1", "success"), ("2", "success"), ("2", "error")])
def test_a_torchrun_process_ends_after_its_exit_handlers_without_the_interpreter_teardown(world_size, ending):
    proc = subprocess.run(
        [sys.executable, "-c", ENDING, str(REPO), ending],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=clean_env(WORLD_SIZE=world_size, RANK="0"),
        timeout=60,
    )
    assert proc.returncode == (0 if ending == "success" else 2), proc.stderr
    assert proc.stderr.strip() == ("" if ending == "success" else "error: bad input")
    torn_down = ["teardown"] if world_size == "1" else []  # where gloo's late threads would abort the process
    assert proc.stdout.splitlines() == ["work done", "thread joined", "exit handler", *torn_down], proc.stdout
