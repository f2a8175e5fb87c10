"""The offline sweep's run loop: claim a run from the study, train it as a child process, record how it ended.

A claimed run is an Optuna trial. Its folder (run-NNN, NNN the trial's number), name and program values
are trial attributes, with the folder relative to the sweep folder, so a copied or moved sweep continues
in place. A run whose runner stopped (Ctrl-C, SIGTERM) or died (kill -9, a lost node: a stale
heartbeat) is marked FAIL and queued again with its attributes; the next claim continues its folder
from last.pt with --resume, as a new trial of the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from inat_classifier.cli import UserError
from inat_classifier.storage import atomic_write_text, first_line_starts, refuse_foreign
from inat_classifier.sweep.commands import run_command
from inat_classifier.sweep.leaderboard import (
    Run,
    metrics_columns,
    newest_trials,
    print_leaderboard,
    read_history,
    run_result,
    state_name,
    study_runs,
    summarize,
)
from inat_classifier.sweep.process import (
    INTERRUPTED,
    Interrupted,
    disk_full_line,
    error_line,
    execute,
    failure_note,
    run_dir_from_output,
)
from inat_classifier.sweep.space import Parameter, build_pruner, build_sampler, grid_values, metric_of, plain, suggest
from inat_classifier.sweep.storage import (
    Heartbeat,
    fail_stale_runs,
    requeue,
    storage_errors,
    storage_name,
    trainers,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the runner prints its own lines
# A database's heartbeats serve the runner's own check of stale runs (storage.fail_stale_runs), not Study.optimize.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


@dataclass
class Sweep:
    """One sweep: its folder, config and parameters, its study (None before its first run), and how runs start."""

    dir: Path
    config: dict
    params: list[Parameter]
    study: optuna.Study | None
    config_path: Path | None
    program: str = ""
    train_args: list[str] = field(default_factory=list)

    @property
    def metric(self) -> tuple[str, str]:
        return metric_of(self.config)


@dataclass
class Claim:
    """A run this runner trains now: its trial and what the trial records."""

    trial: optuna.Trial
    name: str
    run_dir: str  # relative to the sweep folder
    run_config: dict  # {name: {"value": v}}, as W&B hands it to the agent
    resumed_after: int = 0  # epochs already in its folder
    earlier_s: float = 0.0
    resume: bool = False  # continue its folder (it exists: the trainer started it) with --resume


def with_sampler(sweep: Sweep, args: argparse.Namespace) -> optuna.Study:
    """The sweep's study with this runner's sampler and pruner (a loaded study has Optuna's defaults)."""
    study = sweep.study
    study.sampler = build_sampler(sweep.config, sweep.params, args.seed)
    study.pruner = build_pruner(sweep.config, args.early_terminate)
    return study


# ----------------------------------------------------------------------------- the runs of a study
def sweep_runs(sweep: Sweep) -> list[Run]:
    """Every run of the sweep, once each."""
    return [] if sweep.study is None else study_runs(sweep.study, sweep.dir, *sweep.metric)


def new_run_name(study: optuna.Study, trial_number: int) -> str:
    """A new run's folder name: its first trial's number, as optuna-dashboard numbers trials (unique across
    runners, so no coordination is needed). A sweep started when runs were counted from 1 (its trials' `run`
    is that count) goes on so, so that no new run takes the folder of an earlier one."""
    counted = any(isinstance(t.user_attrs.get("run"), int) for t in study.get_trials(deepcopy=False))
    return f"run-{trial_number + counted:03d}"


BEST_CONFIG_FILE = "best.yaml"
BEST_YAML_STARTS = ("# best run of ", "# run-")  # the first line of a best.yaml the runner wrote (now, earlier)
# Flags of a run's args.json that belong to that run's folder, not to its configuration.
RUN_BOOKKEEPING = ("out_dir", "run_name", "resume", "wandb", "config", "use_cache")


def write_best_config(sweep: Sweep, best: Run, writable: bool) -> None:
    """Print the best run's ready command and write SWEEP_DIR/best.yaml: its flags, for --config."""
    run_dir = best.run_dir
    try:
        flags = json.loads((run_dir / "args.json").read_text())
    except (OSError, ValueError):
        print(f"[sweep] best run {best.name}: no readable {run_dir / 'args.json'}; no best.yaml")
        return
    flags = {k: v for k, v in flags.items() if k not in RUN_BOOKKEEPING}
    program = Path(sweep.config["program"]).name
    target = sweep.dir / BEST_CONFIG_FILE
    if writable:
        refuse_foreign(target, first_line_starts(*BEST_YAML_STARTS), "a best.yaml")
        atomic_write_text(
            target,
            f"{BEST_YAML_STARTS[0]}{sweep.dir}: {best.name}, {sweep.metric[0]} {best.metric:.4f}\n"
            + yaml.safe_dump(flags, sort_keys=False),
        )
    print(f"\nbest run: {best.name} ({sweep.metric[0]} {best.metric:.4f}, epoch {best.best_epoch})")
    print(
        f"train it again, longer:  python {program} --config {target} --epochs 30"
        + ("" if writable else f"   ({sweep.dir} is read-only: no best.yaml written)")
    )
    print(f"test it:                 python evaluate.py --ckpt {run_dir / 'best.pt'}")


def show_leaderboard(sweep: Sweep, top: int) -> None:
    print_leaderboard(sweep.dir, sweep.config, sweep_runs(sweep), top)


# ----------------------------------------------------------------------------- claiming
def done_reason(sweep: Sweep) -> str | None:
    """Why no run is left to claim: run_cap reached, or every grid point has run or is running."""
    runs = newest_trials(sweep.study)
    cap = sweep.config.get("run_cap")
    if cap is not None and len(runs) >= cap and not any(t.state == TrialState.WAITING for t in runs.values()):
        return f"[sweep] run_cap reached: {len(runs)} runs"
    if sweep.config["method"] == "grid":
        total = math.prod(len(grid_values(p)) for p in sweep.params if p.searched)
        taken = {
            t.system_attrs.get("grid_id")
            for t in sweep.study.get_trials(deepcopy=False)
            if "duplicate_of" not in t.user_attrs and t.user_attrs.get("status") != "duplicate"  # or an older sweep's
        } - {None}
        if len(taken) >= total and not any(t.state == TrialState.WAITING for t in runs.values()):
            return "[sweep] grid search complete: every configuration has run or is running"
    return None


def duplicate_grid_point(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """The trial of another runner that holds this trial's grid point (the continued run, or else the lowest
    trial number), or None."""
    me = study._storage.get_trial(trial._trial_id)
    grid_id = me.system_attrs.get("grid_id")
    if grid_id is None:
        return None
    for t in study.get_trials(deepcopy=False):
        if t.number == me.number or t.system_attrs.get("grid_id") != grid_id or t.state == TrialState.FAIL:
            continue
        if "failed_trial" in t.system_attrs or t.number < me.number:
            return t.number
    return None


def claim_run(sweep: Sweep, stale_s: float) -> Claim | None:
    """A run to train: a queued one to continue, else a new sample; None when the sweep is done."""
    study = sweep.study
    for number in fail_stale_runs(study, stale_s):
        print(f"[sweep] trial {number}: its runner stopped beating; its run is queued to continue")
    while True:
        reason = done_reason(sweep)
        if reason:
            print(reason)
            return None
        trial = study.ask()
        attrs = trial.user_attrs
        trial.set_user_attr("trainers", trainers(trial.number, [os.getpid()]))
        if "run_dir" in attrs:  # a run queued to continue: its folder, from its last.pt
            epochs = len(read_history(sweep.dir / attrs["run_dir"]))
            trial.set_user_attr("note", f"resumed after epoch {epochs}")
            return Claim(
                trial,
                Path(attrs["run_dir"]).name,
                attrs["run_dir"],
                attrs["run_config"],
                epochs,
                attrs.get("duration_s", 0.0),
                resume=(sweep.dir / attrs["run_dir"]).is_dir(),
            )
        holder = duplicate_grid_point(study, trial)
        if holder is not None:  # no run: the trial only drew a grid point another runner trains
            trial.set_user_attr("duplicate_of", holder)
            study.tell(trial, state=TrialState.FAIL)
            continue
        run_config = plain(suggest(trial, sweep.params))
        name = new_run_name(study, trial.number)
        for key, value in {
            "run": name,
            "run_dir": f"runs/{name}",
            "run_config": run_config,
            "log": f"logs/{name}.log",
        }.items():
            trial.set_user_attr(key, value)
        return Claim(trial, name, f"runs/{name}", run_config)


# ----------------------------------------------------------------------------- training
def command_of(args: argparse.Namespace, sweep: Sweep, claim: Claim) -> list[str]:
    """The agent's command for the run; a continued run resumes its folder (--resume wins over the rest)."""
    command = run_command(
        sweep.config,
        claim.run_config,
        sweep.program,
        sweep.dir / "runs",
        claim.name,
        args.interpreter,
        args.wandb,
        sweep.train_args,
    )
    return command + (["--resume", str(sweep.dir / claim.run_dir)] if claim.resume else [])


def pruning_check(sweep: Sweep, claim: Claim, heartbeat: Heartbeat, run_dir: Path, hyperband: bool, record: dict):
    """What the watcher calls every poll: the training process's pid once, a heartbeat, and each new epoch's
    metric for the pruner."""
    metric = sweep.metric[0]
    reported: set[int] = set()

    def check() -> bool:
        if "pid" in record and not record.get("recorded"):
            claim.trial.set_user_attr("trainers", trainers(claim.trial.number, [os.getpid(), record["pid"]]))
            record["recorded"] = True
        heartbeat.beat()
        if not hyperband:
            return False
        new = [row for row in read_history(run_dir) if row.get("epoch") not in reported and metric in row]
        for row in new:
            claim.trial.report(row[metric], step=row["epoch"])
            reported.add(row["epoch"])
        return bool(new) and claim.trial.should_prune()

    return check


def train_claimed(args: argparse.Namespace, sweep: Sweep, claim: Claim) -> str | None:
    """Train a claimed run and record it; its state, or None when the runner was interrupted meanwhile."""
    run_dir, log = sweep.dir / claim.run_dir, sweep.dir / "logs" / f"{claim.name}.log"
    if run_result(run_dir) is not None:  # it completed, but its runner died before recording that
        return record_end(sweep, claim, 0, False, [], 0.0, "completed; its runner stopped before it recorded that")
    values = " ".join(
        f"{k}={v['value']}" for k, v in claim.run_config.items() if k in {p.name for p in sweep.params if p.searched}
    )
    print(
        f"\n[sweep] {claim.name}: {values}"
        + (f" (resuming it after epoch {claim.resumed_after})" if claim.resume else ""),
        flush=True,
    )
    command = command_of(args, sweep, claim)
    print("[sweep] $ " + " ".join(command), flush=True)
    heartbeat = Heartbeat(sweep.study, claim.trial, args.stale_s)
    heartbeat.beat()
    hyperband = args.early_terminate and bool(sweep.config.get("early_terminate"))
    record = {"name": claim.name}
    check = pruning_check(sweep, claim, heartbeat, run_dir, hyperband, record)
    t0 = time.time()
    try:
        code, stopped, tail = execute(command, record, log, check, args.poll_s, not args.quiet, append=claim.resume)
    except Interrupted as stop:
        if stop.code == 0 or run_result(run_dir) is not None:  # it completed before it could stop
            record_end(sweep, claim, 0, False, stop.tail, time.time() - t0)
        else:
            record_interrupted(sweep, claim, time.time() - t0)
        show_leaderboard(sweep, args.top)
        print(INTERRUPTED, file=sys.stderr)
        return None
    return record_end(sweep, claim, code, stopped, tail, time.time() - t0)


def record_interrupted(sweep: Sweep, claim: Claim, seconds: float) -> None:
    """A run cut short by its runner stopping: FAIL, and queued to continue from its last.pt."""
    trial = claim.trial
    trial.set_user_attr("note", "interrupted (Ctrl-C / SIGTERM of the runner)")
    trial.set_user_attr("duration_s", round(claim.earlier_s + seconds, 1))
    sweep.study.tell(trial, state=TrialState.FAIL)
    requeue(sweep.study, trial._trial_id)


def record_end(
    sweep: Sweep, claim: Claim, code: int, stopped: bool, tail: list[str], seconds: float, note: str = ""
) -> str:
    """Tell the study how the run ended (complete, pruned by hyperband, fail) and print one line; its state."""
    metric, goal = sweep.metric
    run_dir = run_dir_from_output(tail, sweep.dir / claim.run_dir)
    history = read_history(run_dir)
    best, best_epoch = summarize(history, metric, goal)
    trial = claim.trial
    attrs = {
        "duration_s": round(claim.earlier_s + seconds, 1),
        "returncode": code,
        "best_epoch": best_epoch,
        "epochs": len(history),
    }
    trained = code == 0 or run_result(run_dir) is not None  # all epochs, also when it ended before a SIGTERM landed
    disk_full = not trained and not stopped and disk_full_line(tail)
    if trained:
        state = TrialState.COMPLETE if best is not None else TrialState.FAIL
        note = note or ("" if best is not None else f"no {metric} in {run_dir / 'metrics.csv'}")
    elif stopped:
        state, note = TrialState.PRUNED, f"pruned by hyperband after epoch {len(history)}"
    elif disk_full:  # not the run's fault: it continues from its last.pt once there is space
        state, note = TrialState.FAIL, disk_full
    else:
        state, note = TrialState.FAIL, failure_note(tail, code)
    for key, value in {**attrs, "note": note}.items():
        trial.set_user_attr(key, value)
    sweep.study.tell(trial, best if state == TrialState.COMPLETE else None, state=state)
    if disk_full:
        requeue(sweep.study, trial._trial_id)
    result = f"{metric} {best:.4f} (epoch {best_epoch})" if best is not None else "-"
    print(
        f"[sweep] {claim.name} {state_name(state)}: {result} in {attrs['duration_s']:.0f}s"
        + (f" ({note})" if note else ""),
        flush=True,
    )
    if trained and best is None:
        columns = metrics_columns(run_dir)
        print(
            f"[sweep] warning: no run logs '{metric}': {claim.name}'s metrics.csv has "
            + (", ".join(columns) if columns else "no columns (or is missing)")
            + "; fix metric.name in the yaml",
            flush=True,
        )
    if disk_full:
        return "stopped:" + note
    if not trained and state == TrialState.FAIL and code == 2 and len(history) <= claim.resumed_after:
        trial_note = error_line(tail)
        if trial_note:  # bad input fails every run the same way: say why now, not after --count failures
            return "rejected:" + trial_note
    return state_name(state)


def claim_and_train(args: argparse.Namespace, sweep: Sweep, where: str) -> tuple[Claim | None, str | None]:
    """Claim the next run and train it: (its claim, its state), (None, None) when the sweep is done.

    A failure of the storage meanwhile is one line, which names the run left for the next runner: the
    study still says it runs, and the next runner on this machine sees that its processes ended.
    """
    claim = None
    try:
        with storage_errors(where):
            claim = claim_run(sweep, args.stale_s)
            return (None, None) if claim is None else (claim, train_claimed(args, sweep, claim))
    except UserError as e:
        if claim is None:
            raise
        raise UserError(f"{e}; {claim.name} is left to continue: run the same command again once fixed") from None


def stop_line(sweep: Sweep, claim: Claim, status: str) -> str:
    """The one line of a run that stops the runner: its flags rejected, or a full disk."""
    kind, _, line = status.partition(":")
    if kind == "stopped":
        return (
            f"error: {claim.name} stopped: {line.removeprefix('error: ')}; it continues from its last.pt "
            f"when the same command runs again"
        )
    return (
        f"error: {claim.name} was rejected: {line} (see {sweep.dir / 'logs' / claim.name}.log); "
        f"fix the sweep's parameters or the flags after --"
    )


def run_loop(args: argparse.Namespace, sweep: Sweep) -> int:
    """Claim, train and record runs until --count, the end of the sweep, a rejected run, too many failures or
    an interrupt; the exit code: 0, 1 (runs failed), 2 (a run's flags were rejected), 130."""
    with_sampler(sweep, args)
    metric, goal = sweep.metric
    print(
        f"[sweep] {sweep.dir}: {sweep.config['method']} search, {metric} ({goal}), "
        f"{len(newest_trials(sweep.study))} runs so far; training {args.count} more",
        flush=True,
    )
    failures_in_a_row, trained, failed = 0, 0, 0
    where = storage_name(sweep.dir, args.storage)
    try:
        for _ in range(args.count):
            claim, status = claim_and_train(args, sweep, where)
            if claim is None:
                break
            if status is None:
                return 130
            if status.startswith(("rejected:", "stopped:")):
                print(stop_line(sweep, claim, status), file=sys.stderr)
                return 2
            fail = status == state_name(TrialState.FAIL)
            trained, failed = trained + 1, failed + fail
            failures_in_a_row = failures_in_a_row + 1 if fail else 0
            if args.max_failures and failures_in_a_row >= args.max_failures:
                print(
                    f"[sweep] stopping: {failures_in_a_row} runs in a row failed; see {sweep.dir / 'logs'}",
                    file=sys.stderr,
                )
                show_leaderboard(sweep, args.top)
                return 1
    except KeyboardInterrupt:  # between runs
        show_leaderboard(sweep, args.top)
        print(INTERRUPTED, file=sys.stderr)
        return 130
    show_leaderboard(sweep, args.top)
    if trained and failed == trained:
        print(f"[sweep] every run this runner trained failed ({failed}); see {sweep.dir / 'logs'}", file=sys.stderr)
        return 1
    return 0


def dry_run(args: argparse.Namespace, sweep: Sweep) -> int:
    """Print the commands of the next --count samples, from a copy of the study in memory; nothing is saved."""
    memory = optuna.create_study(
        direction=sweep.metric[1], sampler=build_sampler(sweep.config, sweep.params, args.seed)
    )
    if sweep.study is not None:
        memory.add_trials([t for t in sweep.study.get_trials() if t.state.is_finished()])
    copy = Sweep(sweep.dir, sweep.config, sweep.params, memory, sweep.config_path, sweep.program, sweep.train_args)
    for _ in range(args.count):
        if done_reason(copy):
            print(
                "grid search complete: no more configurations"
                if sweep.config["method"] == "grid"
                else done_reason(copy)
            )
            break
        trial = memory.ask()
        run_config = plain(suggest(trial, sweep.params))
        name = new_run_name(memory, trial.number)
        claim = Claim(trial, name, f"runs/{name}", run_config)
        trial.set_user_attr("run_dir", claim.run_dir)
        print(" ".join(command_of(args, copy, claim)))
    return 0
