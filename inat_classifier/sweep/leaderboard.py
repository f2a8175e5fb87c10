"""The runs of a sweep as the leaderboard and the report show them: read from the study and the run folders, ranked.

A run is a run folder; its trials are the trial that started it and those that continued it
(runner.py). Its state is its newest trial's Optuna TrialState, in lowercase (complete, pruned,
fail, running, waiting), the words optuna-dashboard shows; its number is its first trial's number,
which the runner also gives its folder (run-NNN).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from inat_classifier.cli import RESULT_FILE
from inat_classifier.runs import read_metrics_csv
from inat_classifier.storage import atomic_write, first_line_starts, refuse_foreign
from inat_classifier.sweep.space import metric_of


def state_name(state: TrialState) -> str:
    """The one word for a run's state everywhere: Optuna's TrialState name in lowercase."""
    return state.name.lower()


COMPLETE = state_name(TrialState.COMPLETE)


# ----------------------------------------------------------------------------- a run folder's files
def read_history(run_dir: Path) -> list[dict]:
    """metrics.csv rows (runs.read_metrics_csv); [] when the run wrote none (yet) or it cannot be read."""
    try:
        return read_metrics_csv(run_dir / "metrics.csv")
    except (OSError, UnicodeDecodeError):
        return []


def metrics_columns(run_dir: Path) -> list[str]:
    """The header of the run's metrics.csv ([] without one): what its metric can be named."""
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError):
        return []


