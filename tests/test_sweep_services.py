"""Sweeps against real services on loopback: two runners sharing a PostgreSQL study, and optuna-dashboard
reading a finished sweep back over its HTTP API. Each test starts its server and stops it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from test_sweep import fake_sweep, read_leaderboard, start_runner

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres_user(argv: list[str]) -> list[str]:
    """initdb refuses root: run the server's own commands as the postgres user there."""
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *argv]


class PostgresServer:
    """A PostgreSQL server on 127.0.0.1 in a temporary folder, trust authentication; stop() and start() it."""

    def __init__(self, home: Path) -> None:
        self.home, self.data, self.port = home, home / "data", free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"  # as docs/sweeps.md writes it

    def pg_ctl(self, *argv: str) -> None:
        subprocess.run(
            as_postgres_user(["pg_ctl", "-D", str(self.data), *argv]), check=True, capture_output=True, timeout=120
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1"
        self.pg_ctl("-o", options, "-l", str(self.home / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "-w", "stop")


@pytest.fixture
def postgres_server():
    """A running PostgresServer, stopped and removed afterwards."""
    missing = [tool for tool in ("initdb", "pg_ctl") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"PostgreSQL's {', '.join(missing)} not on PATH")
    pytest.importorskip("psycopg2", reason="psycopg2 (the PostgreSQL driver) is not installed")
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user for initdb")
    home = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    home.chmod(0o777)
    server = PostgresServer(home)
    subprocess.run(
        as_postgres_user(["initdb", "-D", str(server.data), "--auth=trust", "-U", "postgres"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        except subprocess.CalledProcessError:  # stopped already
            pass
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    return postgres_server.url


def test_two_runners_share_a_bayes_sweep_on_postgresql(postgres_url, tmp_path):
    cfg = fake_sweep(tmp_path, "bayes", [0.2, 0.4, 0.6, 0.8], {"sleep": {"value": 0.2}})
    sweep_dir = tmp_path / "s"
    args = [
        "--config",
        cfg,
        "--sweep_dir",
        sweep_dir,
        "--storage",
        postgres_url,
        "--study",
        "pg-sweep",
        "--count",
        "2",
        "--quiet",
        "--poll_s",
        "0.1",
    ]
    runners = [start_runner(*args, cwd=tmp_path) for _ in range(2)]
    outputs = [r.communicate(timeout=300)[0] for r in runners]
    assert [r.returncode for r in runners] == [0, 0], outputs
    study = optuna.load_study(
        study_name="pg-sweep", storage=postgres_url.replace("postgresql://", "postgresql+psycopg2://")
    )
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 4 and len({t.number for t in trials}) == 4
    assert all(isinstance(t.value, float) for t in trials)
    folders = {t.user_attrs["run_dir"] for t in trials}
    assert len(folders) == 4 and all((sweep_dir / f / "metrics.csv").is_file() for f in folders)
    assert not (sweep_dir / "optuna.journal").exists()  # the study lives in the database only
    assert sorted(r["run"] for r in read_leaderboard(sweep_dir)) == sorted(Path(f).name for f in folders)


def test_optuna_dashboard_serves_a_finished_sweep(tmp_path):
    if shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("optuna-dashboard is not installed")
    cfg = fake_sweep(tmp_path, "grid", [0.3, 0.7])
    sweep_dir = tmp_path / "s"
    runner = start_runner("--config", cfg, "--sweep_dir", sweep_dir, "--count", "2", "--quiet", cwd=tmp_path)
    assert runner.wait(timeout=120) == 0, runner.communicate()[0]
    port = free_port()
    dashboard = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "optuna-dashboard"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            str(sweep_dir / "optuna.journal"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        studies = None
        deadline = time.time() + 60
        while studies is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.load(r)["study_summaries"]
            except OSError:
                assert time.time() < deadline and dashboard.poll() is None, "optuna-dashboard did not start"
                time.sleep(0.3)
        (study,) = studies
        assert study["study_name"] == "s"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}", timeout=10) as r:
            trials = json.load(r)["trials"]
        assert sorted(t["values"][0] for t in trials) == pytest.approx([0.3, 0.7])
        assert all(t["state"] == "Complete" for t in trials)
        assert {a["key"] for a in trials[0]["user_attrs"]} >= {"run_dir", "run_config"}
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
