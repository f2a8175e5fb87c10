"""Run a W&B-style hyperparameter sweep on a machine without W&B access: the runner script.

Reads the same sweep.yaml as `wandb sweep`, proposes runs with the engine W&B's local controller
uses (the open-source `sweeps` package: grid, random, bayes, hyperband), launches each run with
exactly the arguments `wandb agent` would pass, and keeps the sweep's state in a folder, so running
the same command again continues the sweep:

    python sweep_offline.py --config sweep.yaml --count 10 -- --data_dir data/inaturalist_12K --workers 4
    python sweep_offline.py --sweep_dir sweeps/parta-sweep --count 5      # continue it
    python sweep_offline.py --sweep_dir sweeps/parta-sweep --show         # leaderboard only

Each run trains in SWEEP_DIR/runs/run-NNN (its metrics.csv, checkpoints, curves), its output goes
to SWEEP_DIR/logs/run-NNN.log, the sweep's state to SWEEP_DIR/sweep.json and the ranking to
SWEEP_DIR/leaderboard.csv. Runs are trained one after another. This file is the runner (command
line, lock, training processes, signals, the run loop); the proposals, run commands, state and
leaderboard are sweep_engine.py's.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import yaml

from cli import UserError, str2bool
from sweep_engine import (check_config, check_train_args, default_sweep_dir, fmt, hyperband_should_stop, load_config,
                          load_state, mark_interrupted, metric_of, new_state, next_number, plain, print_leaderboard,
                          propose, read_history, resolve_program, run_command, save_state, searched_params,
                          summarize, sweep_command_args, write_leaderboard)

DEFAULT_CONFIG = "sweep.yaml"


# ----------------------------------------------------------------------------- lock
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


# ----------------------------------------------------------------------------- one run
class Interrupted(Exception):
    pass


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def pump_output(stream: IO[str], log_path: Path, tail: deque, echo: bool) -> None:
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        for line in iter(stream.readline, ""):
            log.write(line)
            log.flush()
            tail.append(line.rstrip("\n"))
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()


def execute(command: list[str], record: dict, run_dir: Path, log_path: Path,
            check_stop: Callable[[dict], bool] | None, poll_s: float, echo: bool) -> tuple[int, bool, list[str]]:
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
                        help="seconds between looks at a running run's metrics.csv for hyperband "
                             "(default: %(default)s)")
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
    parser.add_argument("--top", type=int, default=0,
                        help="rows of the printed leaderboard; 0 = all (default: %(default)s)")
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
    return sweep_dir, new_state(config, config_path), config_path


def main(args: argparse.Namespace) -> int:
    """Show, dry-run or train the next --count runs of the sweep; the exit code (0, 1 many failures, 130 stopped)."""
    train_args = list(getattr(args, "train_args", []) or [])
    check_train_args(train_args)
    if args.count < 0:
        raise UserError(f"--count must be >= 0, got {args.count}")
    if args.poll_s <= 0:
        raise UserError(f"--poll_s must be > 0, got {args.poll_s}")
    sweep_dir, state, config_path = open_sweep(args)
    config = state["config"]
    if args.show:
        print_leaderboard(sweep_dir, state, args.top)
        return 0
    program = resolve_program(config["program"], config_path)
    if not train_args and state.get("train_args"):  # a continued sweep keeps its data_dir, workers...
        train_args = list(state["train_args"])
        print(f"[sweep] flags for every run, as last time: {' '.join(train_args)}")
    if args.dry_run:
        return dry_run(args, sweep_dir, state, program, train_args)

    sweep_dir.mkdir(parents=True, exist_ok=True)
    hyperband = bool(config.get("early_terminate")) and args.early_terminate
    with sigterm_interrupts(), SweepLock(sweep_dir):
        state = take_over(sweep_dir, state, config, train_args)
        metric, goal = metric_of(config)
        print(f"[sweep] {sweep_dir}: {config['method']} search, {metric} ({goal}), {len(state['runs'])} runs so "
              f"far; training {args.count} more" + (" with hyperband early termination" if hyperband else ""))
        return run_loop(args, sweep_dir, state, program, train_args, hyperband)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile: a `kill` of the runner stops the run as cleanly as Ctrl-C."""
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:  # not the main thread: only it may set handlers
        previous_handler = None
    try:
        yield
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def take_over(sweep_dir: Path, state: dict, config: dict, train_args: list[str]) -> dict:
    """Under the lock: the state as the last runner saved it, its run in progress marked interrupted."""
    state = load_state(sweep_dir) or state  # as saved by a runner that held the lock before us
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    metric, goal = metric_of(config)
    for rec in state["runs"]:  # the runner died while this run trained
        if rec["state"] == "running":
            mark_interrupted(rec, "the sweep runner stopped during this run", metric, goal)
    state["train_args"] = train_args
    save_state(sweep_dir, state)
    return state


