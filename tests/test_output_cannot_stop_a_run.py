"""Output that cannot be written never stops a run: with stdout closed, full or a pipe closed early,
training still writes its results and exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, clean_env, make_dataset, train_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("out-ds") / "ds", n_train=4, n_val=2)


def command(data, out, name: str) -> list[str]:
    return [sys.executable, str(REPO / "train_parta.py"), *train_args(data, out, name, 2)]


def assert_finished(proc_rc: int, run_dir, stderr: str) -> None:
    assert proc_rc == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert json.loads((run_dir / "result.json").read_text())["epochs"] == 2, stderr
    assert (run_dir / "best.pt").exists() and (run_dir / "last.pt").exists()


def test_training_with_stdout_closed_finishes_and_exits_0(tiny, tmp_path):
    proc = subprocess.run(
        command(tiny, tmp_path, "closed"),
        cwd=REPO,
        env=clean_env(),
        stderr=subprocess.PIPE,
        text=True,
        timeout=240,
        preexec_fn=lambda: os.close(1),  # as `>&-` in a shell
    )
    assert_finished(proc.returncode, tmp_path / "closed", proc.stderr)
    assert proc.stderr.count("warning: stdout is closed") == 1, proc.stderr


def test_training_with_stdout_on_a_full_device_finishes_and_exits_0(tiny, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            command(tiny, tmp_path, "full"),
            cwd=REPO,
            env=clean_env(),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=240,
        )
    assert_finished(proc.returncode, tmp_path / "full", proc.stderr)
    assert proc.stderr.count("warning: stdout cannot be written") == 1, proc.stderr


def test_training_whose_stdout_pipe_closes_early_finishes_and_exits_0(tiny, tmp_path):
    proc = subprocess.Popen(
        command(tiny, tmp_path, "pipe"),
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline()  # as `| head -1`: the reader goes away after one line
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=240)
    assert first.strip(), stderr
    assert_finished(proc.returncode, tmp_path / "pipe", stderr)
    assert stderr.count("warning: stdout cannot be written (Broken pipe)") == 1, stderr
