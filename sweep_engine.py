"""The offline sweep's engine and state: config, proposals, early stopping, run commands, sweep.json, leaderboard.

Everything here is plain functions over the sweep config and the run records kept in
SWEEP_DIR/sweep.json; nothing starts a process. The proposals and hyperband decisions come from
the open-source `sweeps` package (the engine W&B's local controller uses), the run commands from
wandb's own helpers, so a run gets exactly what `wandb agent` would pass it.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import random
import warnings
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from cli import METRIC_FIELDS, RESULT_FILE, UserError

STATE_FORMAT = "sweep-offline/1"
DEFAULT_SWEEP_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # as wandb agent
# Flags the runner sets itself on every run; passing them after `--` would break the bookkeeping.
MANAGED_FLAGS = ("out_dir", "run_name", "resume", "wandb")
HERE = Path(__file__).resolve().parent
OWN_PROGRAMS = ("train_parta.py", "train_partb.py")  # their metrics.csv has exactly METRIC_FIELDS


# ----------------------------------------------------------------------------- config
def import_sweeps() -> ModuleType:
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
    """W&B's schema, plus what the runner itself needs (program, method, parameters, a metric to rank by)."""
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


# ----------------------------------------------------------------------------- proposals
def to_sweep_run(record: dict) -> Any:
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


def engine_runs(records: list[dict]) -> list:
    """The records the engine learns from, as `sweeps.SweepRun`s (interrupted ones left out)."""
    return [r for r in (to_sweep_run(rec) for rec in records) if r is not None]


def propose(config: dict, records: list[dict], seed: int | None, number: int) -> dict | None:
    """The next run's config ({name: {"value": v}}), or None when a grid is exhausted."""
    import numpy as np

    sweeps = import_sweeps()
    saved = (random.getstate(), np.random.get_state())
    if seed is not None:  # reproducible, and a resumed sweep does not repeat earlier draws
        s = (seed * 1_000_003 + number) % 2**32
        random.seed(s)
        np.random.seed(s)  # the engine draws from numpy's global generator
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn convergence chatter from the GP fit
            run = sweeps.next_run(config, engine_runs(records))
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
    runs = engine_runs(records)
    running = to_sweep_run(dict(current, state="running"))
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


def run_command(config: dict, proposal: dict, program: str, runs_dir: Path, name: str, interpreter: str,
                wandb: str, train_args: list[str], args_json_file: str | None = None) -> list[str]:
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
    raise UserError(f"program '{program}' of the sweep config not found in {Path.cwd()}; run from the "
                    f"folder that holds it")


def check_metric(config: dict, program: str) -> None:
    """Refuse a metric that our own training scripts never log (a typo would rank nothing)."""
    metric, _ = metric_of(config)
    if Path(program).name in OWN_PROGRAMS and metric not in METRIC_FIELDS:
        raise UserError(f"metric '{metric}' is not logged by {Path(program).name}: its metrics.csv has "
                        f"{', '.join(METRIC_FIELDS)}; fix metric.name in the yaml")


def check_train_args(extra: list[str]) -> None:
    """Refuse `--` flags that the runner sets on every run itself."""
    for arg in extra:
        name = arg.split("=", 1)[0].lstrip("-").replace("-", "_")
        if arg.startswith("--") and name in MANAGED_FLAGS:
            raise UserError(f"'{arg}' after -- is set by the sweep runner itself (use --sweep_dir / --wandb "
                            f"of sweep_offline.py)")


# ----------------------------------------------------------------------------- state
def default_sweep_dir(config: dict, config_path: Path) -> Path:
    """sweeps/<the yaml's name, else its file name>, made safe as a folder name."""
    name = str(config.get("name") or config_path.stem)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".") or "sweep"
    return Path("sweeps") / safe


def new_state(config: dict, config_path: Path) -> dict:
    """The sweep.json of a sweep that has not trained anything yet."""
    return {"format": STATE_FORMAT, "config": plain(config), "config_file": str(config_path.resolve()),
            "created": datetime.now().isoformat(timespec="seconds"), "runs": []}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temporary file, then rename: a runner killed mid-write leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def load_state(sweep_dir: Path) -> dict | None:
    """The sweep's stored state, or None for a folder that holds no sweep yet."""
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


