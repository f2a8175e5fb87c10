"""--class_weights and --sampler are a run's own flags: typed again with --resume they are noted and the saved
values kept, a last.pt whose values differ from args.json is another run's, and a hand-edited value is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import train_parta
from conftest import CLASSES, make_dataset, train_args
from inat_classifier.checkpoint import load_checkpoint
from inat_classifier.cli import UserError

MACHINE = ["--workers", "0", "--device", "cpu", "--wandb", "disabled"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 1-epoch Part A run with the defaults: --class_weights none, --sampler random."""
    tmp = tmp_path_factory.mktemp("balancing")
    data = make_dataset(tmp / "ds", CLASSES[:2])
    train_parta.main(train_parta.get_args_parser().parse_args(train_args(data, tmp / "runs", "base", 1)))
    return tmp / "runs" / "base"


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def resume(run: Path, *extra: str):
    return train_parta.main(train_parta.get_args_parser().parse_args(["--resume", str(run), *MACHINE, *extra]))


def test_typed_balancing_flags_on_resume_are_noted_and_the_runs_own_values_kept(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    resume(run, "--epochs", "2", "--class_weights", "balanced", "--sampler", "balanced")
    out = capsys.readouterr().out
    assert "note: --resume keeps the run's own --class_weights none (ignoring balanced)" in out, out
    assert "note: --resume keeps the run's own --sampler random (ignoring balanced)" in out, out
    config = load_checkpoint(run / "last.pt")["config"]
    assert (config["epochs"], config["class_weights"], config["sampler"]) == (2, "none", "random")


@pytest.mark.parametrize("key", ["class_weights", "sampler"])
def test_a_last_pt_whose_balancing_differs_from_args_json_is_refused(finished_run, tmp_path, key):
    run = copy_of(finished_run, tmp_path)
    saved = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps({**saved, key: "balanced"}))
    before = (run / "last.pt").read_bytes()
    with pytest.raises(UserError, match=f"{key} '[a-z]+' \\(args.json: 'balanced'\\)"):
        resume(run)
    assert (run / "last.pt").read_bytes() == before


@pytest.mark.parametrize("key", ["class_weights", "sampler"])
def test_a_hand_edited_balancing_value_is_one_line_naming_the_file_and_field(finished_run, tmp_path, key):
    run = copy_of(finished_run, tmp_path)
    saved = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps({**saved, key: "sparkle"}))
    with pytest.raises(UserError) as e:
        resume(run)
    assert f"{run / 'args.json'}: {key}" in str(e.value) and "is not one of" in str(e.value), e.value
    assert "\n" not in str(e.value)
