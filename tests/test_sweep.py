"""sweep_offline.py on Optuna: runs train, rank, fail, get pruned, resume, and are shared by several runners on one
journal file, with exactly the argv `wandb agent` would pass. Stand-in trainers keep it fast and deterministic."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from PIL import Image
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

import sweep_offline
import train_parta
from conftest import assert_one_line_error, clean_env, make_dataset, run_cli
from inat_classifier.cli import UserError
from inat_classifier.runs import read_metrics_csv
from inat_classifier.sweep.runner import newest_trials
from inat_classifier.sweep.storage import create_study

REPO = Path(__file__).resolve().parents[1]


def sweep_config() -> dict:
    return yaml.safe_load((REPO / "sweep.yaml").read_text())


def agent_args(values: dict) -> list[str]:
    return create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]


def study_of(sweep_dir: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna.journal"))
    )
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def runs_of(sweep_dir: Path) -> dict[str, dict]:
    """Each run's newest trial as a dict: name -> state, value, attrs."""
    out = {}
    for folder, t in newest_trials(study_of(sweep_dir)).items():
        out[Path(folder).name] = {
            "state": t.state.name,
            "value": t.value,
            "attrs": t.user_attrs,
            "params": t.params,
            "number": t.number,
        }
    return out


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """ImageFolder of coloured 32 px JPEGs: 3 classes x 12 train images, 3 x 3 in val/."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    colours = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}
    for split, n in (("train", 12), ("val", 3)):
        for cls, rgb in colours.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-40, 40, (32, 32, 3))
                pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{cls}_{i:02d}.jpg", quality=90)
    return root


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tiny_sweep_config() -> dict:
    """sweep.yaml scaled to the fixture: 32 px, one epoch, few filters."""
    cfg = sweep_config()
    cfg["method"] = "random"
    cfg["parameters"].update(
        filters={"values": [4, 8]},
        dense_neurons={"values": [16, 32]},
        batch_size={"values": [8, 16]},
        epochs={"value": 1},
        image_size={"value": 32},
    )
    return cfg


def read_leaderboard(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "leaderboard.csv", newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- stand-in trainers
FAKE_TRAIN = r"""
import argparse, csv, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--q", type=float, required=True)
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--out_dir"); p.add_argument("--run_name"); p.add_argument("--wandb")
a = p.parse_args()
if a.q < 0:
    sys.exit("error: q must be >= 0")
