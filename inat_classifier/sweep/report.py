"""The report of a hyperparameter sweep read from its Optuna study: W&B-style panels as PNGs and tables.

    python visualize.py sweep --sweep_dir sweeps/parta [--top 5] [--out DIR] [--wandb]
    python visualize.py sweep --storage sqlite:///sweeps.db --study parta-sweep

Panels: metric vs created (with best so far), parallel coordinates, parameter importance (fANOVA)
beside each parameter's correlation with the metric, top-N validation curves; tables: every run,
the importances, and per categorical parameter its values' best and mean metric (also as CSV).
Words: a run is one run folder (leaderboard.py; a continued trial replaces the failed one it continues);
its state is its newest trial's Optuna state in lowercase: "complete" runs trained all their epochs,
"finished" ones are complete, pruned or fail (not running or waiting), as Optuna's is_finished says.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inat_classifier.cli import UserError, add_flag
from inat_classifier.figures import integer_xticks, overlapping, pyplot, round_ticks, save_figure, tick_label
from inat_classifier.storage import refuse_foreign, starts_with_line
from inat_classifier.sweep.database import DEFAULT_TIMEOUT_S
from inat_classifier.sweep.leaderboard import (
    EVAL_COLUMNS,
    Run,
    evaluation,
    fmt,
    print_table,
    ranked,
    read_history,
    study_runs,
)
from inat_classifier.sweep.storage import journal_path, open_study
from inat_classifier.tracking import WandbLogger

# How each state (leaderboard.state_name) is drawn in the metric-vs-created and parallel-coordinates panels.
MARKERS = {
    "complete": ("o", "C0"),
    "pruned": ("v", "C1"),
    "fail": ("X", "C3"),
    "running": ("s", "C7"),
    "waiting": ("s", "C7"),
}
LINESTYLES = {"complete": "-", "pruned": "--", "fail": ":"}


# ----------------------------------------------------------------------------- runs
def param_distributions(runs: Sequence[Run]) -> dict[str, Any]:
    """Each searched parameter's Optuna distribution, as its newest run has it (sorted by name, like Optuna)."""
    dists: dict[str, Any] = {}
    for r in runs:
        dists.update(r.trial.distributions)
    return dict(sorted(dists.items()))


def is_categorical(dist) -> bool:
    return type(dist).__name__ == "CategoricalDistribution"


def print_runs(runs: Sequence[Run], params: dict, metric: str, goal: str) -> None:
    """Every run, best first, with its state (pruned, fail, running runs marked as such), and its
    held-out accuracy, ECE and NLL where evaluate.py wrote an eval.json into its folder."""
    evaluated = {r.name: evaluation(r.run_dir) for r in runs}
    columns = [c for c in EVAL_COLUMNS if any(c in e for e in evaluated.values())]
    rows = [
        [i, r.name, r.state, r.metric, r.epochs, *(evaluated[r.name].get(c) for c in columns)]
        + [r.trial.params.get(p) for p in params]
        for i, r in enumerate(ranked(runs, goal), 1)
    ]
    counts = {s: sum(r.state == s for r in runs) for s in dict.fromkeys(r.state for r in runs)}
    fixed = ["rank", "run", "state", metric, "epochs", *columns]
    print_table(  # a searched parameter named like a fixed column (e.g. epochs) is shown as param_<name>
        f"runs ({len(runs)}: {', '.join(f'{n} {s}' for s, n in counts.items())}; {metric} {goal}):",
        fixed + [f"param_{p}" if p in fixed else p for p in params],
        rows,
    )


