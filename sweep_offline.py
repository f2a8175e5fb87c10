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
SWEEP_DIR/leaderboard.csv. One runner trains its runs one after another; any number of runners may
work on the same sweep folder at once, like `wandb agent`s on one sweep (one per GPU, or a SLURM job
array on a shared filesystem), each training its own --count runs:

    CUDA_VISIBLE_DEVICES=0 python sweep_offline.py --sweep_dir sweeps/parta-sweep --count 5 &
    CUDA_VISIBLE_DEVICES=1 python sweep_offline.py --sweep_dir sweeps/parta-sweep --count 5 &

This file is the runner (command line, signals, the run loop); the proposals, run commands, state
and leaderboard are sweep_engine.py's, the locks sweep_locks.py's, a run's process sweep_process.py's.
"""
from __future__ import annotations

INTERRUPTED = "[sweep] interrupted; run the same command again to continue the sweep"

if __name__ == "__main__":  # first, before the slow imports: a `kill` or Ctrl-C meanwhile is one line (startup.py)
    import startup

    startup.stop_quietly(INTERRUPTED)

import argparse
import signal
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

import yaml

from cli import UserError, str2bool
from sweep_locks import RunnerLease, runner_alive, state_lock
from startup import imports_done, raise_interrupt
from sweep_process import Interrupted, error_line, execute, failure_note, run_dir_from_output
from sweep_engine import (check_config, check_metric, check_train_args, default_sweep_dir, fmt,
                          hyperband_should_stop, load_config, load_state, mark_finished, mark_interrupted,
                          metric_of, metrics_columns, new_state, next_number, plain, print_leaderboard,
                          propose, read_history, resolve_program, resumable, run_command, run_result,
                          save_state, searched_params, summarize, sweep_command_args, write_leaderboard)

DEFAULT_CONFIG = "sweep.yaml"


# ----------------------------------------------------------------------------- main
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run the sweep of a W&B sweep.yaml offline: propose runs with the W&B sweep engine "
                    "(grid, random, bayes), train them one after another, rank them by the metric. Several "
                    "runners (one per GPU or machine) may work on the same --sweep_dir at once.",
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
    if not 0 < args.poll_s < float("inf"):  # NaN included
        raise UserError(f"--poll_s must be a number > 0, got {args.poll_s}")
    sweep_dir, state, config_path = open_sweep(args)
    config = state["config"]
    if args.show:
        show_leaderboard(sweep_dir, args.top)
        return 0
    program = resolve_program(config["program"], config_path)
    check_metric(config, program)
    if not train_args and state.get("train_args"):  # a continued sweep keeps its data_dir, workers...
        train_args = list(state["train_args"])
        print(f"[sweep] flags for every run, as last time: {' '.join(train_args)}")
    if args.dry_run:
        return dry_run(args, sweep_dir, state, program, train_args)

    sweep_dir.mkdir(parents=True, exist_ok=True)
    hyperband = bool(config.get("early_terminate")) and args.early_terminate
    with sigterm_interrupts(), RunnerLease(sweep_dir) as lease:
        state = join_sweep(sweep_dir, state, config, train_args)
        metric, goal = metric_of(config)
        print(f"[sweep] {sweep_dir}: {config['method']} search, {metric} ({goal}), {len(state['runs'])} runs so "
              f"far; training {args.count} more" + (" with hyperband early termination" if hyperband else "")
              + f" (runner {lease.id})")
        return run_loop(args, sweep_dir, config, program, train_args, hyperband, lease.id)


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


def reap_orphans(sweep_dir: Path, state: dict) -> None:
    """Runs whose runner died (SIGKILL, a crash, a reboot), and interrupted ones: 'finished' when their folder
    holds result.json (the run completed first), else 'interrupted', named as such, never lost (a later
    claim resumes them from last.pt)."""
    metric, goal = metric_of(state["config"])
    for rec in state["runs"]:
        orphan = rec["state"] == "running" and not runner_alive(sweep_dir, rec.get("runner"))
        if (orphan or rec["state"] == "interrupted") and run_result(rec["run_dir"]) is not None:
            mark_finished(rec, metric, goal, "completed; its runner was stopped before it recorded that")
        elif orphan:
            mark_interrupted(rec, "its sweep runner died during this run", metric, goal)


@contextmanager
def changing_state(sweep_dir: Path) -> Iterator[dict]:
    """Under the state lock: the state as every runner has saved it (orphans reaped), saved with its
    leaderboard, atomically, when the block ends."""
    with state_lock(sweep_dir):
        state = load_state(sweep_dir)
        if state is None:
            raise UserError(f"{sweep_dir / 'sweep.json'} vanished while the sweep ran")
        reap_orphans(sweep_dir, state)
        yield state
        save_state(sweep_dir, state)
        write_leaderboard(sweep_dir, state)


def join_sweep(sweep_dir: Path, state: dict, config: dict, train_args: list[str]) -> dict:
    """Under the state lock: create the sweep's state, or join it as another runner may have saved it."""
    with state_lock(sweep_dir):
        state = load_state(sweep_dir) or state  # another runner may have created it meanwhile
        (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        reap_orphans(sweep_dir, state)
        state["train_args"] = train_args
        save_state(sweep_dir, state)
    return state


def show_leaderboard(sweep_dir: Path, top: int) -> dict:
    """Print (and write) the leaderboard of the state as all runners have saved it; returns that state."""
    with changing_state(sweep_dir) as state:
        pass
    print_leaderboard(sweep_dir, state, top)
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


def run_loop(args: argparse.Namespace, sweep_dir: Path, config: dict, program: str, train_args: list[str],
             hyperband: bool, runner: str) -> int:
    """Propose (or resume), train and record runs until --count, a finished grid, a rejected run, too many
    failures or an interrupt; the exit code: 0, 1 (runs failed), 2 (a run's flags were rejected), 130."""
    failures_in_a_row, trained, failed, exit_code = 0, 0, 0, 0
    try:
        for _ in range(args.count):
            record = claim_run(args, sweep_dir, program, train_args, runner)
            if record is None:
                print("[sweep] grid search complete: every configuration has run or is running")
                break
            if not train_run(args, sweep_dir, config, record, hyperband):
                return 130
            trained, failed = trained + 1, failed + (record["state"] == "failed")
            reason = rejection(record)
            if reason:  # bad input fails every run the same way: say why now, not after --count failures
                print(f"error: {record['name']} was rejected: {reason} (see {record['log']}); fix the sweep's "
                      f"parameters or the flags after --", file=sys.stderr)
                return 2
            failures_in_a_row = failures_in_a_row + 1 if record["state"] == "failed" else 0
            if args.max_failures and failures_in_a_row >= args.max_failures:
                print(f"[sweep] stopping: {failures_in_a_row} runs in a row failed; see {sweep_dir / 'logs'}",
                      file=sys.stderr)
                exit_code = 1
                break
    except KeyboardInterrupt:  # between runs
        show_leaderboard(sweep_dir, args.top)
        print(INTERRUPTED, file=sys.stderr)
        return 130
    show_leaderboard(sweep_dir, args.top)
    if trained and failed == trained and not exit_code:
        print(f"[sweep] every run this runner trained failed ({failed}); see {sweep_dir / 'logs'}", file=sys.stderr)
        exit_code = 1
    return exit_code


def rejection(record: dict) -> str | None:
    """The trainer's error line when it refused the run's flags: exit 2 (bad input) before any new epoch."""
    if record["state"] != "failed" or record.get("returncode") != 2:
        return None
    if (record.get("epochs") or 0) > record.get("resumed_after", 0):
        return None
    return error_line([record.get("note") or ""])


def claim_run(args: argparse.Namespace, sweep_dir: Path, program: str, train_args: list[str],
              runner: str) -> dict | None:
    """Under the state lock: an interrupted run to resume, else the next number and proposal, seeing every
    runner's runs (running ones as running, as the W&B controller does), saved as this runner's running
    run before it starts."""
    with changing_state(sweep_dir) as state:
        record = next((r for r in state["runs"] if resumable(r)), None)
        if record is not None:  # continue it from its last.pt rather than train its config again
            record.update(state="running", runner=runner, resumed_after=record.get("epochs") or 0,
                          resumes=record.get("resumes", 0) + 1, note=f"resumed after epoch {record.get('epochs')}")
        else:
            number = next_number(state, sweep_dir / "runs")
            proposal = propose(state["config"], state["runs"], args.seed, number)
            if proposal is None:
                return None
            record = new_record(args, sweep_dir, state["config"], program, train_args, number, proposal)
            record["runner"] = runner
            state["runs"].append(record)
    values = " ".join(f"{k}={fmt(v.get('value'))}" for k, v in record["config"].items()
                      if k in searched_params(state["config"]))
    print(f"\n[sweep] {record['name']}: {values}"
          + (f" (resuming it after epoch {record['resumed_after']})" if record.get("resumes") else ""), flush=True)
    print("[sweep] $ " + " ".join(command_of(record)), flush=True)
    return record


def command_of(record: dict) -> list[str]:
    """The run's command; a resumed run continues its folder from last.pt (--resume wins over the rest)."""
    return record["command"] + (["--resume", record["run_dir"]] if record.get("resumes") else [])


def new_record(args: argparse.Namespace, sweep_dir: Path, config: dict, program: str, train_args: list[str],
               number: int, proposal: dict) -> dict:
    """The record of run `number`: its config, the agent's command, its folder and log."""
    name = f"run-{number:03d}"
    runs_dir, logs_dir = sweep_dir / "runs", sweep_dir / "logs"
    args_json = None
    if any("${args_json_file}" in str(c) for c in config.get("command") or []):
        args_json = sweep_dir / "configs" / f"{name}.json"
        args_json.parent.mkdir(parents=True, exist_ok=True)
        args_json.write_text(sweep_command_args(proposal)["args_json"][0])
    command = run_command(config, proposal, program, runs_dir, name, args.interpreter, args.wandb, train_args,
                          str(args_json) if args_json else None)
    return {"name": name, "number": number, "state": "running", "config": proposal,
            "command": command, "run_dir": str(runs_dir / name), "log": str(logs_dir / f"{name}.log"),
            "started": datetime.now().isoformat(timespec="seconds"), "history": []}


def commit_run(sweep_dir: Path, record: dict) -> None:
    """Under the state lock: this runner's record of a run, replacing its 'running' entry."""
    with changing_state(sweep_dir) as state:
        state["runs"] = [record if r["number"] == record["number"] else r for r in state["runs"]]


def other_runs(sweep_dir: Path, current: dict) -> list[dict]:
    """Every other run of the sweep, the running ones (of any runner) with their metrics so far."""
    state = load_state(sweep_dir) or {"runs": []}  # written atomically: a consistent read without the lock
    others = [r for r in state["runs"] if r["number"] != current["number"]]
    for rec in others:
        if rec["state"] == "running":
            rec["history"] = read_history(Path(rec["run_dir"]))
    return others


def train_run(args: argparse.Namespace, sweep_dir: Path, config: dict, record: dict, hyperband: bool) -> bool:
    """Train a claimed run and record its outcome; False when the runner was interrupted meanwhile."""
    metric, goal = metric_of(config)
    check = (lambda rec: hyperband_should_stop(config, other_runs(sweep_dir, rec), rec)) if hyperband else None
    t0, earlier_s = time.time(), record.get("duration_s", 0.0) if record.get("resumes") else 0.0
    try:
        code, stopped, tail = execute(command_of(record), record, Path(record["run_dir"]), Path(record["log"]),
                                      check, args.poll_s, not args.quiet, append=bool(record.get("resumes")))
    except Interrupted as stop:
        record.pop("pid", None)
        record["duration_s"] = round(earlier_s + time.time() - t0, 1)
        if stop.code == 0 or run_result(record["run_dir"]) is not None:  # it completed before it could stop
            record["returncode"] = stop.code
            finish_run(record, 0, False, stop.tail, metric, goal)
        else:
            mark_interrupted(record, "interrupted (Ctrl-C / SIGTERM of the runner)", metric, goal)
        commit_run(sweep_dir, record)
        show_leaderboard(sweep_dir, args.top)
        print(INTERRUPTED, file=sys.stderr)
        return False
    record.pop("pid", None)
    record["duration_s"] = round(earlier_s + time.time() - t0, 1)
    record["returncode"] = code
    finish_run(record, code, stopped, tail, metric, goal)
    commit_run(sweep_dir, record)
    result = f"{metric} {record['metric']:.4f} (epoch {record['best_epoch']})" if record["metric"] is not None else "-"
    print(f"[sweep] {record['name']} {record['state']}: {result} in {record['duration_s']:.0f}s"
          + (f" ({record['note']})" if record.get("note") else ""), flush=True)
    if record["state"] == "finished" and record["metric"] is None:
        columns = metrics_columns(Path(record["run_dir"]))
        print(f"[sweep] warning: no run logs '{metric}': {record['name']}'s metrics.csv has "
              + (", ".join(columns) if columns else "no columns (or is missing)") + "; fix metric.name in the yaml",
              flush=True)
    return True


def finish_run(record: dict, code: int, stopped: bool, tail: list[str], metric: str, goal: str) -> None:
    """The ended run's folder, history, best metric and state (finished, stopped by hyperband, failed)."""
    run_dir = run_dir_from_output(tail, Path(record["run_dir"]))
    record["run_dir"] = str(run_dir)
    record["history"] = read_history(run_dir)
    summarize(record, metric, goal)
    if code == 0 or run_result(run_dir) is not None:  # complete, also when it ended before a SIGTERM landed
        record["state"] = "finished"
        if record["metric"] is None:
            record["note"] = f"no {metric} in {run_dir / 'metrics.csv'}"
    elif stopped:
        record["state"] = "stopped"
        record["note"] = f"stopped by hyperband after epoch {record['epochs']}"
    else:
        record["state"] = "failed"
        record["note"] = failure_note(tail, code)
    record["ended"] = datetime.now().isoformat(timespec="seconds")


if __name__ == "__main__":
    imports_done()
    try:
        sys.exit(main(parse_args()))
    except UserError as e:  # cli.UserError, raised by sweep_engine too: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # at start-up, or again while stopping: one line, no traceback
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
