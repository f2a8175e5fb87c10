"""sweep_offline.py reads the flags after -- as the program will: none may set a searched parameter or a flag the
runner sets itself, whatever its spelling (a prefix, --flag=value, --no-flag); nor may the yaml sweep the latter."""

from __future__ import annotations

import re

import pytest
import yaml
from test_sweep import REPO, fake_sweep, run_sweep, write_yaml

from conftest import assert_one_line_error, clean_env, run_cli
from inat_classifier.cli import UserError


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--drop", "0.9"], "'--drop' after -- is not a flag of train_parta.py"),
        (["--run_n", "same"], "'--run_n' after -- is not a flag of train_parta.py"),
        (["--no-batch_norm"], "'--no-batch_norm' after -- sets 'batch_norm', which the sweep searches"),
        (["--workers", "0", "--lr"], "rejected by train_parta.py: argument --lr: expected one argument"),
    ],
)
def test_train_parta_flags_after_dashes_are_resolved_by_its_own_parser(tmp_path, extra, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        run_sweep("--config", REPO / "sweep.yaml", "--sweep_dir", tmp_path / "s", "--dry_run", "--", *extra)
    assert not (tmp_path / "s").exists()


def test_an_abbreviated_searched_flag_is_one_line_before_any_run(tmp_path):
    proc = run_cli(
        "sweep_offline.py",
        *("--config", "sweep.yaml", "--sweep_dir", tmp_path / "s", "--dry_run", "--", "--drop", "0.9"),
        env=clean_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert_one_line_error(proc, "'--drop' after -- is not a flag of train_parta.py")


def test_flags_train_parta_knows_reach_every_run(tmp_path, capsys):
    extra = ["--data_dir", "photos", "--workers=0", "--no-compile"]
    assert run_sweep("--config", REPO / "sweep.yaml", "--sweep_dir", tmp_path / "s", "--dry_run", "--", *extra) == 0
    (command,) = [ln for ln in capsys.readouterr().out.splitlines() if "--run_name run-000" in ln]
    assert command.endswith(" ".join(extra)), command


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--drop", "0.9"], "'--drop' after -- may set (as a prefix) 'dropout', which the sweep searches"),
        (["--no-dropout"], "'--no-dropout' after -- sets 'dropout', which the sweep searches"),
        (["--run_n", "same"], "'--run_n' after -- may set (as a prefix) 'run_name', which is set by the sweep runner"),
    ],
)
def test_another_programs_flags_count_with_every_prefix_argparse_would_take(tmp_path, extra, fragment):
    cfg = fake_sweep(tmp_path, "grid", [0.5], {"dropout": {"values": [0.1, 0.5]}})
    with pytest.raises(UserError, match=re.escape(fragment)):
        run_sweep("--config", cfg, "--sweep_dir", tmp_path / "s", "--dry_run", "--", *extra)


@pytest.mark.parametrize("name", ["run_name", "out_dir", "resume", "run-name"])
def test_a_parameter_the_runner_sets_itself_is_refused(tmp_path, name):
    cfg = fake_sweep(tmp_path, "grid", [0.5], {name: {"value": "mine"}})
    with pytest.raises(UserError, match=re.escape(f"parameters.{name}: the sweep runner sets --{name}")):
        run_sweep("--config", cfg, "--sweep_dir", tmp_path / "s", "--dry_run")
    searched = dict(yaml.safe_load(cfg.read_text()))
    searched["parameters"] = {"q": {"values": [0.5]}, name: {"values": ["a", "b"]}}
    with pytest.raises(UserError, match=re.escape(f"parameters.{name}:")):
        run_sweep("--config", write_yaml(tmp_path / "searched.yaml", searched), "--sweep_dir", tmp_path / "t")