# ----------------------------------------------------------------------------- metric vs created
def metric_vs_created_figure(runs: Sequence[Run], metric: str, goal: str):
    """Every run's metric in creation order and the best so far; runs without a metric sit on the x-axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    xs = np.arange(1, len(runs) + 1)
    for state, (marker, colour) in MARKERS.items():
        have = [(x, r.metric) for x, r in zip(xs, runs, strict=True) if r.state == state and r.metric is not None]
        lack = [x for x, r in zip(xs, runs, strict=True) if r.state == state and r.metric is None]
        if have:
            ax.scatter(*zip(*have, strict=True), marker=marker, color=colour, s=36, zorder=3, label=state)
        if lack:  # drawn on the x-axis (axes coordinates), so that no made-up metric stretches the scale
            ax.scatter(
                lack,
                [0.0] * len(lack),
                marker=marker,
                edgecolors=colour,
                facecolors="none",
                s=36,
                zorder=3,
                clip_on=False,
                transform=ax.get_xaxis_transform(),
                label=f"{state}, no {metric}",
            )
    best, line = None, []
    for r in runs:  # like W&B, every run's metric counts: a pruned run's best epoch was reached
        if r.metric is not None and (best is None or (r.metric > best if goal == "maximize" else r.metric < best)):
            best = r.metric
        line.append(np.nan if best is None else best)
    ax.step(xs, line, where="post", color="k", lw=1.2, alpha=0.7, label="best so far")
    integer_xticks(ax, 1, len(runs))
    ax.set(xlabel="run, in creation order", ylabel=metric, title=f"{metric} vs created ({goal})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_metric_vs_created(runs: Sequence[Run], metric: str, goal: str, out: Path, dpi: int) -> Path:
    return save_figure(metric_vs_created_figure(runs, metric, goal), out, dpi)


# ----------------------------------------------------------------------------- parallel coordinates
def axis_position(value: Any, dist) -> float:
    """A parameter value's height on its axis, in [0, 1]: categoricals evenly spaced, log floats in log10."""
    if is_categorical(dist):
        k = len(dist.choices)
        return dist.choices.index(value) / (k - 1) if k > 1 else 0.5
    lo, hi, v = float(dist.low), float(dist.high), float(value)
    if dist.log:
        lo, hi, v = math.log10(lo), math.log10(hi), math.log10(v)
    return (v - lo) / (hi - lo) if hi > lo else 0.5


def axis_ticks(dist) -> list[tuple[float, str]]:
    """(height, label) of an axis' ticks: every choice, or round values on its (log) scale."""
    if is_categorical(dist):
        return [(axis_position(c, dist), str(c)) for c in dist.choices]
    integer = type(dist).__name__ == "IntDistribution"
    values = round_ticks(float(dist.low), float(dist.high), bool(dist.log), integer)
    return [(axis_position(v, dist), tick_label(v)) for v in values]


def parallel_coordinates_figure(runs: Sequence[Run], params: dict, metric: str, goal: str = "maximize"):
    """One line per finished run with a metric over the parameters, the metric last, the best runs drawn on top;
    returns (fig, lines). Readable from a few runs to hundreds: round ticks, about an inch per axis."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    shown = [r for r in runs if r.state in LINESTYLES and r.metric is not None and set(params) <= set(r.trial.params)]
    shown.sort(key=lambda r: r.metric if goal == "maximize" else -r.metric)  # the best last, so on top
    values = [r.metric for r in shown]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)
    norm, cmap = plt.Normalize(lo, hi), plt.get_cmap("viridis")
    n_axes = len(params) + 1
    width = min(0.95 * n_axes, max(11.5, 0.7 * n_axes)) + 2.5  # 13 in for 10 parameters; more only for many more
    fig, ax = plt.subplots(figsize=(max(6.0, width), 4.8), layout="constrained")
    alpha = max(0.25, min(0.85, 0.85 * math.sqrt(20 / max(len(shown), 1))))  # hundreds of lines stay lines
    # From 20 runs on, each run sits a little off a categorical value (a fixed, random offset), so that the
    # runs sharing it show as a band of all their colours rather than as the one line drawn last.
    spread = np.random.default_rng(0).uniform(-0.04, 0.04, len(shown)) if len(shown) >= 20 else np.zeros(len(shown))
    for r, off in zip(shown, spread, strict=True):
        ys = [axis_position(r.trial.params[p], d) + off * is_categorical(d) for p, d in params.items()]
        ys.append(norm(r.metric))
        ax.plot(
            range(len(ys)),
            ys,
            color=cmap(norm(r.metric)),
            ls=LINESTYLES[r.state],
            lw=1.4 if len(shown) <= 50 else 1.0,
            alpha=alpha,
            gid=f"run:{r.name}",
        )
    metric_ticks = [(norm(v), tick_label(v)) for v in round_ticks(lo, hi)]
    for i, ticks in enumerate([*(axis_ticks(d) for d in params.values()), metric_ticks]):
        ax.axvline(i, color="k", lw=0.8)
        for y, label in ticks:
            ax.text(
                i - 0.03,
                y,
                label,
                ha="right",
                va="center",
                fontsize=8,
                gid="tick",
                zorder=4,
                bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5),
            )
    ax.set_xticks(range(n_axes), [*params, metric], fontsize=9)
    ax.set_yticks([])
    ax.set_xlim(-0.45, len(params) + 0.1)
    ax.set_ylim(-0.05, 1.05)
    for spine in ax.spines.values():
        spine.set_visible(False)
    states = sorted({r.state for r in shown}, key=list(LINESTYLES).index)
    ax.legend(
        [Line2D([], [], color="k", ls=LINESTYLES[s]) for s in states],
        states,
        fontsize=8,
        ncol=3,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1),
        frameon=False,
    )
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric, pad=0.02)
    ax.set_title(f"{len(shown)} finished runs (log-searched parameters on log axes)")
    fig.canvas.draw()
    if overlapping(ax.get_xticklabels()):  # long names side by side: slant them
        plt.setp(ax.get_xticklabels(), rotation=25, ha="right", rotation_mode="anchor")
    return fig, len(shown)


# ----------------------------------------------------------------------------- importance, correlation
def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation, SciPy's (nan when either side is constant)."""
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:  # SciPy warns, then gives nan
        return math.nan
    return float(spearmanr(x, y)[0])


