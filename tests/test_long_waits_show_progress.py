"""Every long wait shows a bar on a terminal, none in a pipe, and ends with one line with its time in both.

Part B's first run (the decoded cache, then the feature pass) and evaluate.py's pass over a split,
run as a user runs them: under a pseudo-terminal, and with their output in a pipe.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from conftest import CLASSES, REPO, clean_env, make_dataset, zip_folder

TIME = r"in \d+(?:\.\d)?s \(\d+\.\d [A-Za-z]+/s\)"  # tracking.took: "in 0.4s (52.1 images/s)"


def run_under_terminal(cmd: list[str], env: dict, timeout: float = 300) -> tuple[int, str]:
    """cmd with stdin, stdout and stderr on a pseudo-terminal of 100 columns; its exit code and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: every writer of the terminal has gone
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        code = proc.wait(timeout=30)
    return code, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def run_in_pipe(cmd: list[str], env: dict) -> tuple[int, str]:
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    return proc.returncode, proc.stdout.decode()


RUNNERS = {"terminal": run_under_terminal, "pipe": run_in_pipe}


def has_bar(output: str, desc: str) -> bool:
    return re.search(re.escape(desc) + r":\s+\d+%\|", output) is not None


@pytest.mark.parametrize("where", RUNNERS)
def test_partb_first_run_shows_its_cache_and_feature_bars_then_one_timed_line_each(where, tmp_path, r18_file):
    data = make_dataset(tmp_path / "ds", CLASSES[:3], n_train=8, n_val=3, size=32)
    cmd = [sys.executable, str(REPO / "train_partb.py"), "--data_dir", str(data), "--out_dir", str(tmp_path / "runs")]
    cmd += ["--model", "resnet18", "--weights", str(r18_file), "--freeze", "all", "--no-augment"]
    cmd += ["--image_size", "32", "--batch_size", "8", "--epochs", "1", "--workers", "0", "--wandb", "disabled"]
    cmd += ["--cache", str(tmp_path / "cache"), "--feature_cache_dir", str(tmp_path / "fc"), "--device", "cpu"]
    code, out = RUNNERS[where](cmd, clean_env())
    assert code == 0, out
    assert len(re.findall(r"decoded cache: 24 images decoded " + TIME, out)) == 1, out
    assert len(re.findall(r"features: train \(18, 512\) computed " + TIME, out)) == 1, out
    assert len(re.findall(r"features: val \(6, 512\) computed " + TIME, out)) == 1, out
    on_terminal = where == "terminal"
    for desc in ("decoding to 37px", "features train", "features val"):  # 32 px crops of 37 px rows
        assert has_bar(out, desc) == on_terminal, (desc, out)


@pytest.mark.parametrize("where", RUNNERS)
def test_evaluating_a_split_shows_a_bar_then_one_timed_line(where, trained_run):
    cmd = [sys.executable, str(REPO / "evaluate.py"), "--ckpt", str(trained_run.run_dir / "best.pt")]
    cmd += ["--split", "val", "--device", "cpu", "--workers", "0", "--out", str(trained_run.run_dir / f"eval-{where}")]
    code, out = RUNNERS[where](cmd, clean_env())
    assert code == 0, out
    assert len(re.findall(r"evaluated \d+ images " + TIME, out)) == 1, out
    assert has_bar(out, "predicting") == (where == "terminal"), out


@pytest.mark.parametrize("where", RUNNERS)
def test_download_shows_its_bars_only_on_a_terminal_then_timed_lines(where, tmp_path, http_server):
    http_server.files["/nature_12K.zip"] = zip_folder(make_dataset(tmp_path / "src", CLASSES[:2], 2, 1, 16))
    cmd = [sys.executable, str(REPO / "data.py"), "download", "--dest", str(tmp_path / "data")]
    code, out = RUNNERS[where](cmd + ["--url", http_server.url("/nature_12K.zip")], clean_env())
    assert code == 0, out
    for line in (
        r"downloaded [\d.]+ KiB " + TIME,
        r"verified nature_12K\.zip " + TIME,
        r"extracted 6 files .* " + TIME,
    ):
        assert len(re.findall(line, out)) == 1, (line, out)
    for desc in ("nature_12K.zip", "verifying", "extracting"):
        assert has_bar(out, desc) == (where == "terminal"), (desc, out)
