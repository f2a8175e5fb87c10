"""A runner killed while it created the sweep (kill -9 after the study, before its config; or after the journal
file, before the study): the next runner completes the sweep and trains, instead of refusing it for ever."""

from __future__ import annotations

import optuna
import pytest
import yaml
from test_sweep import fake_sweep, run_sweep, runs_of

from inat_classifier.sweep.storage import CREATION_WAIT_S


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_a_study_left_without_its_config_is_completed_by_the_next_runner(tmp_path, monkeypatch, storage):
    cfg = fake_sweep(tmp_path, "grid", [0.4, 0.7])
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    if storage == "journal":
        url, flags = None, []
        backend = optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna.journal"))
        kept = optuna.storages.JournalStorage(backend)
    else:
        url = f"sqlite:///{tmp_path / 'sw.db'}"
        flags, kept = ["--storage", url], url
    optuna.create_study(storage=kept, study_name="s", direction="maximize")  # what the killed runner got done
    monkeypatch.chdir(tmp_path)
    assert run_sweep("--config", cfg, "--sweep_dir", sweep_dir, *flags, "--count", "1", "--quiet") == 0
    study = optuna.load_study(study_name="s", storage=kept)
    assert study.user_attrs["config"] == yaml.safe_load(cfg.read_text())
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert run_sweep("--sweep_dir", sweep_dir, *flags, "--count", "1", "--quiet") == 0  # and it continues as usual
    assert len(optuna.load_study(study_name="s", storage=kept).trials) == 2


def test_an_empty_journal_is_a_sweep_not_started_yet(tmp_path, monkeypatch):
    assert CREATION_WAIT_S <= 10
    cfg = fake_sweep(tmp_path, "grid", [0.4])
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    (sweep_dir / "optuna.journal").touch()  # what a runner killed before its first record leaves
    monkeypatch.chdir(tmp_path)
    assert run_sweep("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", "--quiet") == 0
    assert [r["state"] for r in runs_of(sweep_dir).values()] == ["COMPLETE"]