def correlation_ratio(labels: Sequence[Any], y: Sequence[float]) -> float:
    """eta: how much of the metric's variance the categories explain, sqrt(between / total), in [0, 1]."""
    y = np.asarray(y, float)
    total = ((y - y.mean()) ** 2).sum()
    if total == 0:
        return math.nan
    between = sum(
        len(g) * (g.mean() - y.mean()) ** 2 for g in (y[[lab == v for lab in labels]] for v in dict.fromkeys(labels))
    )
    return float(math.sqrt(between / total))


def correlation(dist, xs: Sequence[Any], ys: Sequence[float]) -> tuple[float | str, str]:
    """(value, kind): Spearman's rho for numbers (a monotone relation, log scale or not, counts the same), and
    for categoricals whose choices are not all numbers eta, unsigned, since their order means nothing. Where
    there is none, the value says why: "too few runs" (under 3), "constant" or "metric constant"."""
    numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in getattr(dist, "choices", [0]))
    kind = "spearman" if numeric else "eta"
    if len(xs) < 3:  # two points always correlate fully
        return "too few runs", kind
    if len({repr(x) for x in xs}) < 2:
        return "constant", kind
    if len(set(ys)) < 2:
        return "metric constant", kind
    return (spearman([float(x) for x in xs], ys) if numeric else correlation_ratio(xs, ys)), kind


FEW_RUNS = 10  # importance from fewer complete runs than this is noted as a rough guess


def few_runs_note(complete: int) -> str | None:
    """The warning for an importance over fewer than FEW_RUNS complete runs, else None."""
    if complete >= FEW_RUNS:
        return None
    return (
        f"note: only {complete} complete runs; importance from fewer than {FEW_RUNS} is a rough guess\n"
        "(optuna-dashboard's PED-ANOVA panel may well rank the parameters differently)"
    )


def importance_table(study, runs: Sequence[Run], params: dict, metric: str) -> list[list] | str:
    """Rows of (parameter, fANOVA importance, correlation, kind) over the complete runs, or why there are none.
    Every searched parameter has a row; an importance or correlation that cannot be had is a word saying why."""
    done = [r for r in runs if r.state == "complete" and r.metric is not None]
    if len(done) < 2:
        return f"no importance: {len(done)} complete run(s) with a {metric}; it needs at least 2"
    if len({r.metric for r in done}) == 1:
        return f"no importance: every complete run has the same {metric} ({fmt(done[0].metric)})"
    varied = [p for p in params if len({repr(r.trial.params.get(p)) for r in done}) > 1]
    if not varied:
        return "no importance: no searched parameter varies between the complete runs"
    import optuna

    try:  # fANOVA is Optuna's, and reads the study's COMPLETE trials (a continued run's newest trial)
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    except ImportError as e:
        return f"no importance: fANOVA needs scikit-learn (pip install scikit-learn; {e.name or e})"
    except (ValueError, RuntimeError) as e:  # e.g. parameters that only some runs have
        return f"no importance: {str(e).splitlines()[0][:200]}"
    rows = []
    for p in [*imp, *(p for p in params if p not in imp)]:  # fANOVA leaves out what not every run has
        have = [r for r in done if p in r.trial.params]
        value = imp.get(p, "constant" if len(have) == len(done) else "not in every run")
        corr, kind = correlation(params.get(p), [r.trial.params[p] for r in have], [r.metric for r in have])
        rows.append([p, value, corr, kind])
    return rows


