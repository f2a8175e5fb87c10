"""--resume checks what it reads: args.json through the script's own flag types, last.pt against the
folder's args.json and split.json, and the run against the training script resuming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import train_parta
import train_partb
from conftest import CLASSES, make_dataset, train_args
from inat_classifier.cli import UserError

MACHINE = ["--workers", "0", "--device", "cpu", "--wandb", "disabled"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three finished 1-epoch Part A runs: the base, one of another architecture, one of another seed."""
    tmp = tmp_path_factory.mktemp("checks")
    data = make_dataset(tmp / "ds", CLASSES[:2])
    flags = {"base": [], "other_architecture": ["--filters", "4"], "other_run": ["--seed", "7"]}
    for name, extra in flags.items():
        train_parta.main(train_parta.get_args_parser().parse_args(train_args(data, tmp / "runs", name, 1, *extra)))
    return {name: tmp / "runs" / name for name in flags}


def copy_run(runs: dict, tmp_path: Path, keep_checkpoints: bool = True) -> Path:
    run = tmp_path / "run"
    shutil.copytree(runs["base"], run)
    if not keep_checkpoints:  # what a start stopped before its first checkpoint leaves
        for f in run.iterdir():
            if f.name not in ("args.json", "split.json"):
                f.unlink()
    return run


def resume(script, run: Path, *extra: str):
    return script.main(script.get_args_parser().parse_args(["--resume", str(run), *MACHINE, *extra]))


@pytest.mark.parametrize("keep_checkpoints", [False, True], ids=["before_first_checkpoint", "with_last_pt"])
@pytest.mark.parametrize(
    "key, value, says",
    [
        ("filters", "sixteen", "expected int, got 'sixteen'"),
        ("lr", "fast", "expected float, got 'fast'"),
        ("activation", "sparkle", "is not one of"),
    ],
)
def test_a_hand_edited_args_json_value_is_one_line_naming_the_file_and_field(
    runs, tmp_path, keep_checkpoints, key, value, says
):
    run = copy_run(runs, tmp_path, keep_checkpoints)
    saved = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps({**saved, key: value}))
    with pytest.raises(UserError) as e:
        resume(train_parta, run)
    assert f"{run / 'args.json'}: {key}" in str(e.value) and says in str(e.value), e.value
    assert "\n" not in str(e.value)


def test_an_args_json_with_negative_epochs_is_refused_not_called_finished(runs, tmp_path):
    run = copy_run(runs, tmp_path, keep_checkpoints=False)
    saved = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps({**saved, "epochs": -3}))
    with pytest.raises(UserError, match="--epochs must be >= 1, got -3") as e:
        resume(train_parta, run)
    assert str(run / "args.json") in str(e.value)
    assert not (run / "last.pt").exists()


@pytest.mark.parametrize("other, field", [("other_architecture", "filters"), ("other_run", "seed")])
def test_a_last_pt_of_another_run_dropped_into_the_folder_is_refused(runs, tmp_path, other, field):
    run = copy_run(runs, tmp_path)
    shutil.copy(runs[other] / "last.pt", run / "last.pt")
    before = (run / "last.pt").read_bytes()
    with pytest.raises(UserError) as e:
        resume(train_parta, run, "--epochs", "2")
    line = str(e.value)
    assert line.startswith(f"{run / 'last.pt'}: its flags are not those of {run / 'args.json'}"), line
    assert f" {field} " in line and "another run's checkpoint" in line, line
    assert (run / "last.pt").read_bytes() == before  # nothing trained into it


def test_a_last_pt_with_another_split_is_refused(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    split = json.loads((run / "split.json").read_text())
    (run / "split.json").write_text(json.dumps({**split, "train": split["train"][1:]}))
    with pytest.raises(UserError, match="its split is not the one in"):
        resume(train_parta, run, "--epochs", "2")


def test_partb_resuming_a_parta_run_is_refused_before_building_any_model(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # where a download would land
    run = copy_run(runs, tmp_path)
    with pytest.raises(UserError) as e:
        resume(train_partb, run)
    assert f"{run / 'args.json'}: " in str(e.value) and "is not a flag of train_partb.py" in str(e.value), e.value
    assert not (tmp_path / "hub").exists()


def test_parta_resuming_a_partb_checkpoint_names_the_checkpoint(runs, tmp_path):
    """No args.json to go by: last.pt's own flags are checked against the script."""
    run = copy_run(runs, tmp_path)
    (run / "args.json").unlink()
    import torch

    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["config"] = {**ckpt["config"], "model": "resnet18", "freeze": "all"}
    torch.save(ckpt, run / "last.pt")
    with pytest.raises(UserError, match="'model' is not a flag of train_parta.py") as e:
        resume(train_parta, run)
    assert str(run / "last.pt") in str(e.value)