def run_result(run_dir: str | Path) -> dict | None:
    """The run folder's result.json (runs.write_result), or None while the run is incomplete."""
    try:
        result = json.loads((Path(run_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


EVAL_COLUMNS = {"test_acc": "accuracy", "ece": "ece", "nll": "nll"}  # column -> eval.json key


def evaluation(run_dir: str | Path) -> dict:
    """The run's held-out figures from the eval.json evaluate.py wrote into its folder; {} without one."""
    try:
        report = json.loads((Path(run_dir) / "eval.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(report, dict):
        return {}
    found = {col: report.get(key) for col, key in EVAL_COLUMNS.items()}
    return {col: v for col, v in found.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def summarize(history: list[dict], metric: str, goal: str) -> tuple[float | None, int | None]:
    """Best metric over epochs, and its epoch (None, None when no epoch logged it)."""
    values = [
        (h[metric], h.get("epoch", i + 1))
        for i, h in enumerate(history)
        if isinstance(h.get(metric), (int, float)) and math.isfinite(h[metric])
    ]
    if not values:
        return None, None
    return (max if goal == "maximize" else min)(values, key=lambda t: t[0])


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One run of the sweep: its newest trial, and what the leaderboard and the report show of it."""

    trial: FrozenTrial  # the newest trial of its folder
    name: str  # its folder's name
    number: int  # its first trial's number
    state: str  # state_name of its newest trial
    run_dir: Path  # the sweep folder / the folder its trials record
    metric: float | None = None  # the trial's value once complete, else the best epoch so far
    best_epoch: int | None = None
    epochs: int = 0
    minutes: float = 0.0
    note: str = ""

    @property
    def config(self) -> dict:
        """{name: value} as the program got them."""
        return {k: v.get("value") for k, v in (self.trial.user_attrs.get("run_config") or {}).items()}


def run_trials(study) -> dict[str, tuple[FrozenTrial, FrozenTrial]]:
    """(first, newest) trial of every run folder: a continued run's earlier, failed trials are not runs of their own."""
    runs: dict[str, tuple[FrozenTrial, FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        folder = t.user_attrs.get("run_dir")
        if folder is None:
            continue
        first, newest = runs.get(folder, (t, t))
        runs[folder] = (min(first, t, key=lambda x: x.number), max(newest, t, key=lambda x: x.number))
    return runs


def newest_trials(study) -> dict[str, FrozenTrial]:
    """The newest trial of every run folder."""
    return {folder: newest for folder, (_, newest) in run_trials(study).items()}


def run_of(first: FrozenTrial, t: FrozenTrial, base: Path, metric: str, goal: str, now: float) -> Run:
    """A run from its trials: its metric from the study, or from its metrics.csv (or reports) while unfinished."""
    a = t.user_attrs
    run_dir = base / a["run_dir"]
    history = read_history(run_dir)
    best, best_epoch = summarize(history, metric, goal)
    if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
        best, best_epoch = float(t.value), a.get("best_epoch", best_epoch)
    elif best is None:  # no metrics.csv here (a run folder on another node): what it reported to the pruner
        reported = {e: v for e, v in t.intermediate_values.items() if v is not None and math.isfinite(v)}
        if reported:
            best_epoch, best = (max if goal == "maximize" else min)(reported.items(), key=lambda kv: kv[1])
    running = t.state == TrialState.RUNNING and t.datetime_start is not None
    elapsed = now - t.datetime_start.timestamp() if running else 0.0
    return Run(
        trial=t,
        name=Path(a["run_dir"]).name,
        number=first.number,
        state=state_name(t.state),
        run_dir=run_dir,
        metric=best,
        best_epoch=best_epoch,
        epochs=len(history) or len(t.intermediate_values),
        minutes=(a.get("duration_s", 0.0) + elapsed) / 60,
        note=a.get("note", ""),
    )


def study_runs(study, base: Path, metric: str, goal: str) -> list[Run]:
    """Every run of the study once, in the order they were started; run folders are relative to `base`."""
    now = time.time()
    runs = [run_of(first, newest, Path(base), metric, goal, now) for first, newest in run_trials(study).values()]
    return sorted(runs, key=lambda r: r.number)


def ranked(runs: list[Run], goal: str) -> list[Run]:
    """Complete runs best first, then the others with a metric (best first), then those without one (run order)."""
    sign = -1.0 if goal == "maximize" else 1.0
    return sorted(runs, key=lambda r: (r.metric is None, r.state != COMPLETE, sign * (r.metric or 0.0), r.number))


def best_run(runs: list[Run], goal: str) -> Run | None:
    """The best complete run, if any."""
    complete = [r for r in runs if r.metric is not None and r.state == COMPLETE]
    return ranked(complete, goal)[0] if complete else None


# ----------------------------------------------------------------------------- the sweep folder's files
LEADERBOARD_FILE, LEADERBOARD_START = "leaderboard.csv", "rank,run,state,"  # the start of its first line


# ----------------------------------------------------------------------------- tables
def searched_params(config: dict) -> list[str]:
    """The parameters the sweep varies (not the fixed `value:` ones), in the yaml's order."""
    return [k for k, v in config["parameters"].items() if not (isinstance(v, dict) and "value" in v)]


def fmt(value: Any) -> str:
    """A value as short as it reads well in a table."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """A title line, then the header and rows in aligned columns (values through fmt)."""
    table = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(t[i]) for t in table]) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)).rstrip())


FIXED_COLUMNS = ("rank", "run", "state", "best_epoch", "epochs", "minutes", "run_dir", "note")


def param_columns(config: dict) -> dict[str, str]:
    """Each parameter's leaderboard column: its name, or param_<name> where that is a fixed column or the
    metric (a parameter `epochs` or `state`), so that no column appears twice."""
    metric, _ = metric_of(config)
    taken = {*FIXED_COLUMNS, metric}
    columns = {}
    for p in config["parameters"]:
        column = p
        while column in taken:
            column = f"param_{column}"
        taken.add(column)
        columns[p] = column
    return columns


def leaderboard_rows(config: dict, runs: list[Run]) -> list[dict]:
    """One row per run, best first, every column of leaderboard.csv."""
    metric, goal = metric_of(config)
    params = param_columns(config)
    rows = []
    for rank, run in enumerate(ranked(runs, goal), 1):
        row = {
            "rank": rank,
            "run": run.name,
            "state": run.state,
            metric: run.metric,
            "best_epoch": run.best_epoch,
            "epochs": run.epochs,
            "minutes": round(run.minutes, 2),
        }
        row.update({col: run.config.get(p) for p, col in params.items()})
        row.update({"run_dir": run.trial.user_attrs["run_dir"], "note": run.note})
        rows.append(row)
    return rows


def write_leaderboard(sweep_dir: Path, config: dict, runs: list[Run]) -> list[dict]:
    """SWEEP_DIR/leaderboard.csv (written atomically), one row per run, best first; returns the rows."""
    metric, _ = metric_of(config)
    rows = leaderboard_rows(config, runs)
    columns = ["rank", "run", "state", metric, "best_epoch", "epochs", "minutes"]
    columns += [*param_columns(config).values(), "run_dir", "note"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    refuse_foreign(sweep_dir / LEADERBOARD_FILE, first_line_starts(LEADERBOARD_START), "a leaderboard")
    atomic_write(sweep_dir / LEADERBOARD_FILE, write, need=4096 + 512 * len(rows), what="the leaderboard")
    return rows


def print_leaderboard(sweep_dir: Path, config: dict, runs: list[Run], top: int = 0, write: bool = True) -> None:
    """Write leaderboard.csv (unless read-only) and print it as a table (the first `top` rows; 0 = all)."""
    metric, goal = metric_of(config)
    if write:
        write_leaderboard(sweep_dir, config, runs)
    params = param_columns(config)
    cols = ["rank", "run", "state", metric, "best_epoch", "minutes", *(params[p] for p in searched_params(config))]
    rows = leaderboard_rows(config, runs)
    shown = rows[:top] if top else rows
    print_table(
        f"leaderboard of {sweep_dir} ({config['method']}, {metric} {goal}, {len(runs)} runs):",
        [*cols, "note"],
        [[row[c] for c in [*cols, "note"]] for row in shown],
    )
    if top and len(runs) > top:
        print(f"... {len(runs) - top} more")
    if write:
        print(f"leaderboard: {sweep_dir / LEADERBOARD_FILE}")
