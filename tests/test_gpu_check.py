"""tools/gpu_check.sh's own logic, with a stand-in python3: one line per check, the failures counted,
the CUDA-only checks skipped in the rehearsal, and nothing run through a `python` command."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKS = [
    "env",
    "pytest_device",
    "kernels",
    "speed",
    "parta_auto",
    "parta_ema",
    "cache_off_equals_cache",
    "parta_fp16",
    "parta_compile",
    "cpu_then_cuda",
    "partb_recipe",
    "evaluate_val_equals_training",
    "torchrun_2_ranks",
]
CUDA_ONLY = {"parta_fp16", "parta_compile", "cpu_then_cuda"}


def stand_in(path: Path, log: Path, fail_on: str) -> None:
    """A program that records its arguments, and fails the call whose arguments hold fail_on."""
    path.write_text(
        '#!/bin/bash\nargs="$*"\n'  # one line a call, newlines of -c programs folded
        f'echo "$(basename "$0") ${{args//$\'\\n\'/ }}" >> {log}\n'
        f'case "$*" in *{fail_on}*) echo "it broke"; exit 3;; esac\nexit 0\n'
    )
    path.chmod(0o755)


def test_rehearsal_prints_a_line_per_check_and_exits_with_the_failure_count(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stand_in(bin_dir / "python3", log, fail_on="parta-ema")
    stand_in(bin_dir / "python", log, fail_on="never")  # must never be called
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    proc = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--rehearse", "", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.split(" ")[0] in ("PASS", "FAIL", "SKIP")]
    assert [ln.split(" ")[1] for ln in lines] == CHECKS, proc.stdout + proc.stderr
    for line in lines:
        name = line.split(" ")[1]
        expected = "SKIP" if name in CUDA_ONLY else "FAIL" if name == "parta_ema" else "PASS"
        assert line.startswith(expected), line
    assert "it broke" in next(ln for ln in lines if " parta_ema " in ln)  # the failure's last line
    assert proc.returncode == 1 and "1 check(s) failed" in proc.stdout
    calls = log.read_text().splitlines()
    assert calls and all(c.startswith("python3 ") for c in calls)  # python3, never python
    assert any("--device cpu" in c and "train_parta.py" in c for c in calls)  # the rehearsal trains on the CPU
    assert any("--nproc_per_node 2" in c for c in calls)


def test_a_check_past_the_whole_check_budget_fails_unrun(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stand_in(bin_dir / "python3", log, fail_on="never")
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "GPU_CHECK_BUDGET": "0"}
    env.pop("PYTHON", None)
    proc = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--rehearse", "", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert "FAIL env not run: the check's time is spent" in proc.stdout
    assert proc.returncode == 1  # no GPU check can follow a failed env check