run = os.path.join(a.out_dir, a.run_name)
os.makedirs(run)
rows = []
for e in range(1, a.epochs + 1):
    time.sleep(a.sleep)
    rows.append({"epoch": e, "train_loss": 1, "train_acc": a.q, "val_loss": 1, "val_acc": a.q * e / a.epochs,
                 "lr": 0.1, "epoch_time": a.sleep})
    with open(run + "/.m", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader(); w.writerows(rows)
    os.replace(run + "/.m", run + "/metrics.csv")
print("run folder: " + run)
"""


def fake_sweep(tmp_path: Path, method: str, q_values: list, extra_params: dict | None = None, **top) -> Path:
    """A sweep of the stand-in trainer FAKE_TRAIN: val_acc = q * epoch / epochs."""
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    params = {"q": {"values": q_values}, **(extra_params or {})}
    cfg = {
        "program": "fake_train.py",
        "method": method,
        "metric": {"name": "val_acc", "goal": "maximize"},
        "parameters": params,
        **top,
    }
    return write_yaml(tmp_path / "fake.yaml", cfg)


# A trainer that behaves like train_parta.py where the runner can tell: last.pt on SIGTERM (exit 130), --resume
# from it, result.json once complete; --linger keeps it alive after that (say, a slow W&B sync). Any other
# flag is accepted, so that a parameter can have any name.
FAKE_RESUMABLE = r"""
import argparse, csv, json, os, signal, sys, time
p = argparse.ArgumentParser()
for flag in ("--q", "--sleep", "--linger"):
    p.add_argument(flag, type=float, default=0.0)
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--out_dir"); p.add_argument("--run_name"); p.add_argument("--wandb"); p.add_argument("--resume")
a, _ = p.parse_known_args()
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
run = a.resume or os.path.join(a.out_dir, a.run_name)
if os.path.exists(run) and not a.resume:
    sys.exit("error: run folder %s already exists; pass --resume" % run)
os.makedirs(run, exist_ok=True)
rows = json.load(open(run + "/last.pt"))["rows"] if a.resume and os.path.exists(run + "/last.pt") else []
if a.resume:
    print("resuming after epoch %d" % len(rows))
for e in range(len(rows) + 1, a.epochs + 1):
    t = time.time()
    while time.time() - t < a.sleep and not stop:
        time.sleep(0.01)
    rows.append({"epoch": e, "train_loss": 1, "val_acc": a.q * e / a.epochs})
    with open(run + "/metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
    json.dump({"rows": rows}, open(run + "/last.pt", "w"))
    if stop:
        print("interrupted: progress is in last.pt"); sys.exit(130)
json.dump({"epochs": len(rows)}, open(run + "/result.json", "w"))
print("run folder: " + run)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
time.sleep(a.linger)
"""


def resumable_sweep(
    tmp_path: Path, q_values: list, extra_params: dict | None = None, metric: str = "val_acc", method: str = "grid"
) -> Path:
    (tmp_path / "fake_resumable.py").write_text(FAKE_RESUMABLE)
    cfg = {
        "program": "fake_resumable.py",
        "method": method,
        "metric": {"name": metric, "goal": "maximize"},
        "parameters": {"q": {"values": q_values}, **(extra_params or {})},
    }
    return write_yaml(tmp_path / "resumable.yaml", cfg)


# ----------------------------------------------------------------------------- real training
def test_offline_random_sweep_ranks_resumes_and_writes_the_best_config(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # runs inherit it: one torch thread is fastest on 2 shared cores
    cfg_path = write_yaml(tmp_path / "tiny_sweep.yaml", tiny_sweep_config())
    sweep_dir = tmp_path / "sweep"
    extra = ["--", "--data_dir", str(tiny_data), "--workers", "0", "--device", "cpu"]
    code = sweep_offline.main(
        sweep_offline.parse_args(
            ["--config", str(cfg_path), "--sweep_dir", str(sweep_dir), "--count", "2", "--seed", "0", "--quiet", *extra]
        )
    )
    assert code == 0
    board = read_leaderboard(sweep_dir)
    assert [r["rank"] for r in board] == ["1", "2"] and all(r["state"] == "complete" for r in board), board
    accs = [float(r["val_acc"]) for r in board]
    assert accs == sorted(accs, reverse=True)
    runs = runs_of(sweep_dir)
    for name, run in runs.items():
        values = {k: v["value"] for k, v in run["attrs"]["run_config"].items()}
        command = (sweep_dir / "logs" / f"{name}.log").read_text().splitlines()[0][2:].split(" ")
        n = len(values)
        assert command[3 : 3 + n] == agent_args(values)  # exactly what wandb agent passes
        assert command[3 + n :] == [
            "--out_dir",
            str(sweep_dir / "runs"),
            "--run_name",
            name,
            "--wandb",
            "disabled",
            *extra[1:],
        ]
        best = max(r["val_acc"] for r in read_metrics_csv(sweep_dir / "runs" / name / "metrics.csv"))
        assert run["value"] == pytest.approx(best)
    # continuing: one more run, numbered after the others, with the sweep's last -- flags
    assert sweep_offline.main(sweep_offline.parse_args(["--sweep_dir", str(sweep_dir), "--count", "1", "--quiet"])) == 0
    assert sorted(runs_of(sweep_dir)) == ["run-000", "run-001", "run-002"]
    # --show: the best run's command and best.yaml, which --config turns back into that run's flags
    capsys.readouterr()
    assert sweep_offline.main(sweep_offline.parse_args(["--sweep_dir", str(sweep_dir), "--show"])) == 0
    out = capsys.readouterr().out
    best_name = read_leaderboard(sweep_dir)[0]["run"]
    assert f"best run: {best_name}" in out and f"--config {sweep_dir / 'best.yaml'} --epochs 30" in out
    from inat_classifier import config_file

    again = config_file.parse_args(
        train_parta.get_args_parser(), ["--config", str(sweep_dir / "best.yaml"), "--epochs", "30"]
    )
    import json

    flags = json.loads((sweep_dir / "runs" / best_name / "args.json").read_text())
    for key in ("filters", "lr", "activation", "batch_norm", "data_dir", "image_size"):
        assert getattr(again, key) == flags[key], key
    assert again.epochs == 30


# ----------------------------------------------------------------------------- runner logic (stand-ins)
def run_sweep(*argv) -> int:
    return sweep_offline.main(sweep_offline.parse_args([str(a) for a in argv]))


def test_failed_run_is_recorded_and_grid_completes(tmp_path, capsys):
    cfg = fake_sweep(tmp_path, "grid", [0.5, -1, 0.9])
    sweep_dir = tmp_path / "s"
    assert run_sweep("--config", cfg, "--sweep_dir", sweep_dir, "--count", "5", "--quiet") == 0
    board = read_leaderboard(sweep_dir)
    assert sorted((r["q"], r["state"]) for r in board) == [("-1", "fail"), ("0.5", "complete"), ("0.9", "complete")]
    assert board[0]["q"] == "0.9" and "q must be >= 0" in board[2]["note"]
    assert "grid search complete" in capsys.readouterr().out
    other = write_yaml(tmp_path / "other.yaml", dict(yaml.safe_load(cfg.read_text()), method="random"))
    with pytest.raises(UserError, match="differs"):  # the sweep's config is fixed once started
        run_sweep("--config", other, "--sweep_dir", sweep_dir)


def test_hyperband_prunes_the_run_that_is_behind_at_min_iter(tmp_path):
    cfg = fake_sweep(
        tmp_path,
        "grid",
        [0.9, 0.1, 0.95],
        {"epochs": {"value": 6}, "sleep": {"value": 0.1}},
        early_terminate={"type": "hyperband", "min_iter": 1, "max_iter": 2, "eta": 3},
    )
    sweep_dir = tmp_path / "s"
    assert run_sweep("--config", cfg, "--sweep_dir", sweep_dir, "--count", "3", "--quiet", "--poll_s", "0.05") == 0
    runs = sorted(runs_of(sweep_dir).values(), key=lambda r: r["number"])
    by_q = {r["params"]["q"]: r for r in runs}
    assert runs[0]["state"] == "COMPLETE"  # the first has nothing to be behind
    assert by_q[0.1]["state"] == "PRUNED", by_q
    assert csv_rows(sweep_dir / by_q[0.1]["attrs"]["run_dir"] / "metrics.csv") < 6
    assert by_q[0.95]["state"] == "COMPLETE"  # ahead of every other run at every epoch
    board = {r["run"]: r for r in read_leaderboard(sweep_dir)}
    assert "pruned by hyperband" in board[Path(by_q[0.1]["attrs"]["run_dir"]).name]["note"]


def start_runner(*args, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(REPO / "sweep_offline.py"), *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_runners_on_one_journal_train_each_grid_point_once(tmp_path):
    cfg = fake_sweep(tmp_path, "grid", [0.1, 0.2, 0.3], {"sleep": {"values": [0.05, 0.1]}})
    sweep_dir = tmp_path / "s"
    runners = [
        start_runner(
            "--config", cfg, "--sweep_dir", sweep_dir, "--count", "10", "--quiet", "--poll_s", "0.05", cwd=tmp_path
        )
        for _ in range(2)
    ]
    outputs = [r.communicate(timeout=300)[0] for r in runners]
    assert [r.returncode for r in runners] == [0, 0], outputs
    runs = runs_of(sweep_dir)
    points = sorted((r["params"]["q"], r["params"]["sleep"]) for r in runs.values())
    assert points == sorted((q, s) for q in (0.1, 0.2, 0.3) for s in (0.05, 0.1))  # 6 runs, each point once
    assert all(r["state"] == "COMPLETE" for r in runs.values())
    assert len(list((sweep_dir / "runs").iterdir())) == 6
    assert all("grid search complete" in out for out in outputs)


def test_a_runner_opening_a_sweep_as_another_creates_it_waits_for_its_config(tmp_path, monkeypatch):
    """The race two runners started together run: one creates the study, the other opens it before its config."""
    cfg = fake_sweep(tmp_path, "grid", [0.4])
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna.journal"))
    )
    optuna.create_study(storage=storage, study_name="s", direction="maximize")  # created, its config not yet written
    attrs = {
        "config": yaml.safe_load(cfg.read_text()),
        "config_file": str(cfg),
        "metric": "val_acc",
        "goal": "maximize",
    }
    writer = threading.Timer(0.5, create_study, (storage, "s", "maximize", attrs))
    writer.start()
    monkeypatch.chdir(tmp_path)
    try:
        assert (
            sweep_offline.main(sweep_offline.parse_args(["--sweep_dir", str(sweep_dir), "--count", "1", "--quiet"]))
            == 0
        )
    finally:
        writer.join()
    assert [r["state"] for r in runs_of(sweep_dir).values()] == ["COMPLETE"]


def wait_for(predicate, timeout: float = 60.0, runner: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        assert runner is None or runner.poll() is None, runner.communicate()[0]
        time.sleep(0.05)


def children_of(pid: int) -> list[int]:
    """Pids whose parent is pid (from /proc)."""
    out = []
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = path.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(path.parent.name))
    return out


def process_gone(pid: int) -> bool:
    """Exited (a zombie no init has reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def csv_rows(path: Path) -> int:
    try:
        return len(read_metrics_csv(path))
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_run_whose_runner_was_killed_is_continued_by_the_next_runner_from_last_pt(tmp_path):
    cfg = resumable_sweep(tmp_path, [0.6], {"epochs": {"value": 20}, "sleep": {"value": 0.15}}, method="random")
    sweep_dir, run_dir = tmp_path / "s", tmp_path / "s" / "runs" / "run-000"
    fast = ["--poll_s", "0.1", "--stale_s", "2", "--quiet"]
    a = start_runner("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", *fast, cwd=tmp_path)
    wait_for(lambda: csv_rows(run_dir / "metrics.csv") >= 3, 120, a)
    trainer = children_of(a.pid)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    wait_for(lambda: all(process_gone(p) for p in trainer), 20)  # it got SIGTERM with its runner, saved last.pt
    log = (sweep_dir / "logs" / "run-000.log").read_text()
    assert "interrupted: progress is in last.pt" in log, log
    done = csv_rows(run_dir / "metrics.csv")
    assert runs_of(sweep_dir)["run-000"]["state"] == "RUNNING"  # as far as the study knows
    time.sleep(2.5)  # past --stale_s without a heartbeat
    b = start_runner("--sweep_dir", sweep_dir, "--count", "1", *fast, cwd=tmp_path)
    out = b.communicate(timeout=120)[0]
    assert b.returncode == 0, out
    assert "its runner stopped beating" in out and f"resuming it after epoch {done}" in out, out
    assert [r["epoch"] for r in read_metrics_csv(run_dir / "metrics.csv")] == list(range(1, 21))  # none repeated
    runs = runs_of(sweep_dir)
    assert list(runs) == ["run-000"] and runs["run-000"]["state"] == "COMPLETE"
    assert runs["run-000"]["value"] == pytest.approx(0.6)
    assert len(list((sweep_dir / "runs").iterdir())) == 1  # continued in its folder, not trained afresh


def test_a_run_lost_with_its_node_before_its_first_epoch_is_continued_in_its_folder(tmp_path):
    """Runner and trainer killed together (a lost node) once the run folder exists, before any epoch or last.pt."""
    cfg = resumable_sweep(tmp_path, [0.6], {"epochs": {"value": 3}, "sleep": {"value": 0.3}}, method="random")
    sweep_dir, run_dir = tmp_path / "s", tmp_path / "s" / "runs" / "run-000"
    fast = ["--poll_s", "0.1", "--stale_s", "1", "--quiet"]
    a = start_runner("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", *fast, cwd=tmp_path)
    wait_for(lambda: run_dir.is_dir(), 120, a)
    for pid in [*children_of(a.pid), a.pid]:
        os.kill(pid, signal.SIGKILL)
    a.wait(timeout=30)
    assert not (run_dir / "last.pt").exists()
    time.sleep(1.5)
    b = start_runner("--sweep_dir", sweep_dir, "--count", "1", *fast, cwd=tmp_path)
    out = b.communicate(timeout=120)[0]
    assert b.returncode == 0, out
    assert "--resume" in out and "already exists" not in out, out
    assert runs_of(sweep_dir)["run-000"]["state"] == "COMPLETE"
    assert [r["epoch"] for r in read_metrics_csv(run_dir / "metrics.csv")] == [1, 2, 3]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_a_runner_stops_its_real_trainer_which_saves_last_pt(tmp_path):
    data = make_dataset(tmp_path / "data", ["a", "b"], n_train=6, n_val=2, size=32)
    cfg = tiny_sweep_config()
    cfg["parameters"].update(
        filters={"value": 4},
        dense_neurons={"value": 16},
        batch_size={"values": [4]},
        epochs={"value": 300},
        conv_layers={"value": 2},
    )
    sweep_dir = tmp_path / "s"
    runner = start_runner(
        "--config",
        write_yaml(tmp_path / "sweep.yaml", cfg),
        "--sweep_dir",
        sweep_dir,
        "--count",
        "1",
        "--quiet",
        "--",
        "--data_dir",
        data,
        "--workers",
        "0",
        "--device",
        "cpu",
        "--cache",
        "off",
        cwd=tmp_path,
    )
    run_dir = sweep_dir / "runs" / "run-000"
    wait_for(lambda: (run_dir / "metrics.csv").is_file(), 120, runner)  # the trainer is in its epochs
    trainer = children_of(runner.pid)
    assert len(trainer) == 1
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=30)
    wait_for(lambda: process_gone(trainer[0]), 10)
    log = (sweep_dir / "logs" / "run-000.log").read_text()
    assert "interrupted: progress is in" in log and "Traceback" not in log, log  # stopped cleanly, saved last.pt
    assert (run_dir / "last.pt").is_file() and not (run_dir / "result.json").exists()


def test_finished_runs_are_never_retrained_and_interrupted_ones_resume(tmp_path):
    cfg = resumable_sweep(tmp_path, [0.2, 0.4, 0.6])
    sweep_dir, runs = tmp_path / "s", tmp_path / "s" / "runs"
    common = ["--sweep_dir", sweep_dir, "--quiet", "--poll_s", "0.05", "--stale_s", "1"]
    # 1. kill -9 of the runner after its run completed (result.json), while the trainer still lingers
    a = start_runner("--config", cfg, *common, "--count", "1", "--", "--linger", "60", cwd=tmp_path)
    wait_for(lambda: any((p / "result.json").is_file() for p in runs.glob("run-*")), runner=a)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    time.sleep(1.5)
    # 2. SIGTERM of the next runner after its own run completed (it first records the first one as finished)
    b = start_runner(*common, "--count", "2", cwd=tmp_path)
    wait_for(lambda: sum((p / "result.json").is_file() for p in runs.glob("run-*")) == 2, runner=b)
    b.send_signal(signal.SIGTERM)
    out_b = b.communicate(timeout=60)[0]
    assert b.returncode in (0, 130) and "Traceback" not in out_b, out_b
    got = runs_of(sweep_dir)
    assert len(got) == 2 and all(r["state"] == "COMPLETE" for r in got.values()), got
    # 3. SIGTERM mid-training: interrupted, with its last.pt, queued to continue
    c = start_runner(*common, "--count", "1", "--", "--epochs", "30", "--sleep", "0.1", cwd=tmp_path)
    wait_for(
        lambda: len(list(runs.glob("run-*"))) == 3 and csv_rows(sorted(runs.glob("run-*"))[-1] / "metrics.csv") > 0,
        runner=c,
    )
    c.send_signal(signal.SIGTERM)
    out_c = c.communicate(timeout=60)[0]
    assert c.returncode == 130 and "Traceback" not in out_c, out_c
    third = next(n for n in runs_of(sweep_dir) if n not in got)
    assert runs_of(sweep_dir)[third]["state"] == "WAITING"  # queued to continue
    # 4. continuing resumes it from its last.pt; nothing is trained again, and the grid is then complete
    d = start_runner(*common, "--count", "3", cwd=tmp_path)
    out_d = d.communicate(timeout=120)[0]
    assert d.returncode == 0, out_d
    final = runs_of(sweep_dir)
    assert len(final) == 3 and sorted(p.name for p in runs.iterdir()) == sorted(final)
    assert all(r["state"] == "COMPLETE" for r in final.values()), final
    assert "resuming after epoch" in (sweep_dir / "logs" / f"{third}.log").read_text()
    assert [r["epoch"] for r in read_metrics_csv(runs / third / "metrics.csv")] == list(range(1, 31))
    assert sorted(r["value"] for r in final.values()) == pytest.approx([0.2, 0.4, 0.6])
    assert "grid search complete" in out_d


def test_a_rejected_run_stops_the_runner_with_the_trainers_error(tiny_data, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_sweep_config())
    proc = run_cli(
        "sweep_offline.py",
        "--config",
        cfg,
        "--sweep_dir",
        tmp_path / "s",
        "--count",
        "3",
        "--quiet",
        "--",
        "--data_dir",
        tiny_data,
        "--workers",
        "0",
        "--device",
        "cpu",
        "--label_smoothing",
        "2",
        env=clean_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert_one_line_error(proc, "was rejected", "--label_smoothing must be in [0, 1)")
    assert len(runs_of(tmp_path / "s")) == 1  # it stopped at once
    fake = fake_sweep(tmp_path, "grid", [0.5, 0.6])
    capsys.readouterr()
    assert run_sweep("--config", fake, "--sweep_dir", tmp_path / "f", "--count", "2", "--", "--bogus", "1") == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: run-000 was rejected") and "unrecognized arguments: --bogus" in line, line
    assert len(runs_of(tmp_path / "f")) == 1
    fake = fake_sweep(tmp_path, "grid", [-1, -2])  # other failures go on, but such a runner does not exit 0
    assert run_sweep("--config", fake, "--sweep_dir", tmp_path / "g", "--count", "2") == 1
    assert "every run this runner trained failed (2)" in capsys.readouterr().err
    assert [r["state"] for r in runs_of(tmp_path / "g").values()] == ["FAIL", "FAIL"]


def test_a_metric_no_run_logs_is_named(tmp_path, capsys):
    own = dict(tiny_sweep_config(), metric={"name": "val_accuracy", "goal": "maximize"})
    proc = run_cli(
        "sweep_offline.py",
        "--config",
        write_yaml(tmp_path / "own.yaml", own),
        "--sweep_dir",
        tmp_path / "own",
        "--dry_run",
        env=clean_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert_one_line_error(proc, "'val_accuracy' is not logged by train_parta.py", "val_acc", "fix metric.name")
    cfg = resumable_sweep(tmp_path, [0.5], metric="val_accuracy")
    # trained, but with nothing to rank it by: the study records it as failed, and so does the runner
    assert run_sweep("--config", cfg, "--sweep_dir", tmp_path / "s", "--count", "1", "--quiet") == 1
    out = capsys.readouterr().out
    assert (
        "[sweep] warning: no run logs 'val_accuracy': run-000's metrics.csv has epoch, train_loss, val_acc; "
        "fix metric.name in the yaml" in out
    ), out


def test_leaderboard_columns_are_unique_when_parameters_share_their_names(tmp_path, capsys):
    clash = {
        "epochs": {"value": 2},
        "state": {"values": ["x"]},
        "val_acc": {"values": [7]},
        "note": {"value": "n"},
        "param_epochs": {"value": 5},
    }
    cfg = resumable_sweep(tmp_path, [0.5], clash)
    assert run_sweep("--config", cfg, "--sweep_dir", tmp_path / "s", "--count", "1", "--quiet") == 0
    with open(tmp_path / "s" / "leaderboard.csv", newline="") as f:
        header = next(csv.reader(f))
    assert len(header) == len(set(header)), header
    row = read_leaderboard(tmp_path / "s")[0]
    assert row["state"] == "complete" and float(row["val_acc"]) == pytest.approx(0.5) and row["epochs"] == "2"
    assert (row["param_state"], row["param_val_acc"], row["param_epochs"], row["param_note"]) == ("x", "7", "2", "n")
    assert row["param_param_epochs"] == "5" and row["q"] == "0.5"
    table_header = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("rank"))
    assert len(table_header.split()) == len(set(table_header.split())), table_header


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_runner_stopped_at_start_up_says_so_in_one_line(tmp_path, sig):
    cfg = fake_sweep(tmp_path, "grid", [0.5])
    runner = start_runner("--config", cfg, "--sweep_dir", tmp_path / "s", "--count", "1", cwd=tmp_path)
    time.sleep(0.3)  # importing torch and the engine
    runner.send_signal(getattr(signal, sig))
    out = runner.communicate(timeout=60)[0]
    assert runner.returncode == 130, out
    assert "Traceback" not in out and out.strip().splitlines()[-1].startswith("[sweep] interrupted"), out


# ----------------------------------------------------------------------------- the sweep folder, faults
def test_runner_owns_its_bookkeeping_flags_and_refuses_a_searched_one_after_dashes(tmp_path):
    cfg = fake_sweep(tmp_path, "random", [0.5, 0.7])
    for flag in (["--out_dir", "x"], ["--run-name=x"], ["--wandb", "online"]):
        with pytest.raises(UserError, match="set by the sweep runner"):
            run_sweep("--config", cfg, "--sweep_dir", tmp_path / "s", "--", *flag)
    with pytest.raises(UserError, match="'--q=0.3' after -- sets 'q', which the sweep searches"):
        run_sweep("--config", cfg, "--sweep_dir", tmp_path / "s", "--", "--q=0.3")


def test_dry_run_prints_commands_and_saves_nothing(tmp_path, capsys):
    cfg = fake_sweep(tmp_path, "grid", [0.1, 0.2])
    assert run_sweep("--config", cfg, "--sweep_dir", tmp_path / "s", "--count", "3", "--dry_run") == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "fake_train.py" in ln]
    assert sorted(ln.split("--q=")[1].split()[0] for ln in lines) == ["0.1", "0.2"]
    assert not (tmp_path / "s").exists()


def test_a_copied_sweep_continues_itself_and_leaves_the_original_alone(tmp_path):
    cfg = resumable_sweep(tmp_path, [0.3, 0.5], {"epochs": {"value": 30}, "sleep": {"value": 0.1}})
    original = tmp_path / "orig"
    a = start_runner(
        "--config", cfg, "--sweep_dir", original, "--count", "1", "--quiet", "--poll_s", "0.05", cwd=tmp_path
    )
    wait_for(lambda: any(csv_rows(p / "metrics.csv") >= 2 for p in (original / "runs").glob("run-*")), runner=a)
    a.send_signal(signal.SIGTERM)
    assert a.wait(timeout=60) == 130
    (interrupted,) = list((original / "runs").iterdir())
    before = {p.name: p.read_bytes() for p in interrupted.iterdir() if p.is_file()}
    copy = tmp_path / "moved" / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(tmp_path / "orig" / "logs")  # nothing of the copy may need the original's files
    assert run_sweep("--sweep_dir", copy, "--count", "1", "--quiet", "--poll_s", "0.05") == 0
    assert [r["epoch"] for r in read_metrics_csv(copy / "runs" / interrupted.name / "metrics.csv")] == list(
        range(1, 31)
    )
    assert {p.name: p.read_bytes() for p in interrupted.iterdir() if p.is_file()} == before


@pytest.fixture
def shared_tmp():
    """A folder every user can enter (pytest's own tmp is private to this user)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="sweep-ro-"))
    folder.chmod(0o755)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(folder)


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root ignores permissions")
def test_a_read_only_sweep_folder_shows_but_does_not_train(shared_tmp):
    cfg = fake_sweep(shared_tmp, "grid", [0.4, 0.8])
    sweep_dir = shared_tmp / "s"
    assert run_sweep("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", "--quiet") == 0
    for path in [sweep_dir, *sweep_dir.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    as_other_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    runner = [*as_other_user, sys.executable, str(REPO / "sweep_offline.py"), "--sweep_dir", str(sweep_dir)]
    env = clean_env()
    show = subprocess.run([*runner, "--show"], capture_output=True, text=True, env=env, cwd=shared_tmp, timeout=120)
    assert show.returncode == 0 and "leaderboard of" in show.stdout, show.stdout + show.stderr
    more = subprocess.run(
        [*runner, "--count", "1"], capture_output=True, text=True, env=env, cwd=shared_tmp, timeout=120
    )
    assert more.returncode == 2 and "not writable" in more.stderr and "Traceback" not in more.stderr, more.stderr
    assert len(more.stderr.strip().splitlines()) == 1, more.stderr


@pytest.mark.parametrize("damage", ["garbage", "other_study", "file_as_folder"])
def test_a_damaged_sweep_is_one_line_naming_the_file(tmp_path, damage):
    fake_sweep(tmp_path, "grid", [0.4])
    sweep_dir = tmp_path / "s"
    if damage == "file_as_folder":
        sweep_dir.write_text("not a folder")
        expected = "is a file"
    else:
        sweep_dir.mkdir()
        journal = sweep_dir / "optuna.journal"
        if damage == "garbage":
            journal.write_text('{"op_code": 0, "worker_id": "x"\nnot json at all\n')
        else:  # a valid study, but not one this runner made
            storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
            optuna.create_study(storage=storage, study_name="elsewhere").enqueue_trial({})  # no config, a trial
        expected = "optuna.journal"
    for argv in (["--sweep_dir", sweep_dir, "--show"], ["--sweep_dir", sweep_dir, "--count", "1"]):
        proc = run_cli("sweep_offline.py", *argv, env=clean_env(), timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert_one_line_error(proc, expected)
