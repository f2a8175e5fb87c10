"""experiments/table.py: the README's results tables come from run folders, not hand-typed numbers."""

from __future__ import annotations

import csv
import json
import shutil

from conftest import assert_one_line_error, run_cli


def test_table_reads_metrics_eval_and_flags(trained_run, tmp_path):
    run = tmp_path / "wide"
    run.mkdir()
    shutil.copy(trained_run.run_dir / "metrics.csv", run / "metrics.csv")
    (run / "eval.json").write_text(json.dumps({"accuracy": 0.5}))
    (run / "flags.txt").write_text("--filters 64\n")
    with open(run / "metrics.csv", newline="") as f:
        best_val = max(float(r["val_acc"]) for r in csv.DictReader(f))

    out = run_cli("experiments/table.py", run, check=True).stdout.splitlines()
    assert out[0].startswith("| run | flags | best val acc %")
    cells = [c.strip() for c in out[2].strip("|").split("|")]
    assert cells[:5] == ["wide", "`--filters 64`", f"{100 * best_val:.1f}", "50.0", "-"]


def test_table_refuses_a_folder_without_metrics(tmp_path):
    assert_one_line_error(run_cli("experiments/table.py", tmp_path), "no metrics.csv")
