"""Run a W&B-style hyperparameter sweep on a machine without W&B access.

Reads the same sweep.yaml as `wandb sweep`, proposes runs with the engine W&B's local controller
uses (the open-source `sweeps` package: grid, random, bayes, hyperband), launches each run with
exactly the arguments `wandb agent` would pass, and keeps the sweep's state in a folder, so running
the same command again continues the sweep:

    python sweep_offline.py --config sweep.yaml --count 10 -- --data_dir data/inaturalist_12K --workers 4
    python sweep_offline.py --sweep_dir sweeps/parta-sweep --count 5      # continue it
    python sweep_offline.py --sweep_dir sweeps/parta-sweep --show         # leaderboard only

Each run trains in SWEEP_DIR/runs/run-NNN (its metrics.csv, checkpoints, curves), its output goes
to SWEEP_DIR/logs/run-NNN.log, the sweep's state to SWEEP_DIR/sweep.json and the ranking to
SWEEP_DIR/leaderboard.csv. Runs are trained one after another.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from engine import str2bool

STATE_FORMAT = "sweep-offline/1"
DEFAULT_CONFIG = "sweep.yaml"
DEFAULT_SWEEP_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # as wandb agent
# Flags the runner sets itself on every run; passing them after `--` would break the bookkeeping.
MANAGED_FLAGS = ("out_dir", "run_name", "resume", "wandb")
HERE = Path(__file__).resolve().parent


class UserError(Exception):
    """Bad input: printed as one 'error:' line, exit code 2."""


# ----------------------------------------------------------------------------- engine
def import_sweeps():
    """The `sweeps` package (W&B's sweep engine), quiet about its pydantic-v1 style config."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sweeps
    except ImportError:
        raise UserError("sweep_offline.py needs the 'sweeps' package: pip install 'sweeps>=0.2.0,<0.3' "
                        "(or pip install -r requirements.txt)") from None
    return sweeps


def load_config(path: str | Path) -> dict:
    """Parse and validate a sweep yaml with the same JSON schema W&B uses."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep config not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    check_config(config, str(path))
    return config


def check_config(config: Any, where: str = "sweep config") -> None:
    if not isinstance(config, dict):
        raise UserError(f"{where}: expected a mapping with program, method, metric and parameters")
    sweeps = import_sweeps()
    try:
        violations = sweeps.schema_violations_from_proposed_config(config)
    except ValueError as e:
        violations = [str(e)]
    if violations:
        raise UserError(f"{where}: invalid sweep config: " + "; ".join(v.splitlines()[0] for v in violations))
    for key in ("program", "method", "parameters"):
        if key not in config:
            raise UserError(f"{where}: needs '{key}'")
    if config["method"] in ("bayes",) or config.get("early_terminate"):
        if not isinstance(config.get("metric"), dict) or "name" not in config["metric"]:
            raise UserError(f"{where}: method {config['method']} and early_terminate need metric: {{name, goal}}")


def metric_of(config: dict) -> tuple[str, str]:
    """(metric name, goal); the leaderboard ranks by it even for grid/random sweeps."""
    metric = config.get("metric") or {}
    name = metric.get("name", "val_acc")
    return name, metric.get("goal", "maximize" if "acc" in name else "minimize")


def plain(value: Any) -> Any:
    """numpy scalars and nested containers as plain JSON types (what the W&B backend sends)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def to_sweep_run(record: dict, metric: str):
    """A stored run as the `sweeps.SweepRun` the engine expects (like wandb_controller builds them).

    Finished runs and runs stopped by hyperband feed their per-epoch history (the engine takes the
    best value over epochs, as from W&B's sampled history); failed runs are 'failed', which bayes
    scores with the worst metric seen. Runs cut short by stopping the runner are left out: their
    result says nothing about the configuration (a grid proposes it again).
    """
    sweeps = import_sweeps()
    history = [dict(row, _step=int(row.get("epoch", i + 1))) for i, row in enumerate(record.get("history") or [])]
    state = record["state"]
    if state == "interrupted":
        return None
    if state in ("finished", "stopped"):
        engine_state = sweeps.RunState.finished
    elif state == "running":
        engine_state = sweeps.RunState.running
    else:
        engine_state = sweeps.RunState.failed
    summary = dict(history[-1]) if history else {}
    return sweeps.SweepRun(name=record["name"], state=engine_state, config=record["config"],
                           summaryMetrics=summary, sampledHistory=history,
                           exitcode=record.get("returncode"))


def engine_runs(records: list[dict], metric: str) -> list:
    return [r for r in (to_sweep_run(rec, metric) for rec in records) if r is not None]


def propose(config: dict, records: list[dict], seed: int | None, number: int) -> dict | None:
    """The next run's config ({name: {"value": v}}), or None when a grid is exhausted."""
    import numpy as np

    sweeps = import_sweeps()
    saved = (random.getstate(), np.random.get_state())
    if seed is not None:  # reproducible, and a resumed sweep does not repeat earlier draws
        s = (seed * 1_000_003 + number) % 2**32
        random.seed(s)
        np.random.seed(s)  # the engine draws from numpy's global generator
    metric, _ = metric_of(config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn convergence chatter from the GP fit
            run = sweeps.next_run(config, engine_runs(records, metric))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the sweep engine could not propose a run: {e}") from None
    finally:
        if seed is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
    return None if run is None else plain(run.config)


def hyperband_should_stop(config: dict, records: list[dict], current: dict) -> bool:
    """Whether `sweeps.stop_runs` (hyperband) stops the running run `current`."""
    sweeps = import_sweeps()
    metric, _ = metric_of(config)
    runs = engine_runs(records, metric)
    running = to_sweep_run(dict(current, state="running"), metric)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stop = sweeps.stop_runs(config, runs + [running])
    return any(r.name == current["name"] for r in stop)


# ----------------------------------------------------------------------------- command line
def sweep_command_args(run_config: dict) -> dict:
    """wandb's own helper: the argument formats `wandb agent` fills ${args}, ${args_no_hyphens}... with."""
    try:
        from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    except ImportError:
        raise UserError("sweep_offline.py builds run commands with wandb's helper; pip install wandb") from None
    return create_sweep_command_args({"args": run_config})


def build_command(config: dict, run_config: dict, interpreter: str, program: str | None = None,
                  args_json_file: str | None = None) -> list[str]:
    """The command `wandb agent` runs for this config (wandb_agent.Agent._command_run), except that
    ${interpreter} is `interpreter` (the agent uses whatever 'python' is on PATH)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command

    command = create_sweep_command([str(c) for c in (config.get("command") or DEFAULT_SWEEP_COMMAND)])
    sweep_vars = sweep_command_args(run_config)
    sweep_vars["interpreter"] = [interpreter]
    sweep_vars["program"] = [program or config["program"]]
    sweep_vars["args_json_file"] = [args_json_file] if args_json_file else []
    if platform.system() != "Windows":
        sweep_vars["env"] = ["/usr/bin/env"]
    out: list[str] = []
    for chunk in command:
        if chunk.startswith("${") and chunk.endswith("}"):
            out += [str(v) for v in (sweep_vars.get(chunk[2:-1]) or [])]
        else:
            out.append(chunk)
    return out


def resolve_program(program: str, config_path: Path | None) -> str:
    """The program as written when it exists here (as wandb agent runs it), else next to the config."""
    if Path(program).is_file():
        return program
    for base in filter(None, (config_path.parent if config_path else None, HERE)):
        if (base / program).is_file():
            return str((base / program).resolve())
    raise UserError(f"program '{program}' of the sweep config not found in {Path.cwd()}; run from the "
                    f"folder that holds it")


def check_train_args(extra: list[str]) -> None:
    for arg in extra:
        name = arg.split("=", 1)[0].lstrip("-").replace("-", "_")
        if arg.startswith("--") and name in MANAGED_FLAGS:
            raise UserError(f"'{arg}' after -- is set by the sweep runner itself (use --sweep_dir / --wandb "
                            f"of sweep_offline.py)")


# ----------------------------------------------------------------------------- state
class SweepLock:
    """One runner per sweep folder: SWEEP_DIR/.lock holds the pid of the runner using it."""

    def __init__(self, sweep_dir: Path) -> None:
        self.path = sweep_dir / ".lock"

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and pid_alive(pid):
                    raise UserError(f"another sweep_offline.py (pid {pid}) is running the sweep in "
                                    f"{self.path.parent}; wait for it or stop it first") from None
                self.path.unlink(missing_ok=True)  # stale lock of a runner that died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return self
        raise UserError(f"could not lock {self.path}")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def load_state(sweep_dir: Path) -> dict | None:
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: unreadable sweep state ({e})") from None
    if state.get("format") != STATE_FORMAT:
        raise UserError(f"{path}: not a sweep folder of sweep_offline.py")
    return state


def save_state(sweep_dir: Path, state: dict) -> None:
    write_json_atomic(sweep_dir / "sweep.json", state)


def read_history(run_dir: Path) -> list[dict]:
    """metrics.csv rows as floats (epoch as int); [] when the run wrote none."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out = {}
            for k, v in row.items():
                try:
                    out[k] = float(v)
                except (TypeError, ValueError):
                    continue
            if "epoch" in out:
                out["epoch"] = int(out["epoch"])
            rows.append(out)
    return rows


def summarize(record: dict, metric: str, goal: str) -> None:
    """Best metric over epochs (and its epoch) from the record's history."""
    values = [(h[metric], h.get("epoch", i + 1)) for i, h in enumerate(record.get("history") or [])
              if isinstance(h.get(metric), (int, float)) and math.isfinite(h[metric])]
    record["epochs"] = len(record.get("history") or [])
    if values:
        best = (max if goal == "maximize" else min)(values, key=lambda t: t[0])
        record["metric"], record["best_epoch"] = best
    else:
        record["metric"], record["best_epoch"] = None, None


def next_number(state: dict, runs_dir: Path) -> int:
    numbers = [rec["number"] for rec in state["runs"]]
    if runs_dir.is_dir():  # folders of a run whose record was lost (runner killed mid-write)
        numbers += [int(p.name[4:]) for p in runs_dir.glob("run-*") if p.name[4:].isdigit()]
    return max(numbers, default=0) + 1


# ----------------------------------------------------------------------------- leaderboard
def ranked(records: list[dict], goal: str) -> list[dict]:
    with_metric = [r for r in records if r.get("metric") is not None]
    without = [r for r in records if r.get("metric") is None]
    with_metric.sort(key=lambda r: r["metric"], reverse=goal == "maximize")
    return with_metric + without


def searched_params(config: dict) -> list[str]:
    return [k for k, v in config["parameters"].items() if not (isinstance(v, dict) and "value" in v)]


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def write_leaderboard(sweep_dir: Path, state: dict) -> list[dict]:
    config = state["config"]
    metric, goal = metric_of(config)
    params = list(config["parameters"])
    rows = []
    for rank, rec in enumerate(ranked(state["runs"], goal), 1):
        row = {"rank": rank, "run": rec["name"], "state": rec["state"], metric: rec.get("metric"),
               "best_epoch": rec.get("best_epoch"), "epochs": rec.get("epochs"),
               "minutes": round(rec.get("duration_s", 0) / 60, 2)}
        row.update({p: (rec["config"].get(p) or {}).get("value") for p in params})
        row.update({"run_dir": rec.get("run_dir"), "note": rec.get("note", "")})
        rows.append(row)
    tmp = sweep_dir / ".leaderboard.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["rank", "run", "state", metric, "best_epoch", "epochs", "minutes",
                                               *params, "run_dir", "note"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, sweep_dir / "leaderboard.csv")
    return rows


def print_leaderboard(sweep_dir: Path, state: dict, top: int = 0) -> None:
    rows = write_leaderboard(sweep_dir, state)
    config = state["config"]
    metric, goal = metric_of(config)
    cols = ["rank", "run", "state", metric, "best_epoch", "minutes", *searched_params(config), "note"]
    shown = rows[:top] if top else rows
    table = [[fmt(r.get(c)) for c in cols] for r in shown]
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(cols)]
    print(f"\nleaderboard of {sweep_dir} ({config['method']}, {metric} {goal}, {len(rows)} runs):")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())
    if top and len(rows) > top:
        print(f"... {len(rows) - top} more")
    print(f"leaderboard: {sweep_dir / 'leaderboard.csv'}")


