"""One run, one number, one state word: run-NNN is its first trial's number (optuna-dashboard's "Trial NNN"),
recorded as the trial's `run` attribute; the leaderboard, the report and the runner's lines all give a run's state
as Optuna's TrialState name in lowercase; the study names its metric."""

from __future__ import annotations

from pathlib import Path

from test_sweep import fake_sweep, read_leaderboard, run_sweep, study_of

import visualize


def test_runs_are_numbered_and_stated_as_optuna_numbers_and_states_their_trials(tmp_path, capsys):
    cfg = fake_sweep(tmp_path, "grid", [0.5, -1, 0.9])
    sweep_dir = tmp_path / "s"
    assert run_sweep("--config", cfg, "--sweep_dir", sweep_dir, "--count", "3", "--quiet") == 0
    out = capsys.readouterr().out
    study = study_of(sweep_dir)
    assert study.metric_names == ["val_acc"]  # optuna-dashboard shows val_acc, not "Objective 0"
    trials = {t.user_attrs["run"]: t for t in study.get_trials()}
    assert sorted(trials) == ["run-000", "run-001", "run-002"]
    for name, t in trials.items():
        assert name == f"run-{t.number:03d}" and t.user_attrs["run_dir"] == f"runs/{name}"
        state = t.state.name.lower()
        assert f"[sweep] {name} {state}: " in out, out
    board = {row["run"]: row["state"] for row in read_leaderboard(sweep_dir)}
    assert board == {name: t.state.name.lower() for name, t in trials.items()}
    assert sorted(board.values()) == ["complete", "complete", "fail"]
    capsys.readouterr()
    visualize.main(visualize.get_args_parser().parse_args(["sweep", "--sweep_dir", str(sweep_dir)]))
    report = capsys.readouterr().out
    assert "runs (3: 2 complete, 1 fail; val_acc maximize)" in report, report
    rows = {ln.split()[1]: ln.split()[2] for ln in report.splitlines() if ln.split()[:1] and ln.split()[0].isdigit()}
    assert {k: v for k, v in rows.items() if k.startswith("run-")} == board


def test_a_continued_run_keeps_the_number_of_its_first_trial(tmp_path):
    cfg = fake_sweep(tmp_path, "grid", [0.5])
    sweep_dir = tmp_path / "s"
    assert run_sweep("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", "--quiet") == 0
    study = study_of(sweep_dir)
    (first,) = study.get_trials()
    from inat_classifier.sweep.storage import requeue

    requeue(study, first._trial_id)  # as a runner that died does: its run queued to continue, a new trial
    assert run_sweep("--sweep_dir", sweep_dir, "--show") == 0
    rows = read_leaderboard(sweep_dir)
    assert [r["run"] for r in rows] == ["run-000"] and rows[0]["state"] == "waiting"
    newest = max(study_of(sweep_dir).get_trials(), key=lambda t: t.number)
    assert newest.number == 1 and newest.user_attrs["run"] == "run-000"
    assert Path(newest.user_attrs["run_dir"]).name == "run-000"


def test_a_sweep_started_when_runs_counted_from_1_goes_on_without_taking_a_folder(tmp_path):
    """Such a sweep's first run is run-001 (trial 0, `run` 1): its next run is run-002, not run-001 again."""
    import optuna
    import yaml
    from optuna.trial import TrialState, create_trial

    from inat_classifier.sweep.storage import create_study, open_storage

    cfg = fake_sweep(tmp_path, "grid", [0.3, 0.6])
    sweep_dir = tmp_path / "s"
    (sweep_dir / "runs" / "run-001").mkdir(parents=True)
    config = yaml.safe_load(cfg.read_text())
    attrs = {"config": config, "config_file": str(cfg), "metric": "val_acc", "goal": "maximize", "program": "x"}
    study = create_study(open_storage(sweep_dir, None), "s", "maximize", attrs)
    dist = optuna.distributions.CategoricalDistribution([0.3, 0.6])
    run_config = {"q": {"value": 0.3}}
    old = {"run": 1, "run_dir": "runs/run-001", "run_config": run_config, "status": "finished"}
    study.add_trial(
        create_trial(state=TrialState.COMPLETE, value=0.3, params={"q": 0.3}, distributions={"q": dist}, user_attrs=old)
    )
    assert run_sweep("--sweep_dir", sweep_dir, "--count", "1", "--quiet") == 0
    rows = {r["run"]: r for r in read_leaderboard(sweep_dir)}
    assert sorted(rows) == ["run-001", "run-002"] and {r["state"] for r in rows.values()} == {"complete"}
    assert sorted(p.name for p in (sweep_dir / "runs").iterdir()) == ["run-001", "run-002"]
