"""A sweep's storage that fails under a runner (a read-only folder, a SQLite database another process keeps locked,
a PostgreSQL server that goes away): one line, exit 2, no traceback, and the run is left for the next runner, which
continues it from its last.pt. Real files, a real read-only mount, real processes, a real PostgreSQL."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from test_sweep import csv_rows, resumable_sweep, start_runner, wait_for
from test_sweep_journal_survives_full_disk import mount_tmpfs
from test_sweep_services import postgres_server  # noqa: F401  (a fixture)

from inat_classifier.runs import read_metrics_csv

REPO = Path(__file__).resolve().parents[1]
FAST = ["--poll_s", "0.1", "--stale_s", "3", "--quiet"]


def runner(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "sweep_offline.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


def one_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error:"), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


@pytest.fixture
def disk(tmp_path):
    """A tmpfs that the test can make read-only (root ignores a folder's permissions, not a read-only mount)."""
    folder = tmp_path / "disk"
    mount_tmpfs(folder, "64m")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_a_sweep_on_a_read_only_folder_is_one_line(disk, tmp_path, storage):
    cfg = resumable_sweep(tmp_path, [0.2, 0.4])
    sweep_dir = disk / "s"
    where = ["--storage", f"sqlite:///{disk}/sw.db"] if storage == "sqlite" else []
    assert (
        runner("--config", cfg, "--sweep_dir", sweep_dir, *where, "--count", "1", *FAST, cwd=tmp_path).returncode == 0
    )
    read_only(disk)
    one_line(runner("--sweep_dir", sweep_dir, *where, "--count", "1", *FAST, cwd=tmp_path))
    fresh = ["--config", cfg, "--sweep_dir", tmp_path / "t", "--count", "1", *FAST]  # a new database in it
    one_line(runner(*fresh, "--storage", f"sqlite:///{disk}/new.db", cwd=tmp_path), "new.db")


def test_a_sqlite_database_locked_by_another_process_stops_the_runner_and_the_next_one_continues(tmp_path):
    cfg = resumable_sweep(tmp_path, [0.6], {"epochs": {"value": 30}, "sleep": {"value": 0.1}}, method="random")
    sweep_dir, run_dir, db = tmp_path / "s", tmp_path / "s" / "runs" / "run-000", tmp_path / "sw.db"
    args = ["--sweep_dir", sweep_dir, "--storage", f"sqlite:///{db}", "--db_timeout", "1", "--count", "1", *FAST]
    first = start_runner("--config", cfg, *args, cwd=tmp_path)
    wait_for(lambda: csv_rows(run_dir / "metrics.csv") >= 2, 120, first)
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # held past the runner's next heartbeat and its --db_timeout
    try:
        out = first.communicate(timeout=120)[0]
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert first.returncode == 2 and "Traceback" not in out, out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert "locked" in line and "run-000 is left to continue" in line, line
    assert "interrupted: progress is in last.pt" in (sweep_dir / "logs" / "run-000.log").read_text()
    done = csv_rows(run_dir / "metrics.csv")
    again = start_runner(*args, cwd=tmp_path)
    out = again.communicate(timeout=120)[0]
    assert again.returncode == 0, out
    assert f"resuming it after epoch {done}" in out, out
    assert [r["epoch"] for r in read_metrics_csv(run_dir / "metrics.csv")] == list(range(1, 31))


def test_a_postgresql_server_lost_during_a_run_stops_the_runner_and_the_next_one_continues(
    postgres_server,  # noqa: F811
    tmp_path,
):
    cfg = resumable_sweep(tmp_path, [0.6], {"epochs": {"value": 30}, "sleep": {"value": 0.1}}, method="random")
    sweep_dir, run_dir = tmp_path / "s", tmp_path / "s" / "runs" / "run-000"
    args = ["--sweep_dir", sweep_dir, "--storage", postgres_server.url, "--db_timeout", "5", "--count", "1", *FAST]
    first = start_runner("--config", cfg, *args, cwd=tmp_path)
    wait_for(lambda: csv_rows(run_dir / "metrics.csv") >= 2, 120, first)
    postgres_server.stop("immediate")
    out = first.communicate(timeout=120)[0]
    assert first.returncode == 2 and "Traceback" not in out, out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert "postgresql://postgres@127.0.0.1" in line and "run-000 is left to continue" in line, line
    done = csv_rows(run_dir / "metrics.csv")
    postgres_server.start()
    again = start_runner(*args, cwd=tmp_path)
    out = again.communicate(timeout=120)[0]
    assert again.returncode == 0, out
    assert f"resuming it after epoch {done}" in out, out
    assert [r["epoch"] for r in read_metrics_csv(run_dir / "metrics.csv")] == list(range(1, 31))