# ----------------------------------------------------------------------------- one run
class Interrupted(Exception):
    pass


def raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def pump_output(stream, log_path: Path, tail: deque, echo: bool) -> None:
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        for line in iter(stream.readline, ""):
            log.write(line)
            log.flush()
            tail.append(line.rstrip("\n"))
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()


def execute(command: list[str], record: dict, run_dir: Path, log_path: Path, check_stop, poll_s: float,
            echo: bool) -> tuple[int, bool, list[str]]:
    """Run one training process; returns (exit code, stopped by hyperband, last output lines).

    The child gets its own session, so a Ctrl-C reaches only the runner, which then sends the child
    one SIGTERM (the training loop saves last.pt and exits) and waits for it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env=env, start_new_session=True)
    record["pid"] = proc.pid
    tail: deque = deque(maxlen=40)
    pump = threading.Thread(target=pump_output, args=(proc.stdout, log_path, tail, echo), daemon=True)
    pump.start()
    stopped = False
    seen_epochs = 0
    try:
        while True:
            try:
                proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            if check_stop is None or stopped:
                continue
            history = read_history(run_dir)
            if len(history) > seen_epochs:
                seen_epochs = len(history)
                record["history"] = history
                if check_stop(record):
                    stopped = True
                    print(f"[sweep] {record['name']}: hyperband stops it after epoch {seen_epochs}", flush=True)
                    proc.send_signal(signal.SIGTERM)
    except KeyboardInterrupt:
        print(f"\n[sweep] interrupted: stopping {record['name']} (it saves last.pt) ...", file=sys.stderr, flush=True)
        terminate(proc)
        pump.join(timeout=10)
        raise Interrupted from None
    pump.join(timeout=30)
    return proc.returncode, stopped, list(tail)


def terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        proc.wait()


def failure_note(tail: list[str], code: int) -> str:
    for line in reversed(tail):
        if line.startswith("error:") or "Error" in line:
            return line.strip()[:200]
    return f"exit code {code}"


def run_dir_from_output(tail: list[str], default: Path) -> Path:
    for line in reversed(tail):
        if line.startswith("run folder: "):
            return Path(line[len("run folder: "):].strip())
    return default


# ----------------------------------------------------------------------------- main
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run the sweep of a W&B sweep.yaml offline: propose runs with the W&B sweep engine "
                    "(grid, random, bayes), train them one after another, rank them by the metric.",
        usage="%(prog)s [options] [-- TRAIN_FLAGS ...]",
        epilog="Flags after -- go to every run unchanged, after the sweep's own (they win), e.g. "
               "-- --data_dir data/inaturalist_12K --workers 4. Rerun with the same --sweep_dir to continue; "
               "without -- flags a continued sweep reuses the last ones.",
    )
    parser.add_argument("--config", default=None,
                        help=f"sweep yaml, as for 'wandb sweep' (default: {DEFAULT_CONFIG} for a new sweep, "
                             "the sweep's own copy when continuing one)")
    parser.add_argument("--sweep_dir", "--sweep-dir", default=None,
                        help="folder of the sweep's state, runs, logs and leaderboard; an existing one is "
                             "continued (default: sweeps/<name in the yaml, else the yaml's file name>)")
    parser.add_argument("--count", type=int, default=10, help="number of runs to train now (default: %(default)s)")
    parser.add_argument("--wandb", default="disabled", choices=("disabled", "offline"),
                        help="W&B logging of every run: disabled, or offline into the run folder for a "
                             "later 'wandb sync' (default: %(default)s)")
    parser.add_argument("--early_terminate", "--early-terminate", type=str2bool, default=True,
                        metavar="BOOL", help="apply the yaml's early_terminate (hyperband) to each run while it "
                                             "trains, as the W&B controller does (default: %(default)s)")
    parser.add_argument("--poll_s", type=float, default=5.0,
                        help="seconds between looks at a running run's metrics.csv for hyperband (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the engine's proposals, for a reproducible sweep (default: none, random)")
    parser.add_argument("--max_failures", type=int, default=5,
                        help="stop after this many failed runs in a row, like wandb agent; 0 = never "
                             "(default: %(default)s)")
    parser.add_argument("--interpreter", default=sys.executable,
                        help="python that runs the program, the ${interpreter} of the command "
                             "(default: this one, %(default)s)")
    parser.add_argument("--dry_run", "--dry-run", action="store_true",
                        help="print the commands of the next --count proposals and train nothing")
    parser.add_argument("--show", action="store_true", help="print the sweep's leaderboard and exit")
    parser.add_argument("--top", type=int, default=0, help="rows of the printed leaderboard; 0 = all (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true",
                        help="do not echo the runs' output (it is always in SWEEP_DIR/logs/run-NNN.log)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Our flags, then everything after the first `--` as args.train_args."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = get_args_parser().parse_args(argv)
    args.train_args = extra
    return args


def default_sweep_dir(config: dict, config_path: Path) -> Path:
    name = str(config.get("name") or config_path.stem)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".") or "sweep"
    return Path("sweeps") / safe


def open_sweep(args: argparse.Namespace) -> tuple[Path, dict, Path | None]:
    """(sweep folder, state, config path): a new sweep, or the stored one to continue."""
    config_path = Path(args.config) if args.config else None
    config = load_config(config_path) if config_path else None
    if args.sweep_dir:
        sweep_dir = Path(args.sweep_dir)
    else:
        if config is None:
            config_path = Path(DEFAULT_CONFIG)
            config = load_config(config_path)
        sweep_dir = default_sweep_dir(config, config_path)
    state = load_state(sweep_dir)
    if state is not None:
        if config is not None and plain(config) != state["config"]:
            raise UserError(f"{config_path} differs from the config the sweep in {sweep_dir} was started with "
                            f"({sweep_dir / 'sweep.yaml'}); continue it without --config, or start a new "
                            f"sweep with another --sweep_dir")
        check_config(state["config"], str(sweep_dir / "sweep.json"))
        return sweep_dir, state, Path(state["config_file"]) if state.get("config_file") else None
    if args.show:
        raise UserError(f"no sweep in {sweep_dir} (no sweep.json)")
    if config is None:
        config_path = Path(DEFAULT_CONFIG)
        config = load_config(config_path)
    state = {"format": STATE_FORMAT, "config": plain(config), "config_file": str(config_path.resolve()),
             "created": datetime.now().isoformat(timespec="seconds"), "runs": []}
    return sweep_dir, state, config_path


def main(args: argparse.Namespace) -> int:
    train_args = list(getattr(args, "train_args", []) or [])
    check_train_args(train_args)
    if args.count < 0:
        raise UserError(f"--count must be >= 0, got {args.count}")
    if args.poll_s <= 0:
        raise UserError(f"--poll_s must be > 0, got {args.poll_s}")
    sweep_dir, state, config_path = open_sweep(args)
    config = state["config"]
    metric, goal = metric_of(config)
    if args.show:
        print_leaderboard(sweep_dir, state, args.top)
        return 0
    program = resolve_program(config["program"], config_path)
    runs_dir = sweep_dir / "runs"
    if not train_args and state.get("train_args"):  # a continued sweep keeps its data_dir, workers...
        train_args = list(state["train_args"])
        print(f"[sweep] flags for every run, as last time: {' '.join(train_args)}")

    if args.dry_run:
        pending: list[dict] = []
        number = next_number(state, runs_dir) if sweep_dir.is_dir() else 1
        for i in range(args.count):
            proposal = propose(config, state["runs"] + pending, args.seed, number + i)
            if proposal is None:
                print("grid search complete: no more configurations")
                break
            name = f"run-{number + i:03d}"
            pending.append({"name": name, "number": number + i, "state": "running", "config": proposal})
            command = build_command(config, proposal, args.interpreter, program)
            command += ["--out_dir", str(runs_dir), "--run_name", name, "--wandb", args.wandb, *train_args]
            print(" ".join(command))
        return 0

    sweep_dir.mkdir(parents=True, exist_ok=True)
    hyperband = bool(config.get("early_terminate")) and args.early_terminate
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, raise_interrupt)  # `kill` of the runner stops the run cleanly too
    except ValueError:  # not the main thread
        previous_handler = None
    try:
        with SweepLock(sweep_dir):
            state = load_state(sweep_dir) or state  # as saved by a runner that held the lock before us
            (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            for rec in state["runs"]:  # the runner died while this run trained
                if rec["state"] == "running":
                    rec["state"], rec["note"] = "interrupted", "the sweep runner stopped during this run"
                    rec["history"] = read_history(Path(rec["run_dir"]))
                    summarize(rec, metric, goal)
            state["train_args"] = train_args
            save_state(sweep_dir, state)
            done = len(state["runs"])
            print(f"[sweep] {sweep_dir}: {config['method']} search, {metric} ({goal}), {done} runs so far; "
                  f"training {args.count} more" + (" with hyperband early termination" if hyperband else ""))
            return run_loop(args, sweep_dir, state, program, train_args, hyperband)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def run_loop(args, sweep_dir: Path, state: dict, program: str, train_args: list[str], hyperband: bool) -> int:
    config = state["config"]
    metric, goal = metric_of(config)
    runs_dir, logs_dir = sweep_dir / "runs", sweep_dir / "logs"
    failures_in_a_row, exit_code = 0, 0
    try:
        for _ in range(args.count):
            number = next_number(state, runs_dir)
            name = f"run-{number:03d}"
            proposal = propose(config, state["runs"], args.seed, number)
            if proposal is None:
                print("[sweep] grid search complete: every configuration has run")
                break
            args_json = None
            if any("${args_json_file}" in str(c) for c in config.get("command") or []):
                args_json = sweep_dir / "configs" / f"{name}.json"
                args_json.parent.mkdir(parents=True, exist_ok=True)
                args_json.write_text(sweep_command_args(proposal)["args_json"][0])
            command = build_command(config, proposal, args.interpreter, program, str(args_json) if args_json else None)
            command += ["--out_dir", str(runs_dir), "--run_name", name, "--wandb", args.wandb, *train_args]
            run_dir = runs_dir / name
            record = {"name": name, "number": number, "state": "running", "config": proposal,
                      "command": command, "run_dir": str(run_dir), "log": str(logs_dir / f"{name}.log"),
                      "started": datetime.now().isoformat(timespec="seconds"), "history": []}
            state["runs"].append(record)
            save_state(sweep_dir, state)
            values = " ".join(f"{k}={fmt(v.get('value'))}" for k, v in proposal.items() if k in searched_params(config))
            print(f"\n[sweep] {name}: {values}", flush=True)
            print("[sweep] $ " + " ".join(command), flush=True)
            check = (lambda rec: hyperband_should_stop(config, state["runs"][:-1], rec)) if hyperband else None
            t0 = time.time()
            try:
                code, stopped, tail = execute(command, record, run_dir, Path(record["log"]), check, args.poll_s,
                                              not args.quiet)
            except Interrupted:
                record.update(state="interrupted", note="interrupted (Ctrl-C / SIGTERM of the runner)",
                              duration_s=round(time.time() - t0, 1))
                record["history"] = read_history(run_dir)
                summarize(record, metric, goal)
                record.pop("pid", None)
                save_state(sweep_dir, state)
                print_leaderboard(sweep_dir, state, args.top)
                print("[sweep] interrupted; run the same command again to continue the sweep", file=sys.stderr)
                return 130
            record.pop("pid", None)
            record["duration_s"] = round(time.time() - t0, 1)
            record["returncode"] = code
            run_dir = run_dir_from_output(tail, run_dir)
            record["run_dir"] = str(run_dir)
            record["history"] = read_history(run_dir)
            summarize(record, metric, goal)
            if stopped and code != 0:  # (a run that ended before the SIGTERM landed counts as finished)
                record["state"] = "stopped"
                record["note"] = f"stopped by hyperband after epoch {record['epochs']}"
            elif code == 0:
                record["state"] = "finished"
                if record["metric"] is None:
                    record["note"] = f"no {metric} in {run_dir / 'metrics.csv'}"
            else:
                record["state"] = "failed"
                record["note"] = failure_note(tail, code)
            record["ended"] = datetime.now().isoformat(timespec="seconds")
            save_state(sweep_dir, state)
            write_leaderboard(sweep_dir, state)
            result = f"{metric} {record['metric']:.4f} (epoch {record['best_epoch']})" if record["metric"] is not None else "-"
            print(f"[sweep] {name} {record['state']}: {result} in {record['duration_s']:.0f}s"
                  + (f" ({record['note']})" if record.get("note") else ""), flush=True)
            failures_in_a_row = failures_in_a_row + 1 if record["state"] == "failed" else 0
            if args.max_failures and failures_in_a_row >= args.max_failures:
                print(f"[sweep] stopping: {failures_in_a_row} runs in a row failed; see {logs_dir}", file=sys.stderr)
                exit_code = 1
                break
    except KeyboardInterrupt:  # between runs
        save_state(sweep_dir, state)
        print_leaderboard(sweep_dir, state, args.top)
        print("[sweep] interrupted; run the same command again to continue the sweep", file=sys.stderr)
        return 130
    print_leaderboard(sweep_dir, state, args.top)
    return exit_code


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
