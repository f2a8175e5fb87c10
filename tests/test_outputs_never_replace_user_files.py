"""Output paths named on the command line (--csv, --out, --json, a sweep folder) never replace a file the
program did not write: a checkpoint, a photo, somebody's YAML is refused with one line and left as it was;
the script's own earlier output (recognised by its content) is replaced as before."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import sweep_offline
from conftest import REPO, assert_one_line_error, clean_env, make_dataset, run_cli, write_image


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the trained run's best.pt, in a run folder of its own."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run.run_dir / "best.pt", run / "best.pt")
    return run


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    for i in range(2):
        write_image(folder / f"p{i}.jpg", (200, 40, 40), seed=i)
    return folder


def test_predict_csv_onto_the_checkpoint_is_refused_and_the_checkpoint_kept(run_copy, photos):
    before = (run_copy / "best.pt").read_bytes()
    args = ["--ckpt", run_copy / "best.pt", "--predict", photos, "--csv", run_copy / "best.pt", "--device", "cpu"]
    proc = run_cli("evaluate.py", *args)
    assert_one_line_error(proc, "--csv", "best.pt", "not a predictions CSV")
    assert proc.returncode == 2
    assert (run_copy / "best.pt").read_bytes() == before


def test_predict_csv_onto_an_input_photo_is_refused_and_the_photo_kept(run_copy, photos):
    photo = photos / "p0.jpg"
    before = photo.read_bytes()
    proc = run_cli("evaluate.py", "--ckpt", run_copy, "--predict", photos, "--csv", photo, "--device", "cpu")
    assert_one_line_error(proc, "--csv", "p0.jpg")
    assert photo.read_bytes() == before


def test_predict_csv_replaces_an_earlier_predictions_csv(run_copy, photos, tmp_path):
    out = tmp_path / "pred.csv"
    args = ["--ckpt", run_copy, "--predict", photos, "--csv", out, "--device", "cpu", "--workers", "0"]
    run_cli("evaluate.py", *args, check=True)
    first = out.read_text()
    out.write_text(first.replace("0.", "9.", 1))  # an earlier CSV of the same kind
    run_cli("evaluate.py", *args, check=True)
    assert out.read_text() == first


def test_evaluate_out_holding_a_photo_under_the_figure_name_is_refused_before_the_work(run_copy, tmp_path):
    out = tmp_path / "out"
    photo = write_image(out / "confusion_matrix.png", (10, 200, 10))
    before = photo.read_bytes()
    proc = run_cli("evaluate.py", "--ckpt", run_copy, "--out", out, "--data_dir", tmp_path / "nowhere")
    assert_one_line_error(proc, "confusion_matrix.png", "not a figure")  # before the missing data is noticed
    assert photo.read_bytes() == before and not (out / "eval.json").exists()


def test_evaluate_out_holding_another_json_as_eval_json_is_refused(run_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text('{"mine": 1}\n')
    proc = run_cli("evaluate.py", "--ckpt", run_copy, "--out", out, "--data_dir", tmp_path / "nowhere")
    assert_one_line_error(proc, "eval.json")
    assert (out / "eval.json").read_text() == '{"mine": 1}\n'


def test_an_out_folder_made_for_a_failed_evaluation_is_removed_again(run_copy, tmp_path):
    proc = run_cli("evaluate.py", "--ckpt", run_copy, "--out", tmp_path / "new" / "out", "--data_dir", tmp_path / "no")
    assert_one_line_error(proc, "no dataset found")
    assert not (tmp_path / "new" / "out").exists()


def test_data_stats_json_onto_another_file_is_refused(tmp_path):
    root = make_dataset(tmp_path / "ds", ["a", "b"], n_train=2, n_val=1)
    mine = tmp_path / "args.json"
    mine.write_text('{"epochs": 3}\n')
    proc = run_cli("data.py", "stats", "--data_dir", root, "--json", mine)
    assert_one_line_error(proc, "--json", "args.json")
    assert mine.read_text() == '{"epochs": 3}\n'
    stats = tmp_path / "stats.json"
    run_cli("data.py", "stats", "--data_dir", root, "--json", stats, check=True)
    run_cli("data.py", "stats", "--data_dir", root, "--json", stats, check=True)  # its own file: replaced
    assert json.loads(stats.read_text())["classes"] == ["a", "b"]


@pytest.mark.parametrize(
    "tool", [["tools/bench.py", "--kernels"], ["tools/train_speed.py"], ["tools/compare_samplers.py", "--seeds", "1"]]
)
def test_the_tools_json_onto_another_file_is_refused_before_measuring(tool, trained_run, tmp_path):
    args_json = tmp_path / "args.json"
    shutil.copy(trained_run.run_dir / "args.json", args_json)
    before = args_json.read_bytes()
    proc = run_cli(*tool, "--json", args_json)
    assert_one_line_error(proc, "--json", "args.json")
    assert args_json.read_bytes() == before


FAKE_TRAIN = r"""
import argparse, csv, json, os
p = argparse.ArgumentParser()
p.add_argument("--q", type=float); p.add_argument("--out_dir"); p.add_argument("--run_name"); p.add_argument("--wandb")
a = p.parse_args()
run = os.path.join(a.out_dir, a.run_name)
os.makedirs(run)
json.dump(vars(a), open(run + "/args.json", "w"))
with open(run + "/metrics.csv", "w", newline="") as f:
    w = csv.writer(f); w.writerow(["epoch", "val_acc"]); w.writerow([1, a.q])
