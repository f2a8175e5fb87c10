"""A sweep's journal on a disk that fills up: the runner stops with one line, the journal keeps only whole lines
and the run's last.pt, and once there is space again the next runner continues the run. A torn last line
(a write cut short before this) is set aside, never appended to. The full disk is a real small tmpfs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_sweep import runs_of, start_runner, wait_for, write_yaml

from inat_classifier.runs import read_metrics_csv

REPO = Path(__file__).resolve().parents[1]

# A trainer that writes like train_parta.py: last.pt and metrics.csv through a temp file renamed into place, a
# full disk as one 'error:' line and exit 2, --resume from last.pt.
FAKE_ATOMIC = r"""
import argparse, csv, json, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--q", type=float, default=0.5); p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--epochs", type=int, default=2); p.add_argument("--pad", type=int, default=0)
p.add_argument("--out_dir"); p.add_argument("--run_name"); p.add_argument("--wandb"); p.add_argument("--resume")
a = p.parse_args()
run = a.resume or os.path.join(a.out_dir, a.run_name)
def atomic(path, text):
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text); f.flush(); os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        sys.exit("error: not enough disk space in %s for %s (%s)" % (run, os.path.basename(path), e.strerror))
os.makedirs(run, exist_ok=True)
rows = json.load(open(run + "/last.pt"))["rows"] if a.resume and os.path.exists(run + "/last.pt") else []
for e in range(len(rows) + 1, a.epochs + 1):
    time.sleep(a.sleep)
    rows.append({"epoch": e, "train_loss": 1, "val_acc": a.q * e / a.epochs})
    atomic(run + "/metrics.csv", "epoch,train_loss,val_acc\n" + "".join(
        "%d,%s,%s\n" % (r["epoch"], r["train_loss"], r["val_acc"]) for r in rows))
    atomic(run + "/last.pt", json.dumps({"rows": rows, "pad": "x" * a.pad}))
atomic(run + "/result.json", json.dumps({"epochs": len(rows)}))
print("run folder: " + run)
"""


def mount_tmpfs(folder: Path, size: str) -> None:
    """A real small filesystem at folder (root mounts a tmpfs), else the test is skipped."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs, unmounted afterwards."""
    folder = tmp_path / "disk"
    mount_tmpfs(folder, "6m")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill folder's filesystem to the last byte; the filler file, to remove for space again."""
    filler = folder / f"filler-{uuid.uuid4().hex}"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    return filler


def journal_lines(journal: Path) -> list[dict]:
    """Every line of the journal parsed: a torn or joined line fails here."""
    data = journal.read_bytes()
    assert data.endswith(b"\n"), data[-200:]
    return [json.loads(line) for line in data.splitlines()]


def show(sweep_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "sweep_offline.py"), "--sweep_dir", str(sweep_dir), "--show"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def atomic_sweep(tmp_path: Path, epochs: int, sleep: float, pad: int = 0) -> Path:
    (tmp_path / "fake_atomic.py").write_text(FAKE_ATOMIC)
    cfg = {
        "program": "fake_atomic.py",
        "method": "grid",
        "metric": {"name": "val_acc", "goal": "maximize"},
        "parameters": {
            "q": {"values": [0.3, 0.6]},
            "epochs": {"value": epochs},
            "sleep": {"value": sleep},
            "pad": {"value": pad},
        },
    }
    return write_yaml(tmp_path / "atomic.yaml", cfg)


FAST = ["--poll_s", "0.1", "--stale_s", "60", "--quiet"]


def test_a_disk_that_fills_during_a_run_stops_the_runner_in_one_line_and_the_run_continues(small_disk, tmp_path):
    cfg = atomic_sweep(tmp_path, epochs=12, sleep=0.3, pad=20000)
    sweep_dir = small_disk / "s"
    run_dir = sweep_dir / "runs" / "run-000"
    runner = start_runner("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", *FAST, cwd=tmp_path)
    wait_for(lambda: (run_dir / "last.pt").is_file() and len(read_metrics_csv(run_dir / "metrics.csv")) >= 2, 120)
    filler = fill(small_disk)
    out = runner.communicate(timeout=120)[0]
    assert runner.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "disk space" in errors[0] and "needs" in errors[0], out  # the space it needs
    assert "run-000" in errors[0] and "continue" in errors[0], errors
    lines = journal_lines(sweep_dir / "optuna.journal")  # only whole records
    done = len(json.loads((run_dir / "last.pt").read_text())["rows"])  # intact
    assert done >= 2
    filler.unlink()
    again = start_runner("--sweep_dir", sweep_dir, "--count", "1", *FAST, cwd=tmp_path)
    out = again.communicate(timeout=120)[0]
    assert again.returncode == 0, out
    assert "resuming it after epoch" in out and "its runner stopped" in out, out
    assert [r["epoch"] for r in read_metrics_csv(run_dir / "metrics.csv")] == list(range(1, 13))
    assert runs_of(sweep_dir)["run-000"]["state"] == "COMPLETE"
    assert len(journal_lines(sweep_dir / "optuna.journal")) > len(lines)
    shown = show(sweep_dir, tmp_path)
    assert shown.returncode == 0 and "run-000" in shown.stdout, shown.stdout + shown.stderr