def bars_or_words(ax, names: Sequence[str], values: Sequence[float | str], colours: Sequence[str]) -> list:
    """Horizontal bars labelled with their value; a word in place of a bar where there is none (none left blank)."""
    bars = ax.barh(names, [v if isinstance(v, float) else 0.0 for v in values], color=colours)
    for i, v in enumerate(values):
        if not isinstance(v, float):
            ax.text(0.02, i, str(v), va="center", fontsize=9, color="0.3", style="italic", gid="word")
            continue
        inside = abs(v) > 0.75  # near the panel's edge: the label goes inside the bar
        side = "right" if (v >= 0) == inside else "left"
        x = v + (0.02 if side == "left" else -0.02)
        ax.text(x, i, f"{v:.2f}", ha=side, va="center", fontsize=8, color="white" if inside else "0.2", gid="value")
    return list(bars)


def importance_figure(rows: Sequence[Sequence], metric: str, complete: int):
    """Bars of importance and of correlation per parameter, most important on top (W&B's panel), with a note
    under them when the complete runs are too few for the ranking to mean much."""
    plt = pyplot()
    rows = [[r[0], *(float(v) if isinstance(v, (int, float)) else v for v in r[1:3]), r[3]] for r in rows][::-1]
    names = [r[0] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 0.45 * len(rows) + 1.8), sharey=True, layout="constrained")
    bars_or_words(a, names, [r[1] for r in rows], ["C0"] * len(rows))
    a.set(xlabel="fANOVA importance (sums to 1; seed 0)", title=f"importance for {metric}", xlim=(0, 1))
    colours = ["0.6" if r[3] == "eta" else ("C2" if isinstance(r[2], str) or r[2] >= 0 else "C3") for r in rows]
    for bar, r in zip(bars_or_words(b, names, [r[2] for r in rows], colours), rows, strict=True):
        if r[3] == "eta":
            bar.set_hatch("//")
    b.axvline(0, color="k", lw=0.8)
    b.set(xlabel="Spearman's rho (grey, hatched: eta of a categorical)", title=f"correlation with {metric}")
    b.set(xlim=(-1, 1), xticks=[-1, -0.5, 0, 0.5, 1])
    for ax in (a, b):
        ax.grid(axis="x", alpha=0.3)
    note = few_runs_note(complete)
    fig.supxlabel(note or f"over {complete} complete runs", fontsize=9, color="C3" if note else "0.3")
    return fig


def report_importance(rows: Sequence[Sequence], complete: int, metric: str, out: Path, dpi: int) -> Path:
    """Print the importance table (with the few-runs note) and draw its panel."""
    print_table(
        f"parameter importance for {metric} (fANOVA, seed 0) and correlation (spearman: Spearman's "
        f"rho; eta: correlation ratio of a categorical, unsigned), over {complete} complete runs:",
        ["parameter", "importance", "correlation", "kind"],
        rows,
    )
    if few_runs_note(complete):
        print(few_runs_note(complete).replace("\n", " "))
    return save_figure(importance_figure(rows, metric, complete), out, dpi)


# ----------------------------------------------------------------------------- categorical parameters
def categorical_rows(runs: Sequence[Run], param: str, dist, goal: str) -> list[list]:
    """Per value: best and mean metric over its complete runs, then its complete/pruned/fail/running counts."""
    pick = max if goal == "maximize" else min
    rows = []
    for value in dist.choices:
        mine = [r for r in runs if param in r.trial.params and r.trial.params[param] == value]
        done = [r.metric for r in mine if r.state == "complete" and r.metric is not None]
        rows.append(
            [
                value,
                pick(done) if done else None,
                sum(done) / len(done) if done else None,
                *(sum(r.state == s for r in mine) for s in ("complete", "pruned", "fail", "running")),
            ]
        )
    return rows


