"""--show and `visualize.py sweep` read the journal where it is: a damaged one is named by its own path, an empty
one has no sweep yet, and a --show that dies leaves no copy of the journal in the temp folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_sweep import fake_sweep, run_sweep

from conftest import assert_one_line_error, clean_env

REPO = Path(__file__).resolve().parents[1]


def show(sweep_dir: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "sweep_offline.py"), "--sweep_dir", str(sweep_dir), "--show"],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_damaged_journal_is_named_by_its_own_path(tmp_path, monkeypatch):
    cfg = fake_sweep(tmp_path, "grid", [0.4])
    sweep_dir = tmp_path / "s"
    monkeypatch.chdir(tmp_path)
    assert run_sweep("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", "--quiet") == 0
    journal = sweep_dir / "optuna.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join([*lines[:2], lines[2][:15], *lines[2:]]))  # a torn line joined to the next
    assert_one_line_error(show(sweep_dir), str(journal))
    report = subprocess.run(
        [sys.executable, str(REPO / "visualize.py"), "sweep", "--sweep_dir", str(sweep_dir)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 2
    assert_one_line_error(report, str(journal))


def test_an_empty_journal_has_no_sweep_yet(tmp_path):
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    (sweep_dir / "optuna.journal").touch()
    proc = show(sweep_dir)
    assert proc.returncode == 2
    assert_one_line_error(proc, str(sweep_dir / "optuna.journal"), "no sweep yet")


def test_show_leaves_no_copy_of_the_journal_behind_when_it_dies(tmp_path, monkeypatch):
    cfg = fake_sweep(tmp_path, "grid", [0.4])
    sweep_dir, temp = tmp_path / "s", tmp_path / "temp"
    temp.mkdir()
    monkeypatch.chdir(tmp_path)
    assert run_sweep("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", "--quiet") == 0
    dies = (  # --show, then the end a kill -9 gives: no exit handlers run
        "import os, sys; sys.path.insert(0, sys.argv[1]); import sweep_offline; "
        "sweep_offline.main(sweep_offline.parse_args(['--sweep_dir', sys.argv[2], '--show'])); os._exit(0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", dies, str(REPO), str(sweep_dir)],
        env=clean_env(TMPDIR=temp),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "leaderboard of" in proc.stdout, proc.stdout + proc.stderr
    assert list(temp.iterdir()) == []
