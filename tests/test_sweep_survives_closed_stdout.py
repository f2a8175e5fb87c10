"""A runner whose stdout is closed (`>&-`) or cannot be written (`>/dev/full`) trains and records its runs as usual."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_sweep import fake_sweep, runs_of

from conftest import clean_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
@pytest.mark.parametrize("stdout", ["closed", "/dev/full"])
def test_a_runner_without_a_usable_stdout_finishes_its_sweep(tmp_path, stdout):
    cfg = fake_sweep(tmp_path, "grid", [0.3, 0.6])
    sweep_dir = tmp_path / "s"
    redirect = ">&-" if stdout == "closed" else ">/dev/full"
    command = f'exec "$0" "$@" {redirect}'
    argv = [sys.executable, str(REPO / "sweep_offline.py"), "--config", str(cfg), "--sweep_dir", str(sweep_dir)]
    proc = subprocess.run(
        ["sh", "-c", command, *argv, "--count", "2"],
        cwd=tmp_path,
        env=clean_env(),
        stderr=subprocess.PIPE,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert sorted(r["state"] for r in runs_of(sweep_dir).values()) == ["COMPLETE", "COMPLETE"]
    for log in (sweep_dir / "logs").iterdir():  # the trainers' output went to their logs, nowhere else
        assert "run folder:" in log.read_text()
    assert (sweep_dir / "leaderboard.csv").is_file()