def categorical_tables(runs: Sequence[Run], params: dict, metric: str, goal: str, out_dir: Path) -> list[Path]:
    """Print every categorical parameter's table and write it to OUT/<param>.csv; returns the CSV paths."""
    paths = []
    for param, dist in params.items():
        if not is_categorical(dist):
            continue
        header = [param, f"best_{metric}", f"mean_{metric}", "complete", "pruned", "fail", "running"]
        rows = categorical_rows(runs, param, dist, goal)
        print_table(f"{param} (best and mean over complete runs):", header, rows)
        path = out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', param)}.csv"
        out_dir.mkdir(parents=True, exist_ok=True)
        # Replaces only an earlier report's table: a CSV whose first line is this header.
        refuse_foreign(path, starts_with_line(",".join(header)), "a report's table")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows([["" if v is None else v for v in row] for row in rows])
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- top curves
def top_curves_figure(runs: Sequence[Run], metric: str, goal: str, top: int) -> tuple[Any, int]:
    """The metric per epoch (metrics.csv) of the top runs on one plot; a run without it is skipped with a note.
    The title counts the runs there are (the top 5 of 4 runs are all 4); returns (fig, curves drawn)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    with_metric = [r for r in ranked(runs, goal) if r.metric is not None]
    picked = with_metric[:top]
    curves = []
    for r in picked:
        history = read_history(r.run_dir) if r.run_dir is not None else []
        points = [(h["epoch"], h[metric]) for h in history if "epoch" in h and metric in h]
        if not points:
            where = r.run_dir / "metrics.csv" if r.run_dir is not None else "its trial (no run_dir)"
            print(f"note: {r.name}: no {metric} per epoch in {where}; its curve is skipped")
            continue
        curves.append((r, points))
    one_epoch = all(len(points) == 1 for _, points in curves)
    for i, (r, points) in enumerate(curves):
        state = "" if r.state == "complete" else f", {r.state}"
        style = dict(ms=3)  # one epoch each: rings shrinking by rank, so that runs on the same point all show
        if one_epoch:
            style = dict(ms=max(4.0, 16.0 - 4.0 * i), mfc="none", mew=1.8)
        ax.plot(*zip(*points, strict=True), "-o", **style, label=f"{r.name} ({metric} {fmt(r.metric)}{state})")
    epochs = [e for _, points in curves for e, _ in points]
    integer_xticks(ax, int(min(epochs, default=1)), int(max(epochs, default=1)))
    which = f"all {len(picked)} runs" if len(picked) == len(with_metric) else f"the top {len(picked)} runs"
    skipped = f" ({len(picked) - len(curves)} without metrics.csv)" if len(curves) < len(picked) else ""
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch of {which}{skipped}")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no run has a metrics.csv", ha="center", transform=ax.transAxes)
    return fig, len(curves)


def plot_top_curves(runs: Sequence[Run], metric: str, goal: str, top: int, out: Path, dpi: int) -> tuple[Path, int]:
    fig, drawn = top_curves_figure(runs, metric, goal, top)
    return save_figure(fig, out, dpi), drawn


# ----------------------------------------------------------------------------- W&B
def wandb_project(study, runs: Sequence[Run]) -> tuple[str, str | None]:
    """(project, entity) of the sweep's runs: as their config says, else the program's default project
    (train_parta.py logs to inat12k-parta, train_partb.py to inat12k-partb)."""
    config = next(
        (r.trial.user_attrs.get("run_config") or {} for r in reversed(runs) if r.trial.user_attrs.get("run_config")), {}
    )
    program = Path(str(study.user_attrs.get("program") or "")).stem
    default = f"inat12k-{program.removeprefix('train_')}" if program.startswith("train_") else "inat12k"
    return (study.user_attrs.get("project") or config.get("wandb_project") or default), config.get("wandb_entity")


def log_report(images: dict[str, Path], study, runs: Sequence[Run], out_dir: Path) -> bool:
    """Log the PNGs as one W&B run of the sweep's project: online with an API key, else offline; never prompts."""
    project, entity = wandb_project(study, runs)
    ns = argparse.Namespace(wandb="auto", wandb_project=project, wandb_entity=entity)
    try:
        logger = WandbLogger(
            ns, out_dir, f"sweep-report-{study.study_name}", {"study": study.study_name, **dict(study.user_attrs)}
        )
    except UserError as e:  # the PNGs are written already: W&B trouble costs only the upload
        print(f"W&B: not logging the report ({e})")
        return False
    logged = logger.run is not None
    try:
        for key, path in images.items():
            logger.log_image(f"sweep/{key}", path)
    finally:
        logger.finish()
    print(
        f"W&B: logged {len(images)} figures to project {project} ({out_dir / 'wandb'})"
        if logged
        else "W&B: not logging the report"
    )
    return logged