def test_a_full_disk_before_a_run_is_one_line_naming_the_space_needed(small_disk, tmp_path):
    cfg = atomic_sweep(tmp_path, epochs=1, sleep=0.0)
    sweep_dir = small_disk / "s"
    first = start_runner("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", *FAST, cwd=tmp_path)
    assert first.wait(timeout=120) == 0, first.communicate()[0]
    before = (sweep_dir / "optuna.journal").read_bytes()
    filler = fill(small_disk)
    full = subprocess.run(
        [sys.executable, str(REPO / "sweep_offline.py"), "--sweep_dir", str(sweep_dir), "--count", "1", *FAST],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stdout + full.stderr
    (line,) = full.stderr.strip().splitlines()
    assert line.startswith("error:") and "disk space" in line and "needs" in line, line
    assert (sweep_dir / "optuna.journal").read_bytes() == before  # untouched, whatever it was appending
    filler.unlink()
    again = start_runner("--sweep_dir", sweep_dir, "--count", "1", *FAST, cwd=tmp_path)
    out = again.communicate(timeout=120)[0]
    assert again.returncode == 0, out
    assert sorted(r["state"] for r in runs_of(sweep_dir).values()) == ["COMPLETE", "COMPLETE"], out


def test_a_torn_last_line_is_set_aside_before_the_next_append(tmp_path):
    """What a write cut short left behind (a full disk, a kill): the next runner keeps it aside, never appends to it."""
    cfg = atomic_sweep(tmp_path, epochs=1, sleep=0.0)
    sweep_dir = tmp_path / "s"
    first = start_runner("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", *FAST, cwd=tmp_path)
    assert first.wait(timeout=120) == 0, first.communicate()[0]
    journal = sweep_dir / "optuna.journal"
    torn = b'{"op_code":8,"worker_id":"x","trial_id":0,"user_attr":{"heartb'
    with open(journal, "ab") as f:
        f.write(torn)
    assert show(sweep_dir, tmp_path).returncode == 0  # Optuna reads past a torn last line
    again = start_runner("--sweep_dir", sweep_dir, "--count", "1", *FAST, cwd=tmp_path)
    out = again.communicate(timeout=120)[0]
    assert again.returncode == 0, out
    (said,) = [line for line in out.splitlines() if "cut off" in line]
    (aside,) = sweep_dir.glob("optuna.journal.torn-*")
    assert aside.name in said and aside.read_bytes() == torn
    journal_lines(journal)
    shown = show(sweep_dir, tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert sorted(r["state"] for r in runs_of(sweep_dir).values()) == ["COMPLETE", "COMPLETE"]


def test_a_trainer_stopped_by_a_full_disk_is_said_so_and_continues_once_there_is_space(small_disk, tmp_path):
    """The trainer's checkpoint does not fit (the journal still does): one line saying so, not 'rejected'."""
    cfg = atomic_sweep(tmp_path, epochs=3, sleep=0.0, pad=3_200_000)  # 3.2 MB last.pt: its next copy does not fit
    sweep_dir = small_disk / "s"
    run_dir = sweep_dir / "runs" / "run-000"
    full = subprocess.run(
        [sys.executable, str(REPO / "sweep_offline.py"), "--config", str(cfg), "--sweep_dir", str(sweep_dir)]
        + ["--count", "1", *FAST],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stdout + full.stderr
    (line,) = full.stderr.strip().splitlines()
    assert "run-000 stopped" in line and "disk space" in line and "rejected" not in line, line
    assert json.loads((run_dir / "last.pt").read_text())["rows"][0]["epoch"] == 1  # intact
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    again = start_runner("--sweep_dir", sweep_dir, "--count", "1", *FAST, cwd=tmp_path)
    out = again.communicate(timeout=120)[0]
    assert again.returncode == 0 and "resuming it after epoch" in out, out
    assert runs_of(sweep_dir)["run-000"]["state"] == "COMPLETE"