def dry_run(args: argparse.Namespace, sweep_dir: Path, state: dict, program: str, train_args: list[str]) -> int:
    """Print the commands of the next --count proposals; nothing is trained or saved."""
    config = state["config"]
    runs_dir = sweep_dir / "runs"
    pending: list[dict] = []  # proposals so far count as running, so a grid moves on
    number = next_number(state, runs_dir) if sweep_dir.is_dir() else 1
    for i in range(args.count):
        proposal = propose(config, state["runs"] + pending, args.seed, number + i)
        if proposal is None:
            print("grid search complete: no more configurations")
            break
        name = f"run-{number + i:03d}"
        pending.append({"name": name, "number": number + i, "state": "running", "config": proposal})
        command = run_command(config, proposal, program, runs_dir, name, args.interpreter, args.wandb, train_args)
        print(" ".join(command))
    return 0


def run_loop(args: argparse.Namespace, sweep_dir: Path, state: dict, program: str, train_args: list[str],
             hyperband: bool) -> int:
    """Propose, train and record runs until --count, a finished grid, too many failures or an interrupt."""
    config = state["config"]
    failures_in_a_row, exit_code = 0, 0
    try:
        for _ in range(args.count):
            number = next_number(state, sweep_dir / "runs")
            proposal = propose(config, state["runs"], args.seed, number)
            if proposal is None:
                print("[sweep] grid search complete: every configuration has run")
                break
            record = start_run(args, sweep_dir, state, program, train_args, number, proposal)
            if not train_run(args, sweep_dir, state, record, hyperband):
                return 130
            failures_in_a_row = failures_in_a_row + 1 if record["state"] == "failed" else 0
            if args.max_failures and failures_in_a_row >= args.max_failures:
                print(f"[sweep] stopping: {failures_in_a_row} runs in a row failed; see {sweep_dir / 'logs'}",
                      file=sys.stderr)
                exit_code = 1
                break
    except KeyboardInterrupt:  # between runs
        save_state(sweep_dir, state)
        print_leaderboard(sweep_dir, state, args.top)
        print("[sweep] interrupted; run the same command again to continue the sweep", file=sys.stderr)
        return 130
    print_leaderboard(sweep_dir, state, args.top)
    return exit_code


def start_run(args: argparse.Namespace, sweep_dir: Path, state: dict, program: str, train_args: list[str], number: int,
              proposal: dict) -> dict:
    """The record of run `number`, saved as running before it starts (a killed runner leaves it marked)."""
    config = state["config"]
    name = f"run-{number:03d}"
    runs_dir, logs_dir = sweep_dir / "runs", sweep_dir / "logs"
    args_json = None
    if any("${args_json_file}" in str(c) for c in config.get("command") or []):
        args_json = sweep_dir / "configs" / f"{name}.json"
        args_json.parent.mkdir(parents=True, exist_ok=True)
        args_json.write_text(sweep_command_args(proposal)["args_json"][0])
    command = run_command(config, proposal, program, runs_dir, name, args.interpreter, args.wandb, train_args,
                          str(args_json) if args_json else None)
    record = {"name": name, "number": number, "state": "running", "config": proposal,
              "command": command, "run_dir": str(runs_dir / name), "log": str(logs_dir / f"{name}.log"),
              "started": datetime.now().isoformat(timespec="seconds"), "history": []}
    state["runs"].append(record)
    save_state(sweep_dir, state)
    values = " ".join(f"{k}={fmt(v.get('value'))}" for k, v in proposal.items() if k in searched_params(config))
    print(f"\n[sweep] {name}: {values}", flush=True)
    print("[sweep] $ " + " ".join(command), flush=True)
    return record


def train_run(args: argparse.Namespace, sweep_dir: Path, state: dict, record: dict, hyperband: bool) -> bool:
    """Train a started run and record its outcome; False when the runner was interrupted meanwhile."""
    config = state["config"]
    metric, goal = metric_of(config)
    check = (lambda rec: hyperband_should_stop(config, state["runs"][:-1], rec)) if hyperband else None
    t0 = time.time()
    try:
        code, stopped, tail = execute(record["command"], record, Path(record["run_dir"]), Path(record["log"]),
                                      check, args.poll_s, not args.quiet)
    except Interrupted:
        mark_interrupted(record, "interrupted (Ctrl-C / SIGTERM of the runner)", metric, goal,
                         duration_s=round(time.time() - t0, 1))
        record.pop("pid", None)
        save_state(sweep_dir, state)
        print_leaderboard(sweep_dir, state, args.top)
        print("[sweep] interrupted; run the same command again to continue the sweep", file=sys.stderr)
        return False
    record.pop("pid", None)
    record["duration_s"] = round(time.time() - t0, 1)
    record["returncode"] = code
    finish_run(record, code, stopped, tail, metric, goal)
    save_state(sweep_dir, state)
    write_leaderboard(sweep_dir, state)
    result = f"{metric} {record['metric']:.4f} (epoch {record['best_epoch']})" if record["metric"] is not None else "-"
    print(f"[sweep] {record['name']} {record['state']}: {result} in {record['duration_s']:.0f}s"
          + (f" ({record['note']})" if record.get("note") else ""), flush=True)
    return True


def finish_run(record: dict, code: int, stopped: bool, tail: list[str], metric: str, goal: str) -> None:
    """The ended run's folder, history, best metric and state (finished, stopped by hyperband, failed)."""
    run_dir = run_dir_from_output(tail, Path(record["run_dir"]))
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


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except UserError as e:  # cli.UserError, raised by sweep_engine too: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
