"""visualize.py sweep on a sweep of a few one-epoch runs and on one of hundreds: the figures still read well."""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial
from PIL import Image

import visualize
from inat_classifier.sweep import report as sweep_report
from inat_classifier.sweep.leaderboard import study_runs

optuna.logging.set_verbosity(optuna.logging.WARNING)

# sweep.yaml's kinds of parameter: categoricals of numbers, words and booleans, a float, a log float and an int.
DISTS = {
    "filters": CategoricalDistribution([32, 64, 128]),
    "filter_org": CategoricalDistribution([0.5, 1, 2]),
    "conv_layers": CategoricalDistribution([3, 4, 5]),
    "activation": CategoricalDistribution(["relu", "gelu", "silu", "mish"]),
    "dropout": FloatDistribution(0.0, 0.5),
    "batch_norm": CategoricalDistribution([True, False]),
    "dense_neurons": CategoricalDistribution([128, 256, 512]),
    "augment": CategoricalDistribution([True, False]),
    "unfreeze_at": IntDistribution(2, 6),
    "lr": FloatDistribution(1e-4, 1e-2, log=True),
}
DPI = 110  # visualize.py's default --dpi


def sweep_study(folder: Path, n_runs: int, epochs: int, seed: int = 0):
    """A journal study of n_runs complete runs with random parameters, each with a metrics.csv of `epochs` rows."""
    folder.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=JournalStorage(JournalFileBackend(str(folder / "optuna.journal"))), study_name="s", direction="maximize"
    )
    study.set_user_attr("metric", "val_acc")
    study.set_user_attr("goal", "maximize")
    rng = random.Random(seed)
    for n in range(1, n_runs + 1):
        params = {
            p: (
                rng.choice(d.choices)
                if isinstance(d, CategoricalDistribution)
                else d.low + rng.random() * (d.high - d.low)
            )
            for p, d in DISTS.items()
        }
        params["unfreeze_at"] = round(params["unfreeze_at"])
        params["lr"] = 10 ** rng.uniform(-4, -2)
        top = 0.3 + 0.4 * rng.random()  # many decimals, as real accuracies have
        curve = [top * (1 - 0.5 ** (e + 1)) / (1 - 0.5 ** (epochs + 1)) for e in range(1, epochs + 1)]
        rel = f"runs/run-{n:03d}"
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                value=max(curve),
                params=params,
                distributions=DISTS,
                intermediate_values=dict(enumerate(curve, 1)),
                user_attrs={"run_dir": rel},
            )
        )
        (folder / rel).mkdir(parents=True)
        with open(folder / rel / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "train_loss", "val_acc"])
            w.writerows([e, 1.0 / e, v] for e, v in enumerate(curve, 1))
    return study


def runs_of(study, folder: Path) -> list:
    return study_runs(study, folder, "val_acc", "maximize")


