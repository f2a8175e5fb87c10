"""--storage URLs: `postgresql://` as docs/sweeps.md writes it works with the driver requirements.txt installs, a
missing driver is one line naming its pip package, and an in-memory SQLite (gone when the runner exits) is refused."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_sweep import fake_sweep

from conftest import assert_one_line_error, clean_env

REPO = Path(__file__).resolve().parents[1]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path: Path, storage: str, *extra: str) -> subprocess.CompletedProcess:
    cfg = fake_sweep(tmp_path, "grid", [0.4])
    argv = ["--config", cfg, "--sweep_dir", tmp_path / "s", "--storage", storage, "--count", "1", "--quiet", *extra]
    return subprocess.run(
        [sys.executable, str(REPO / "sweep_offline.py"), *map(str, argv)],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_postgresql_url_as_the_docs_write_it_reaches_the_server_with_the_installed_driver(tmp_path):
    if not (installed("psycopg2") or installed("psycopg")):
        pytest.skip("no PostgreSQL driver installed")
    proc = run(tmp_path, f"postgresql://user:pw@127.0.0.1:{closed_port()}/db")  # nobody listens: refused
    line = assert_one_line_error(proc, "cannot open the database")
    assert "driver" not in line and "pw" not in line, line
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize(
    ("url", "modules", "package"),
    [
        ("postgresql+psycopg://u@127.0.0.1/db", ["psycopg"], "pip install 'psycopg[binary]'"),
        ("postgresql+psycopg2://u@127.0.0.1/db", ["psycopg2"], "pip install 'psycopg2-binary'"),
        ("mysql://u@127.0.0.1/db", ["MySQLdb", "pymysql"], "pip install 'mysqlclient' or 'PyMySQL'"),
    ],
)
def test_a_missing_driver_is_one_line_naming_its_pip_package(tmp_path, url, modules, package):
    if any(installed(m) for m in modules):
        pytest.skip(f"{' and '.join(modules)} installed here")
    proc = run(tmp_path, url)
    assert proc.returncode == 2
    assert_one_line_error(proc, package)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("url", ["sqlite:///", "sqlite://", "sqlite:///:memory:", "sqlite:///file:x?mode=memory"])
def test_an_in_memory_sqlite_is_refused(tmp_path, url):
    proc = run(tmp_path, url)
    assert proc.returncode == 2
    assert_one_line_error(proc, "in-memory")
    assert not (tmp_path / "s" / "runs").exists()