def metrics_columns(run_dir: Path) -> list[str]:
    """The header of the run's metrics.csv ([] without one): what its metric can be named."""
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            return next(csv.reader(f), [])
    except OSError:
        return []


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


def mark_interrupted(record: dict, note: str, metric: str, goal: str, duration_s: float | None = None) -> None:
    """A run cut short by the runner stopping: keep what it trained, but never feed it to the engine."""
    record.update(state="interrupted", note=note)
    if duration_s is not None:
        record["duration_s"] = duration_s
    record["history"] = read_history(Path(record["run_dir"]))
    summarize(record, metric, goal)


def run_result(run_dir: str | Path) -> dict | None:
    """The run folder's result.json (runs.write_result), or None while the run is incomplete."""
    try:
        result = json.loads((Path(run_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def mark_finished(record: dict, metric: str, goal: str, note: str = "") -> None:
    """A run that completed (result.json) though its runner did not see it end: finished, with its metric."""
    record["history"] = read_history(Path(record["run_dir"]))
    summarize(record, metric, goal)
    record["state"] = "finished"
    record["note"] = note
    record.setdefault("ended", datetime.now().isoformat(timespec="seconds"))


def resumable(record: dict) -> bool:
    """An interrupted run that left a last.pt: continued with --resume instead of trained again."""
    return record["state"] == "interrupted" and (Path(record["run_dir"]) / "last.pt").is_file()


def next_number(state: dict, runs_dir: Path) -> int:
    """The next free run number, after every recorded run and every run-NNN folder."""
    numbers = [rec["number"] for rec in state["runs"]]
    if runs_dir.is_dir():  # folders of a run whose record was lost (runner killed mid-write)
        numbers += [int(p.name[4:]) for p in runs_dir.glob("run-*") if p.name[4:].isdigit()]
    return max(numbers, default=0) + 1


# ----------------------------------------------------------------------------- leaderboard
def ranked(records: list[dict], goal: str) -> list[dict]:
    """Best metric first; runs without a metric (failed, no epoch yet) last, in run order."""
    with_metric = [r for r in records if r.get("metric") is not None]
    without = [r for r in records if r.get("metric") is None]
    with_metric.sort(key=lambda r: r["metric"], reverse=goal == "maximize")
    return with_metric + without


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


def write_leaderboard(sweep_dir: Path, state: dict) -> list[dict]:
    """SWEEP_DIR/leaderboard.csv (written atomically), one row per run, best first; returns the rows."""
    config = state["config"]
    metric, goal = metric_of(config)
    params = param_columns(config)
    rows = []
    for rank, rec in enumerate(ranked(state["runs"], goal), 1):
        row = {"rank": rank, "run": rec["name"], "state": rec["state"], metric: rec.get("metric"),
               "best_epoch": rec.get("best_epoch"), "epochs": rec.get("epochs"),
               "minutes": round(rec.get("duration_s", 0) / 60, 2)}
        row.update({col: (rec["config"].get(p) or {}).get("value") for p, col in params.items()})
        row.update({"run_dir": rec.get("run_dir"), "note": rec.get("note", "")})
        rows.append(row)
    tmp = sweep_dir / ".leaderboard.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["rank", "run", "state", metric, "best_epoch", "epochs", "minutes",
                                               *params.values(), "run_dir", "note"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, sweep_dir / "leaderboard.csv")
    return rows


def print_leaderboard(sweep_dir: Path, state: dict, top: int = 0) -> None:
    """Write leaderboard.csv and print it as a table (the first `top` rows; 0 = all)."""
    rows = write_leaderboard(sweep_dir, state)
    config = state["config"]
    metric, goal = metric_of(config)
    params = param_columns(config)
    cols = ["rank", "run", "state", metric, "best_epoch", "minutes", *(params[p] for p in searched_params(config)),
            "note"]
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
