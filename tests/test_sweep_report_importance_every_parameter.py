"""visualize.py sweep: every searched parameter has its importance and correlation, or a word for why not."""

from __future__ import annotations

import optuna
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from inat_classifier.sweep import report as sweep_report
from inat_classifier.sweep.leaderboard import study_runs

optuna.logging.set_verbosity(optuna.logging.WARNING)

LR = FloatDistribution(1e-4, 1e-2, log=True)
DROPOUT = FloatDistribution(0.0, 0.5)
WARMUP = IntDistribution(0, 5)  # only some runs have it (a conditional parameter)


def study_with_a_constant_and_a_rare_parameter(tmp_path):
    """Six complete runs: val_acc follows lr; dropout is 0.1 in every one; warmup is in two of them."""
    study = optuna.create_study(direction="maximize")
    for n, lr in enumerate([1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 1e-2]):
        params, dists = {"lr": lr, "dropout": 0.1}, {"lr": LR, "dropout": DROPOUT}
        if n < 2:
            params["warmup"], dists["warmup"] = n + 1, WARMUP
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                value=0.2 + 0.1 * n,
                params=params,
                distributions=dists,
                user_attrs={"run_dir": f"runs/run-{n:03d}"},
            )
        )
    runs = study_runs(study, tmp_path, "val_acc", "maximize")
    return study, runs, sweep_report.param_distributions(runs)


def test_every_parameter_has_a_row_and_a_word_where_a_number_cannot_be(tmp_path, capsys):
    study, runs, params = study_with_a_constant_and_a_rare_parameter(tmp_path)
    rows = {r[0]: r for r in sweep_report.importance_table(study, runs, params, "val_acc")}
    assert set(rows) == {"lr", "dropout", "warmup"}
    assert isinstance(rows["lr"][1], float) and rows["lr"][2] == 1.0
    assert rows["dropout"][2] == "constant"  # was nan: no bar, no word
    assert rows["warmup"][1] == "not in every run" and rows["warmup"][2] == "too few runs"  # was no row at all
    fig = sweep_report.importance_figure(list(rows.values()), "val_acc", complete=6)
    texts = [[t.get_text() for t in ax.texts if t.get_gid() in ("word", "value")] for ax in fig.axes]
    sweep_report.pyplot().close(fig)
    assert [len(t) for t in texts] == [3, 3], texts  # each panel: every parameter its number or its word
    assert {"constant", "not in every run", "too few runs"} <= set(texts[0] + texts[1])
    sweep_report.print_table("t", ["parameter", "importance", "correlation", "kind"], list(rows.values()))
    out = capsys.readouterr().out
    assert "too few runs" in out and "constant" in out and "nan" not in out


def test_two_runs_never_correlate_fully_by_chance():
    assert sweep_report.correlation(LR, [1e-3, 2e-3], [0.1, 0.2]) == ("too few runs", "spearman")
    assert sweep_report.correlation(LR, [1e-3, 2e-3, 4e-3], [0.1, 0.2, 0.3]) == (1.0, "spearman")
    assert sweep_report.correlation(LR, [1e-3] * 3, [0.1, 0.2, 0.3]) == ("constant", "spearman")