# ----------------------------------------------------------------------------- command
DESCRIPTION = (
    "Report of a hyperparameter sweep from its Optuna study: metric vs created, parallel coordinates, "
    "parameter importance and correlation, top-N validation curves (PNGs, default SWEEP_DIR/report), "
    "and tables of the runs and of each categorical parameter's values (also as CSV)."
)


def add_flags(p: argparse.ArgumentParser) -> None:
    add_flag(p, "sweep_dir", default=None, help="the sweep folder (its optuna.journal; run folders are relative to it)")
    add_flag(p, "storage", default=None, help="database URL or journal file, instead of SWEEP_DIR/optuna.journal")
    add_flag(p, "study", default=None, help="study name in --storage (default: its only study)")
    add_flag(
        p,
        "db_timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds a database --storage may take to "
        "connect or to answer one statement before the report stops with one line (default: %(default)s)",
    )
    add_flag(p, "top", type=int, default=5, help="validation curves of this many best runs (default: %(default)s)")


def open_report_study(args: argparse.Namespace) -> tuple[Any, Path]:
    """The study and the folder its run_dirs are relative to (the sweep folder, or the journal's)."""
    if args.sweep_dir is None and args.storage is None:
        raise UserError("give --sweep_dir DIR (or --storage URL with --study NAME)")
    if args.sweep_dir is not None and not Path(args.sweep_dir).is_dir():
        raise UserError(f"--sweep_dir {args.sweep_dir}: no such folder")
    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "Using an existing study" chatter
    study = open_study(
        Path(args.sweep_dir) if args.sweep_dir else None, args.storage, args.study, True, args.db_timeout
    )
    journal = journal_path(Path(args.sweep_dir) if args.sweep_dir else None, args.storage)
    base = Path(args.sweep_dir) if args.sweep_dir else (journal.parent if journal is not None else Path("."))
    return study, base


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Write the report's PNGs and CSVs and print the tables; returns the paths and the drawn-line counts."""
    study, base = open_report_study(args)
    metric = str(study.user_attrs.get("metric") or (study.metric_names or ["value"])[0])
    goal = str(study.user_attrs.get("goal") or study.direction.name.lower())
    runs = study_runs(study, base, metric, goal)
    if not runs:
        print(f"{base}: the study '{study.study_name}' has no runs yet; nothing to report")
        return {"runs": 0}
    out_dir = Path(args.out) if args.out else base / "report"
    params = param_distributions(runs)
    print_runs(runs, params, metric, goal)
    images = {
        "metric_vs_created": plot_metric_vs_created(runs, metric, goal, out_dir / "metric_vs_created.png", args.dpi)
    }
    fig, lines = parallel_coordinates_figure(runs, params, metric, goal)
    images["parallel_coordinates"] = save_figure(fig, out_dir / "parallel_coordinates.png", args.dpi)
    rows = importance_table(study, runs, params, metric)
    complete = sum(r.state == "complete" and r.metric is not None for r in runs)
    if isinstance(rows, str):
        print(f"\n{rows}")
    else:
        images["importance"] = report_importance(rows, complete, metric, out_dir / "importance.png", args.dpi)
    csvs = categorical_tables(runs, params, metric, goal, out_dir)
    images["top_curves"], curves = plot_top_curves(runs, metric, goal, args.top, out_dir / "top_curves.png", args.dpi)
    print()
    for path in [*images.values(), *csvs]:
        print(f"wrote {path}")
    if args.wandb:
        log_report(images, study, runs, out_dir)
    return {
        "runs": len(runs),
        "images": images,
        "csvs": csvs,
        "parallel_lines": lines,
        "curves": curves,
        "importance": rows,
        "complete": complete,
    }