def visible_xticks(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    folder = tmp_path_factory.mktemp("four")
    return sweep_study(folder, 4, epochs=1), folder


def test_top_five_of_four_runs_says_all_four(four, capsys):
    study, folder = four
    fig, drawn = sweep_report.top_curves_figure(runs_of(study, folder), "val_acc", "maximize", 5)
    title = fig.axes[0].get_title()
    sweep_report.pyplot().close(fig)
    assert drawn == 4 and "all 4 runs" in title and "top 5" not in title, title
    fig, _ = sweep_report.top_curves_figure(runs_of(study, folder), "val_acc", "maximize", 2)
    assert "top 2 runs" in fig.axes[0].get_title()
    sweep_report.pyplot().close(fig)


def test_one_epoch_runs_have_one_whole_epoch_tick(four):
    study, folder = four
    fig, _ = sweep_report.top_curves_figure(runs_of(study, folder), "val_acc", "maximize", 5)
    ax = fig.axes[0]
    ticks, (lo, hi) = visible_xticks(ax), ax.get_xlim()
    sweep_report.pyplot().close(fig)
    assert ticks == [1.0] and lo < 1 < hi and hi - lo <= 1.5, (ticks, lo, hi)  # never 0.945 ... 1.05


def test_runs_are_counted_in_whole_numbers(four, tmp_path):
    study, folder = four
    fig = sweep_report.metric_vs_created_figure(runs_of(study, folder), "val_acc", "maximize")
    ticks = visible_xticks(fig.axes[0])
    sweep_report.pyplot().close(fig)
    assert ticks == [1.0, 2.0, 3.0, 4.0], ticks  # never 1.5, 2.5
    one = sweep_study(tmp_path / "one", 1, epochs=3)
    fig = sweep_report.metric_vs_created_figure(runs_of(one, tmp_path / "one"), "val_acc", "maximize")
    assert visible_xticks(fig.axes[0]) == [1.0]
    sweep_report.pyplot().close(fig)


def significant_digits(label: str) -> int:
    return len(re.sub(r"^0+", "", re.sub(r"[^0-9]", "", f"{float(label):.10g}".split("e")[0]).rstrip("0"))) or 1


@pytest.mark.parametrize("n_runs", [12, 200])
def test_parallel_coordinates_read_well_at_12_and_200_runs(tmp_path, n_runs):
    study = sweep_study(tmp_path, n_runs, epochs=2, seed=n_runs)
    runs = runs_of(study, tmp_path)
    params = sweep_report.param_distributions(runs)  # the axes, in this order, then the metric
    fig, lines = sweep_report.parallel_coordinates_figure(runs, params, "val_acc")
    ax = fig.axes[0]
    fig.canvas.draw()
    width_px = fig.get_size_inches()[0] * DPI
    ticks = [t for t in ax.texts if t.get_gid() == "tick"]
    boxes = [t.get_window_extent() for t in ticks]
    axis_px = [ax.transData.transform((i, 0))[0] for i in range(len(DISTS) + 1)]
    names = ax.get_xticklabels()
    run_lines = [ln for ln in ax.lines if str(ln.get_gid()).startswith("run:")]
    sweep_report.pyplot().close(fig)

    assert lines == n_runs and 600 <= width_px <= 1500, width_px  # 11 axes: was 2,321 px
    scales = [i for i, d in enumerate(params.values()) if not isinstance(d, CategoricalDistribution)] + [len(params)]
    numbers = [t.get_text() for t in ticks if round(t.get_position()[0] + 0.03) in scales]  # not the choices
    assert len(numbers) >= 12 and all(significant_digits(s) <= 2 for s in numbers), numbers  # 0.45; never 0.4211
    overlaps = [
        (ticks[i].get_text(), ticks[j].get_text())
        for i, a in enumerate(boxes)
        for j, b in enumerate(boxes)
        if i < j and a.overlaps(b)
    ]
    assert not overlaps
    for t, box in zip(ticks, boxes, strict=True):  # a tick label stays between its axis and the one before
        i = round(t.get_position()[0] + 0.03)
        assert box.x1 <= axis_px[i] and (i == 0 or box.x0 > axis_px[i - 1]), t.get_text()
    assert not sweep_report.overlapping(names), [n.get_text() for n in names]
    if n_runs == 200:  # hundreds of lines stay lines, and the best run is drawn on top
        assert max(ln.get_alpha() for ln in run_lines) <= 0.4
        best = max(runs, key=lambda r: r.metric)
        assert run_lines[-1].get_gid() == f"run:{best.name}"


def test_report_png_of_ten_parameters_is_a_sensible_width(four, tmp_path, capsys):
    _, folder = four
    res = visualize.main(
        visualize.get_args_parser().parse_args(["sweep", "--sweep_dir", str(folder), "--out", str(tmp_path)])
    )
    with Image.open(res["images"]["parallel_coordinates"]) as img:
        assert 800 <= img.width <= 1500, img.size  # was 2,145 px at the default --dpi 110
