"""The offline sweep's runs: the agent's command for a run, a run's metrics, and the leaderboard of the study's runs.

Everything here is plain functions over the sweep config, the run folders and the Optuna trials;
nothing starts a process. The run commands come from wandb's own helpers, so a run gets exactly
the argv `wandb agent` would pass it.
"""

from __future__ import annotations

import csv
import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inat_classifier.cli import METRIC_FIELDS, RESULT_FILE, UserError
from inat_classifier.storage import atomic_write
from inat_classifier.sweep.space import metric_of

DEFAULT_SWEEP_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # as wandb agent
# Flags the runner sets itself on every run; passing them after `--` would break the bookkeeping.
MANAGED_FLAGS = ("out_dir", "run_name", "resume", "wandb")
HERE = Path(__file__).resolve().parents[2]  # the repository root, where the training scripts are
OWN_PROGRAMS = ("train_parta.py", "train_partb.py")  # their metrics.csv has exactly METRIC_FIELDS


def plain(value: Any) -> Any:
    """numpy scalars and nested containers as plain JSON types (what the W&B backend sends)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


# ----------------------------------------------------------------------------- command line
def sweep_command_args(run_config: dict) -> dict:
    """wandb's own helper: the argument formats `wandb agent` fills ${args}, ${args_no_hyphens}... with."""
    try:
        from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    except ImportError:
        raise UserError("sweep_offline.py builds run commands with wandb's helper; pip install wandb") from None
    return create_sweep_command_args({"args": run_config})


def build_command(
    config: dict, run_config: dict, interpreter: str, program: str | None = None, args_json_file: str | None = None
) -> list[str]:
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


def run_command(
    config: dict,
    proposal: dict,
    program: str,
    runs_dir: Path,
    name: str,
    interpreter: str,
    wandb: str,
    train_args: list[str],
    args_json_file: str | None = None,
) -> list[str]:
    """The agent's command, then the runner's bookkeeping flags, then the -- flags (last, so they win)."""
    command = build_command(config, proposal, interpreter, program, args_json_file)
    return command + ["--out_dir", str(runs_dir), "--run_name", name, "--wandb", wandb, *train_args]


def resolve_program(program: str, config_path: Path | None) -> str:
    """The program as written when it exists here (as wandb agent runs it), else next to the config."""
    if Path(program).is_file():
        return program
    for base in filter(None, (config_path.parent if config_path else None, HERE)):
        if (base / program).is_file():
            return str((base / program).resolve())
    raise UserError(
        f"program '{program}' of the sweep config not found in {Path.cwd()}; run from the folder that holds it"
    )


def check_metric(config: dict, program: str) -> None:
    """Refuse a metric that our own training scripts never log (a typo would rank nothing)."""
    metric, _ = metric_of(config)
    if Path(program).name in OWN_PROGRAMS and metric not in METRIC_FIELDS:
        raise UserError(
            f"metric '{metric}' is not logged by {Path(program).name}: its metrics.csv has "
            f"{', '.join(METRIC_FIELDS)}; fix metric.name in the yaml"
        )


def check_swept_not_passed(config: dict, extra: list[str]) -> None:
    """Refuse a swept parameter also given after --: the run would train with a value the sweep never records."""
    searched = set(searched_params(config))
    for arg in extra:
        name = arg.split("=", 1)[0].lstrip("-").replace("-", "_")
        if arg.startswith("--") and name in searched:
            raise UserError(
                f"'{arg}' after -- sets '{name}', which the sweep searches; remove it, or make it "
                f"a fixed 'value:' in the sweep yaml"
            )


def check_train_args(extra: list[str]) -> None:
    """Refuse `--` flags that the runner sets on every run itself."""
    for arg in extra:
        name = arg.split("=", 1)[0].lstrip("-").replace("-", "_")
        if arg.startswith("--") and name in MANAGED_FLAGS:
            raise UserError(
                f"'{arg}' after -- is set by the sweep runner itself (use --sweep_dir / --wandb of sweep_offline.py)"
            )


# ----------------------------------------------------------------------------- run folders
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


def metrics_columns(run_dir: Path) -> list[str]:
    """The header of the run's metrics.csv ([] without one): what its metric can be named."""
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            return next(csv.reader(f), [])
    except OSError:
        return []


def run_result(run_dir: str | Path) -> dict | None:
    """The run folder's result.json (runs.write_result), or None while the run is incomplete."""
    try:
        result = json.loads((Path(run_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One run of the sweep as the leaderboard shows it (the newest trial of its folder)."""

    name: str
    number: int
    state: str  # finished, stopped (hyperband), failed, interrupted, running, queued (to resume)
    run_dir: str  # relative to the sweep folder
    config: dict = field(default_factory=dict)  # {name: value}, as the program got them
    metric: float | None = None
    best_epoch: int | None = None
    epochs: int = 0
    minutes: float = 0.0
    note: str = ""


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


def ranked(runs: list[Run], goal: str) -> list[Run]:
    """Best metric first; runs without a metric (failed, no epoch yet) last, in run order."""
    with_metric = sorted((r for r in runs if r.metric is not None), key=lambda r: r.metric, reverse=goal == "maximize")
    return with_metric + sorted((r for r in runs if r.metric is None), key=lambda r: r.number)


# ----------------------------------------------------------------------------- leaderboard
def searched_params(config: dict) -> list[str]:
    """The parameters the sweep varies (not the fixed `value:` ones)."""
    return [k for k, v in config["parameters"].items() if not (isinstance(v, dict) and "value" in v)]


def fmt(value: Any) -> str:
    """A value as short as it reads well in a table."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


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


def write_leaderboard(sweep_dir: Path, config: dict, runs: list[Run]) -> list[dict]:
    """SWEEP_DIR/leaderboard.csv (written atomically), one row per run, best first; returns the rows."""
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
        row.update({"run_dir": run.run_dir, "note": run.note})
        rows.append(row)
    columns = ["rank", "run", "state", metric, "best_epoch", "epochs", "minutes", *params.values(), "run_dir", "note"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(sweep_dir / "leaderboard.csv", write, need=4096 + 512 * len(rows), what="the leaderboard")
    return rows


def print_leaderboard(sweep_dir: Path, config: dict, runs: list[Run], top: int = 0, write: bool = True) -> None:
    """Write leaderboard.csv (unless read-only) and print it as a table (the first `top` rows; 0 = all)."""
    metric, goal = metric_of(config)
    params = param_columns(config)
    if write:
        write_leaderboard(sweep_dir, config, runs)
    cols = [
        "rank",
        "run",
        "state",
        metric,
        "best_epoch",
        "minutes",
        *(params[p] for p in searched_params(config)),
        "note",
    ]
    shown = ranked(runs, goal)[:top] if top else ranked(runs, goal)
    table = []
    for rank, run in enumerate(shown, 1):
        values = {
            "rank": rank,
            "run": run.name,
            "state": run.state,
            metric: run.metric,
            "best_epoch": run.best_epoch,
            "minutes": round(run.minutes, 2),
            "note": run.note,
            **{params[p]: run.config.get(p) for p in searched_params(config)},
        }
        table.append([fmt(values.get(c)) for c in cols])
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(cols)]
    print(f"\nleaderboard of {sweep_dir} ({config['method']}, {metric} {goal}, {len(runs)} runs):")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)).rstrip())
    if top and len(runs) > top:
        print(f"... {len(runs) - top} more")
    if write:
        print(f"leaderboard: {sweep_dir / 'leaderboard.csv'}")
