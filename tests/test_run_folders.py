"""Run folders: one process trains in a folder at a time (an flock the kernel drops with its holder),
clean-up never removes a folder another process holds, and after any failure a command the error names
works (the same command, --resume, or --config ARGS.JSON)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_robustness import Done, poll_until, start_script
from test_signals import needs_tmpfs

import train_parta
from conftest import CLASSES, REPO, assert_one_line_error, clean_env, make_dataset, read_rows, train_args
from inat_classifier.checkpoint import load_checkpoint
from inat_classifier.cli import UserError
from inat_classifier.config_file import parse_args

MACHINE = ["--workers", "0", "--device", "cpu", "--wandb", "disabled"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("folders") / "ds", CLASSES[:2], n_train=8, n_val=2)


def parta(argv: list) -> object:
    return train_parta.main(train_parta.get_args_parser().parse_args([str(a) for a in argv]))


def seed_of(run: Path) -> tuple[int, int]:
    """The seed args.json and last.pt say the folder's run was started with."""
    return json.loads((run / "args.json").read_text())["seed"], load_checkpoint(run / "last.pt")["config"]["seed"]


def while_stopped(proc, then):
    """then() while proc is stopped (SIGSTOP) where it stands: it holds what it holds, and does nothing."""
    os.kill(proc.p.pid, signal.SIGSTOP)
    try:
        return then()
    finally:
        os.kill(proc.p.pid, signal.SIGCONT)


# ----------------------------------------------------------------------------- one process per folder
def test_starts_into_a_folder_in_use_are_one_line_naming_the_process_and_remove_nothing(data, tmp_path):
    """The first start is stopped after making its folder, before its first checkpoint; two more starts
    with the same --run_name (one that would train, one that fails and cleans up) must leave it alone."""
    out, run = tmp_path / "runs", tmp_path / "runs" / "r"
    (tmp_path / "file").write_text("a file where the cache folder should be")
    first = start_script("train_parta.py", train_args(data, out, "r", 2, "--seed", "1"), tmp_path / "first")
    poll_until(lambda: (run / "args.json").exists(), first)

    def more_starts() -> list[Done]:
        others = [
            start_script("train_parta.py", train_args(data, out, "r", 2, "--seed", "2", *extra), tmp_path / f"other{i}")
            for i, extra in enumerate([[], ["--cache", tmp_path / "file"]])
        ]
        return [p.wait() for p in others]

    for other in while_stopped(first, more_starts):
        assert_one_line_error(other, f"run folder {run} is in use: process {first.p.pid} on ", "is training in it")
    done = first.wait()
    assert done.returncode == 0, done.stderr
    assert seed_of(run) == (1, 1) and len(read_rows(run / "metrics.csv")) == 2


def test_two_starts_of_one_run_name_moments_apart_train_once(data, tmp_path):
    out, run = tmp_path / "runs", tmp_path / "runs" / "r"
    procs = []
    for seed in (1, 2):
        procs.append(
            start_script("train_parta.py", train_args(data, out, "r", 12, "--seed", seed), tmp_path / f"p{seed}")
        )
        time.sleep(0.1)
    done = [p.wait() for p in procs]
    (winner,) = [i for i, d in enumerate(done) if d.returncode == 0]
    assert_one_line_error(done[1 - winner], f"run folder {run} is in use: process {procs[winner].p.pid} on ")
    assert seed_of(run) == (winner + 1, winner + 1) and len(read_rows(run / "metrics.csv")) == 12


def test_resume_of_a_folder_in_use_is_refused_and_a_killed_holder_leaves_no_lock(data, tmp_path):
    run = tmp_path / "runs" / "r"
    parta(train_args(data, tmp_path / "runs", "r", 1))
    first = start_script("train_parta.py", ["--resume", run, "--epochs", "30", *MACHINE], tmp_path / "first")
    poll_until(lambda: "resuming" in first.out_path.read_text(), first)
    second = while_stopped(
        first,
        lambda: start_script(
            "train_parta.py", ["--resume", run, "--epochs", "30", *MACHINE], tmp_path / "second"
        ).wait(),
    )
    assert_one_line_error(second, f"run folder {run} is in use: process {first.p.pid} on ")
    os.kill(first.p.pid, signal.SIGKILL)  # the kernel drops its lock
    first.wait()
    trained = load_checkpoint(run / "last.pt")["epoch"]
    state = parta(["--resume", run, "--epochs", trained + 1, *MACHINE])
    assert state.epoch == trained + 1


