"""A database that accepts connections and never answers: the runner and `visualize.py sweep` stop after --db_timeout
with one line, and Ctrl-C or SIGTERM stops them at once while they wait. The database is a real loopback TCP server
that accepts and stays silent."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_sweep import fake_sweep

from conftest import clean_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def silent_server():
    """A loopback TCP server that accepts every connection and never sends a byte; (url, an event set on one)."""
    pytest.importorskip("psycopg2", reason="psycopg2 (the PostgreSQL driver) is not installed")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = threading.Event()
    held = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            held.append(conn)
            accepted.set()

    threading.Thread(target=accept, daemon=True).start()
    yield f"postgresql://sweeper:secret@127.0.0.1:{server.getsockname()[1]}/sweeps", accepted
    server.close()
    for conn in held:
        conn.close()


def runner_argv(tmp_path: Path, url: str, *extra: str) -> list[str]:
    cfg = fake_sweep(tmp_path, "grid", [0.4])
    return [
        sys.executable,
        str(REPO / "sweep_offline.py"),
        "--config",
        str(cfg),
        "--sweep_dir",
        str(tmp_path / "s"),
        "--storage",
        url,
        "--count",
        "1",
        *extra,
    ]


def report_argv(url: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "visualize.py"), "sweep", "--storage", url, "--study", "s", *extra]


def one_line(proc: subprocess.CompletedProcess | subprocess.Popen, stderr: str, code: int) -> str:
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    (line,) = stderr.strip().splitlines()
    assert "secret" not in line, line  # no password in messages
    return line


@pytest.mark.parametrize("program", ["runner", "report"])
def test_a_database_that_never_answers_is_one_line_after_db_timeout(silent_server, tmp_path, program):
    url, _ = silent_server
    argv = (
        runner_argv(tmp_path, url, "--db_timeout", "1")
        if program == "runner"
        else report_argv(url, "--db_timeout", "1")
    )
    proc = subprocess.run(argv, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
    line = one_line(proc, proc.stderr, 2)
    assert line.startswith("error:") and "no answer" in line and "127.0.0.1" in line, line


@pytest.mark.parametrize("program", ["runner", "report"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_program_waiting_for_a_database_at_once(silent_server, tmp_path, program, sig):
    url, accepted = silent_server
    argv = runner_argv(tmp_path, url) if program == "runner" else report_argv(url)
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert accepted.wait(timeout=120), "it never connected"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)  # the default --db_timeout (30 s) would end it with exit 2
    finally:
        proc.kill()
    line = one_line(proc, stderr, 130)
    assert "interrupted" in line, line
