"""visualize.py sweep: importance from fewer than 10 complete runs carries a note, and is the same on every report."""

from __future__ import annotations

import contextlib
import io

from test_sweep_report_small_and_large import sweep_study

import visualize
from inat_classifier.sweep import report as sweep_report


def report(tmp_path, n_runs: int, out: str = "out") -> tuple[dict, str]:
    """The report of a sweep of n_runs complete two-epoch runs (made once per test), and what it printed."""
    folder = tmp_path / f"sweep-{n_runs}"
    if not folder.exists():
        sweep_study(folder, n_runs, epochs=2)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        args = ["sweep", "--sweep_dir", str(folder), "--out", str(tmp_path / out)]
        res = visualize.main(visualize.get_args_parser().parse_args(args))
    return res, buf.getvalue()


def panel_note(res: dict) -> str:
    fig = sweep_report.importance_figure(res["importance"], "val_acc", res["complete"])
    text = " ".join(t.get_text() for t in fig.texts)  # the line under both panels
    sweep_report.pyplot().close(fig)
    return text


def test_four_complete_runs_are_noted_as_too_few_on_the_table_and_the_panel(tmp_path):
    res, out = report(tmp_path, 4)
    assert "note: only 4 complete runs; importance from fewer than 10 is a rough guess" in out
    assert "PED-ANOVA" in out  # optuna-dashboard's panel may rank them otherwise
    assert res["complete"] == 4 and "only 4 complete runs" in panel_note(res)


def test_ten_complete_runs_carry_no_note(tmp_path):
    res, out = report(tmp_path, 10)
    assert "note: only" not in out and "only" not in panel_note(res)


def test_importance_is_the_same_on_every_report(tmp_path):
    first, _ = report(tmp_path, 6, "a")
    second, _ = report(tmp_path, 6, "b")
    assert first["importance"] == second["importance"]  # fANOVA's forest has a fixed seed
