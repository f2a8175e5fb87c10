"""A model that cannot fit in memory is refused in one line before anything big is allocated."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, clean_env, make_dataset, run_cli, train_args

# Runs the command as a child of a fresh interpreter and prints the child's peak RSS (KiB on Linux).
# The address-space limit keeps a regression from swallowing the machine: the old code's traced image
# alone took 20 GB here.
MEASURE = """
import json, resource, subprocess, sys
limit = 8 * 2**30
cmd = json.loads(sys.argv[1])
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap, timeout=240)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"code": proc.returncode, "out": proc.stdout, "err": proc.stderr, "peak_kib": peak}))
"""


def test_a_100000_filter_convnet_is_refused_in_one_line_without_allocating(tmp_path):
    data = make_dataset(tmp_path / "ds", n_train=4, n_val=2)
    args = train_args(data, tmp_path / "runs", "big", 1)
    for flag, value in (("--filters", "100000"), ("--conv_layers", "1"), ("--image_size", "224")):
        args[args.index(flag) + 1] = value
    args[args.index("--batch_size") + 1] = "64"
    cmd = [sys.executable, str(REPO / "train_parta.py"), *args]
    measured = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(cmd)], cwd=REPO, env=clean_env(), capture_output=True, text=True
    )
    result = json.loads(measured.stdout)
    lines = [line for line in (result["out"] + result["err"]).splitlines() if line.strip()]
    assert result["code"] == 2, lines
    assert "Traceback" not in result["err"], result["err"]
    assert lines[-1].startswith("error: this model needs about "), lines
    assert "at batch 12 on cpu, which has " in lines[-1], lines  # the batch: the split's 12 training images
    assert result["peak_kib"] < 3 * 2**20, result["peak_kib"]  # the interpreter with torch: about 0.8 GiB
    assert not (tmp_path / "runs" / "big").exists()


def test_a_small_model_says_what_it_needs_and_trains(tmp_path):
    data = make_dataset(tmp_path / "ds", n_train=4, n_val=2)
    proc = run_cli("train_parta.py", *train_args(data, tmp_path / "runs", "small", 1))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (said,) = [line for line in proc.stdout.splitlines() if line.startswith("memory: this model needs about ")]
    assert "at batch 12 on cpu, which has " in said, said
    assert (tmp_path / "runs" / "small" / "result.json").exists()


def test_partb_at_a_size_that_cannot_fit_is_refused_in_one_line(tmp_path):
    data = make_dataset(tmp_path / "ds", n_train=4, n_val=2)
    proc = run_cli(
        "train_partb.py",
        *("--data_dir", data, "--out_dir", tmp_path / "runs", "--model", "resnet152", "--weights", "none"),
        *("--freeze", "none"),
        *("--image_size", "2048", "--epochs", "1", "--workers", "0", "--wandb", "disabled", "--device", "cpu"),
        timeout=120,
    )  # about 180 GiB: every layer of resnet152 at 2048 px trains
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2, lines
    assert lines[-1].startswith("error: this model needs about ") and "at batch 12 on cpu" in lines[-1], lines
    assert not list((tmp_path / "runs").glob("partb-*"))
