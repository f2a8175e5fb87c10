"""visualize.py sweep: the report of a real Optuna journal study with real run folders (no training)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial
from PIL import Image

import visualize
from conftest import assert_one_line_error, clean_env, run_cli
from inat_classifier import cli
from inat_classifier.sweep import report as sweep_report
from inat_classifier.sweep.leaderboard import study_runs

optuna.logging.set_verbosity(optuna.logging.WARNING)

DISTS = {
    "lr": FloatDistribution(1e-4, 1e-2, log=True),
    "dropout": FloatDistribution(0.0, 0.5),
    "freeze": CategoricalDistribution(["auto", "all", "none"]),
}
# Complete runs: val_acc depends on lr alone; dropout and freeze are noise (spread over every lr).
COMPLETE = [  # (lr, dropout, freeze)
    (1e-4, 0.40, "none"),
    (2e-4, 0.05, "all"),
    (3e-4, 0.30, "auto"),
    (5e-4, 0.10, "none"),
    (1e-3, 0.45, "all"),
    (2e-3, 0.20, "auto"),
    (3e-3, 0.35, "none"),
    (5e-3, 0.00, "all"),
    (7e-3, 0.25, "auto"),
]
CONTINUED = (1e-2, 0.15, "none")  # its first trial failed (runner died); a second trial completed it


def acc(lr: float) -> float:
    return 0.4 + 0.1 * math.log10(lr / 1e-4)


def params(lr: float, dropout: float, freeze: str) -> dict:
    return {"lr": lr, "dropout": dropout, "freeze": freeze}


def write_metrics(run_dir: Path, curve: list[float]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time"])
        for e, v in enumerate(curve, 1):
            w.writerow([e, 1.0 / e, v, 1.1 / e, v, 1e-3, 2.5])


def add_run(
    study,
    sweep: Path,
    n: int,
    state: TrialState,
    p: dict,
    curve: list[float],
    value: float | None = None,
    system_attrs: dict | None = None,
    csv_file: bool = True,
) -> int:
    rel = f"runs/run-{n:03d}"
    trial = create_trial(
        state=state,
        value=value,
        params=p,
        distributions=DISTS,
        intermediate_values=dict(enumerate(curve, 1)),
        system_attrs=system_attrs or {},
        user_attrs={"run_dir": rel, "run": n, "run_config": {**p, "epochs": 3}},
    )
    study.add_trial(trial)
    if csv_file:
        write_metrics(sweep / rel, curve)
    return study.get_trials(deepcopy=False)[-1].number


def build_sweep(sweep: Path, complete=COMPLETE, extras: bool = True) -> Path:
    """The sweep folder of a Part B-like sweep: complete, pruned, failed, continued and running runs."""
    sweep.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=JournalStorage(JournalFileBackend(str(sweep / "optuna.journal"))), study_name="s", direction="maximize"
    )
    study.set_user_attr("metric", "val_acc")
    study.set_user_attr("goal", "maximize")
    study.set_user_attr("program", "train_partb.py")
    for n, (lr, d, f) in enumerate(complete):
        a = acc(lr)
        add_run(
            study, sweep, n, TrialState.COMPLETE, params(lr, d, f), [a - 0.1, a, a - 0.02], value=a, csv_file=n != 2
        )  # run-002 has no metrics.csv
    if not extras:
        return sweep
    n = len(complete)
    add_run(study, sweep, n, TrialState.PRUNED, params(4e-4, 0.2, "all"), [0.3, 0.35])
    dead = add_run(study, sweep, n + 1, TrialState.FAIL, params(*CONTINUED), [0.5], csv_file=False)
    add_run(study, sweep, n + 2, TrialState.FAIL, params(8e-4, 0.3, "auto"), [])
    lr, d, f = CONTINUED
    trial = create_trial(
        state=TrialState.COMPLETE,
        value=acc(lr),
        params=params(lr, d, f),
        distributions=DISTS,
        intermediate_values={1: 0.5, 2: acc(lr), 3: acc(lr) - 0.01},
        system_attrs={"failed_trial": dead},
        user_attrs={"run_dir": f"runs/run-{n + 1:03d}", "run": n + 1, "run_config": {}},
    )
    study.add_trial(trial)
    write_metrics(sweep / f"runs/run-{n + 1:03d}", [0.5, acc(lr), acc(lr) - 0.01])
    add_run(study, sweep, n + 3, TrialState.RUNNING, params(6e-4, 0.1, "none"), [0.42])
    return sweep


def report(*argv) -> dict:
    return visualize.main(visualize.get_args_parser().parse_args(["sweep", *map(str, argv)]))


def assert_image(path: Path) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= 300 and img.height >= 200, (path, img.size)
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 100, f"{path}: blank"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return build_sweep(tmp_path_factory.mktemp("sweep") / "partb")


@pytest.fixture(scope="module")
def result(sweep) -> tuple[dict, str]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = report("--sweep_dir", sweep, "--top", "3")
    return res, buf.getvalue()


def test_writes_real_pngs_into_the_report_folder_and_prints_their_paths(sweep, result):
    res, out = result
    names = {"metric_vs_created", "parallel_coordinates", "importance", "top_curves"}
    assert set(res["images"]) == names
    for name in names:
        path = sweep / "report" / f"{name}.png"
        assert res["images"][name] == path and f"wrote {path}" in out
        assert_image(path)


def test_continued_trial_is_one_run_and_states_are_marked(result):
    res, out = result
    # 9 complete + the continued one, 1 pruned, 1 failed, 1 running; the dead trial is no run of its own.
    assert res["runs"] == 13
    assert "runs (13: 10 complete, 1 pruned, 1 fail, 1 running; val_acc maximize)" in out
    rows = [ln.split() for ln in out.splitlines() if ln.split()[:1] and ln.split()[0].isdigit()]
    by_run = {r[1]: r for r in rows if r[1].startswith("run-")}
    assert sorted(by_run) == [f"run-{i:03d}" for i in range(13)]
    assert sum(r[1] == "run-010" for r in rows) == 1
    assert by_run["run-010"][2] == "complete" and by_run["run-010"][0] == "1"  # the best run
    assert (by_run["run-009"][2], by_run["run-011"][2], by_run["run-012"][2]) == ("pruned", "fail", "running")


def test_parallel_coordinates_draw_one_line_per_finished_run(sweep):
    runs = study_runs(
        optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(sweep / "optuna.journal")))),
        sweep,
        "val_acc",
        "maximize",
    )
    fig, n = sweep_report.parallel_coordinates_figure(runs, sweep_report.param_distributions(runs), "val_acc")
    drawn = [ln.get_gid() for ln in fig.axes[0].lines if str(ln.get_gid()).startswith("run:")]
    sweep_report.pyplot().close(fig)
    # 10 complete and 1 pruned; the failed run has no metric and the running one has not finished.
    assert n == len(drawn) == 11
    assert "run:run-009" in drawn and "run:run-012" not in drawn and "run:run-011" not in drawn
    assert len(fig.axes) == 2  # the lines' axes and the colorbar


def test_importance_ranks_the_metric_driver_above_the_noise(result):
    res, out = result
    rows = {r[0]: r for r in res["importance"]}
    assert set(rows) == {"lr", "dropout", "freeze"}
    assert rows["lr"][1] > 2 * max(rows["dropout"][1], rows["freeze"][1])
    assert rows["lr"][2:] == [pytest.approx(1.0), "spearman"]  # val_acc grows with lr, strictly
    assert rows["freeze"][3] == "eta" and 0 <= rows["freeze"][2] <= 1
    assert "parameter importance for val_acc" in out


def test_categorical_csv_has_best_mean_and_counts_per_value(sweep, result):
    res, out = result
    path = sweep / "report" / "freeze.csv"
    assert res["csvs"] == [path] and f"wrote {path}" in out
    with open(path, newline="") as f:
        rows = {r["freeze"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["auto", "all", "none"]
    runs = [*COMPLETE, CONTINUED]
    for value, pruned, failed, running in (("auto", 0, 1, 0), ("all", 1, 0, 0), ("none", 0, 0, 1)):
        accs = [acc(lr) for lr, _, f in runs if f == value]
        row = rows[value]
        assert float(row["best_val_acc"]) == pytest.approx(max(accs))
        assert float(row["mean_val_acc"]) == pytest.approx(sum(accs) / len(accs))
        assert (int(row["complete"]), int(row["pruned"]), int(row["fail"]), int(row["running"])) == (
            len(accs),
            pruned,
            failed,
            running,
        )
    assert rows["none"]["complete"] == "4"  # the continued run once, its dead trial not at all


def test_top_curves_skip_a_run_without_metrics_csv(tmp_path, capsys):
    sweep = build_sweep(
        tmp_path / "sw",
        complete=[(1e-2, 0.1, "all"), (5e-3, 0.2, "auto"), (2e-3, 0.3, "none"), (1e-3, 0.4, "all")],
        extras=False,
    )
    res = report("--sweep_dir", sweep, "--top", "3", "--out", tmp_path / "out")
    out = capsys.readouterr().out
    assert "note: run-002: no val_acc per epoch in" in out and "its curve is skipped" in out
    assert res["curves"] == 2 and res["images"]["top_curves"] == tmp_path / "out" / "top_curves.png"
    assert_image(res["images"]["top_curves"])


def test_storage_flag_reads_a_journal_and_finds_run_folders_beside_it(sweep, tmp_path, capsys):
    res = report("--storage", sweep / "optuna.journal", "--study", "s", "--out", tmp_path, "--top", "2")
    assert res["runs"] == 13 and res["curves"] == 2 and res["csvs"] == [tmp_path / "freeze.csv"]
    assert "no val_acc per epoch" not in capsys.readouterr().out


def test_too_few_or_equal_runs_explain_why_there_is_no_importance(tmp_path, capsys):
    res = report("--sweep_dir", build_sweep(tmp_path / "one", complete=[(1e-3, 0.1, "all")], extras=False))
    assert "no importance: 1 complete run(s) with a val_acc; it needs at least 2" in capsys.readouterr().out
    assert "importance" not in res["images"] and res["parallel_lines"] == 1
    res = report(
        "--sweep_dir", build_sweep(tmp_path / "flat", complete=[(1e-3, 0.1, "all"), (1e-3, 0.3, "none")], extras=False)
    )
    assert "no importance: every complete run has the same val_acc" in capsys.readouterr().out
    for path in res["images"].values():
        assert_image(path)


def test_a_folder_without_a_journal_is_one_line_exit_2(tmp_path):
    proc = run_cli("visualize.py", "sweep", "--sweep_dir", tmp_path, timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, "no sweep journal")


@pytest.mark.parametrize(
    "case, fragment",
    [("missing", "no such folder"), ("garbage", "not an Optuna"), ("neither", "--sweep_dir"), ("top", "--top")],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, case, fragment):
    (tmp_path / "optuna.journal").write_text('this is not a journal\n{"op_code": 99}\n')
    argv = {
        "missing": ["--sweep_dir", tmp_path / "nope"],
        "garbage": ["--sweep_dir", tmp_path],
        "neither": [],
        "top": ["--sweep_dir", tmp_path, "--top", "0"],
    }[case]
    with pytest.raises(SystemExit) as e:
        cli.run_cli(visualize.main, visualize.get_args_parser(), ["sweep", *map(str, argv)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err


def test_wandb_logs_the_figures_offline_without_an_account(sweep, tmp_path):
    pytest.importorskip("wandb")
    env = clean_env(HOME=tmp_path, NETRC=tmp_path / "none")  # no API key anywhere: offline, never a prompt
    proc = run_cli("visualize.py", "sweep", "--sweep_dir", sweep, "--out", tmp_path, "--wandb", env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"W&B: logged 4 figures to project inat12k-partb ({tmp_path / 'wandb'})" in proc.stdout
    images = (tmp_path / "wandb").glob("offline-run-*/files/media/images/sweep/*.png")
    media = {p.name.rsplit("_", 2)[0] for p in images}
    assert media == {"metric_vs_created", "parallel_coordinates", "importance", "top_curves"}


def test_evaluated_runs_show_their_test_accuracy_ece_and_nll(tmp_path):
    sweep = build_sweep(tmp_path / "partb", extras=False)
    (sweep / "runs" / "run-001" / "eval.json").write_text(
        json.dumps({"accuracy": 0.8125, "ece": 0.0421, "nll": 0.6789})
    )
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        report("--sweep_dir", sweep, "--out", tmp_path / "report")
    lines = buf.getvalue().splitlines()
    header = next(ln.split() for ln in lines if ln.split()[:2] == ["rank", "run"])
    assert header[5:8] == ["test_acc", "ece", "nll"]
    row = next(ln.split() for ln in lines if ln.split()[1:2] == ["run-001"])
    assert row[5:8] == ["0.8125", "0.0421", "0.6789"]
    other = next(ln.split() for ln in lines if ln.split()[1:2] == ["run-000"])
    assert len(other) == len(header) - 3  # blank cells where a run has no eval.json


def test_a_parameter_named_like_a_column_gets_a_column_of_its_own(tmp_path, capsys):
    from inat_classifier.sweep.report import print_runs

    sweep = build_sweep(tmp_path / "partb", extras=False)
    study = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(sweep / "optuna.journal"))))
    runs = study_runs(study, sweep, "val_acc", "maximize")
    print_runs(runs, {"epochs": None, "lr": None}, "val_acc", "maximize")
    header = next(ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("rank"))
    assert len(header) == len(set(header)) and "param_epochs" in header, header