# ----------------------------------------------------------------------------- no dead end after a failure
def leave_best_pt_alone(run: Path) -> None:
    """What a run refused its first last.pt (full disk) leaves: best.pt, no training state."""
    for name in ("last.pt", "metrics.csv", "curves.png", "result.json"):
        (run / name).unlink(missing_ok=True)


def test_a_best_pt_without_last_pt_starts_over_by_either_command(data, tmp_path):
    out, run = tmp_path / "runs", tmp_path / "runs" / "r"
    parta(train_args(data, out, "r", 1))
    leave_best_pt_alone(run)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert parta(train_args(data, out, "r", 1)).epoch == 1  # the same command
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert parta(["--resume", copy, *MACHINE]).epoch == 1
    assert load_checkpoint(copy / "last.pt")["epoch"] == 1


def test_trained_epochs_without_last_pt_name_a_command_that_works(data, tmp_path):
    out, run = tmp_path / "runs", tmp_path / "runs" / "r"
    parta(train_args(data, out, "r", 1))
    (run / "last.pt").unlink()
    for argv in (["--resume", run, *MACHINE], train_args(data, out, "r", 1)):
        with pytest.raises(UserError, match="no last.pt to resume from") as e:
            parta(argv)
        assert f"--config {run / 'args.json'}" in str(e.value)
    argv = ["--config", str(run / "args.json"), "--run_name", "again"]
    state = train_parta.main(parse_args(train_parta.get_args_parser(), argv))
    assert state.epoch == 1 and (out / "again" / "last.pt").is_file()


def in_small_disk(folder: Path, megabytes: int, commands: list[list], logs: Path) -> list[Done]:
    """Run commands one after the other with a tmpfs of this size on folder, made 16x larger after the
    first (space freed), in a private mount namespace: what the folder holds is gone afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    lines = [f"mount -t tmpfs -o size={megabytes}m tmpfs {shlex.quote(str(folder))} || exit 99"]
    for i, argv in enumerate(commands):
        if i == 1:
            lines.append(f"mount -o remount,size={16 * megabytes}m {shlex.quote(str(folder))}")
        lines.append(f"{shlex.join(map(str, argv))} >{logs}/{i}.out 2>{logs}/{i}.err; echo $? >{logs}/{i}.rc")
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "\n".join(lines)],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr
    return [
        Done(int((logs / f"{i}.rc").read_text()), (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text())
        for i in range(len(commands))
    ]


@needs_tmpfs
def test_a_full_disk_after_best_pt_leaves_the_named_commands_working(data, tmp_path):
    """best.pt (~6 MB) fits on the 16 MB disk, last.pt (~19 MB) does not; after space is freed, the
    same command and --resume (of a copy) each train the run."""
    out = tmp_path / "small"
    run, copy = out / "r", out / "copy"
    args = [
        sys.executable,
        REPO / "train_parta.py",
        *train_args(data, out, "r", 1, "--pool", "flatten", "--dense_neurons", "2048", "--cache", "off"),
    ]
    resume = [sys.executable, REPO / "train_parta.py", "--resume", copy, *MACHINE]
    failed, copied, same, resumed = in_small_disk(
        out, 16, [args, ["cp", "-a", run, copy], args, resume], tmp_path / "logs"
    )
    assert_one_line_error(
        failed,
        f"not enough disk space in {run} for last.pt",
        f"the same command or --resume {run} starts it over from epoch 1",
    )
    assert copied.returncode == 0, copied.stderr
    for done in (same, resumed):
        assert done.returncode == 0, done.stdout + done.stderr
        assert "run folder:" in done.stdout and "Traceback" not in done.stderr