print("run folder: " + run)
"""


def fake_sweep_yaml(path: Path, comment: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "fake_train.py").write_text(FAKE_TRAIN)
    cfg = {
        "program": "fake_train.py",
        "method": "grid",
        "metric": {"name": "val_acc", "goal": "maximize"},
        "parameters": {"q": {"values": [0.5]}},
    }
    path.write_text(comment + yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_sweep(*argv) -> int:
    return sweep_offline.main(sweep_offline.parse_args([str(a) for a in argv]))


def test_a_new_sweep_never_replaces_another_sweep_yaml_in_its_folder(tmp_path):
    cfg = fake_sweep_yaml(tmp_path / "fake.yaml")
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.yaml").write_text("# my notes\nmethod: bayes\n")
    assert run_sweep("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", "--quiet") == 0
    assert (sweep_dir / "sweep.yaml").read_text() == "# my notes\nmethod: bayes\n"  # its copy has a name of its own


def test_a_sweep_in_the_folder_of_its_own_config_keeps_the_file_as_written(tmp_path):
    cfg = fake_sweep_yaml(tmp_path / "s" / "sweep.yaml", comment="# why these values: see notes\n")
    before = cfg.read_text()
    assert run_sweep("--config", cfg, "--sweep_dir", tmp_path / "s", "--count", "1", "--quiet") == 0
    assert cfg.read_text() == before


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_evaluate_into_a_read_only_folder_fails_before_the_work_naming_it_and_out(trained_run):
    shared = Path(tempfile.mkdtemp(prefix="eval-readonly-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        run = shared / "run"  # root's, 0755: not writable by the evaluating user
        run.mkdir(mode=0o755)
        shutil.copy(trained_run.run_dir / "best.pt", run / "best.pt")
        (run / "best.pt").chmod(0o644)
        data = shared / "data"
        shutil.copytree(trained_run.data.root, data)
        for p in [data, *data.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        proc = subprocess.run(
            [*nobody, sys.executable, str(REPO / "evaluate.py"), "--ckpt", str(run / "best.pt")]
            + ["--data_dir", str(data), "--device", "cpu", "--workers", "0"],
            cwd=REPO,
            env=clean_env(HOME=str(shared), MPLCONFIGDIR=str(shared / "mpl")),
            capture_output=True,
            text=True,
            timeout=180,
        )
        line = assert_one_line_error(proc, f"cannot write into {run}", "--out")
        assert ".tmp-" not in line and "accuracy" not in proc.stdout  # before the evaluation, no temp file named
        assert sorted(p.name for p in run.iterdir()) == ["best.pt"]
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_a_write_into_a_read_only_folder_names_the_folder_not_a_temp_file(tmp_path):
    shared = Path(tempfile.mkdtemp(prefix="stats-readonly-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        root = make_dataset(shared / "ds", ["a", "b"], n_train=2, n_val=1)
        for p in [root, *root.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        locked = shared / "locked"  # root's, 0755: not writable by the user below
        locked.mkdir(mode=0o755)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        proc = subprocess.run(
            [*nobody, sys.executable, str(REPO / "data.py"), "stats", "--data_dir", str(root)]
            + ["--json", str(locked / "stats.json")],
            cwd=REPO,
            env=clean_env(HOME=str(shared)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        line = assert_one_line_error(proc, f"into {locked}", "choose a folder you can write")
        assert ".tmp-" not in line and not list(locked.iterdir())
    finally:
        shutil.rmtree(shared, ignore_errors=True)
