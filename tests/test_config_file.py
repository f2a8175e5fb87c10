"""--config FILE: a YAML file or a run's args.json sets the defaults of both training scripts, typed flags win."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import train_parta
import train_partb
from conftest import assert_one_line_error, make_dataset, run_cli, train_args
from inat_classifier.cli import UserError, json_safe, typed_flags
from inat_classifier.config_file import parse_args


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def parta(*argv: str) -> argparse.Namespace:
    return parse_args(train_parta.get_args_parser(), list(argv))


def partb(*argv: str) -> argparse.Namespace:
    return parse_args(train_partb.get_args_parser(), list(argv))


def test_yaml_sets_defaults_through_each_flags_type(tmp_path):
    cfg = write(
        tmp_path / "a.yaml",
        "filters: 16\nfilter_org: 2\nkernel_size: [7, 5, 3]\nactivation: relu\n"
        "lr: 3e-4\noptimizer: sgd\ndownload: no\n",
    )
    args = parta("--config", str(cfg))
    assert (args.filters, args.filter_org, args.kernel_size) == (16, 2.0, [7, 5, 3])
    assert (args.activation, args.optimizer) == ("relu", "sgd")
    assert args.lr == pytest.approx(3e-4) and isinstance(args.lr, float)  # YAML reads 3e-4 as a string
    assert args.download == "no"  # YAML's boolean no, through download_choice
    assert parta().filters == 64  # the file changed one parse only, not the script's defaults
    assert typed_flags(args) == {"config"}  # values from the file are defaults, not typed flags


def test_typed_flags_win_before_or_after_config(tmp_path):
    cfg = write(tmp_path / "a.yaml", "filters: 16\nepochs: 7\n")
    for argv in (["--config", str(cfg), "--filters", "8"], ["--filters", "8", "--config", str(cfg)]):
        args = parta(*argv)
        assert (args.filters, args.epochs) == (8, 7)
        assert typed_flags(args) == {"config", "filters"}


def test_hyphen_keys(tmp_path):
    cfg = write(tmp_path / "a.yaml", "batch-size: 8\nlabel-smoothing: 0.2\nconv_layers: 3\n--dense-neurons: 64\n")
    args = parta("--config", str(cfg))
    assert (args.batch_size, args.label_smoothing, args.conv_layers, args.dense_neurons) == (8, 0.2, 3, 64)


def test_boolean_values_as_the_flags_take_them(tmp_path):
    cfg = write(tmp_path / "a.yaml", "batch_norm: false\naugment: 'False'\nchannels_last: no\ncompile: 1\n")
    args = parta("--config", str(cfg))
    assert (args.batch_norm, args.augment, args.channels_last, args.compile) == (False, False, False, True)
    on = write(tmp_path / "on.yaml", "batch_norm: true\n")
    assert parta("--config", str(on), "--batch_norm=False").batch_norm is False
    assert parta("--config", str(on), "--no-batch-norm").batch_norm is False


def test_unknown_key_names_key_and_file(tmp_path):
    cfg = write(tmp_path / "a.yaml", "filters: 16\nfilterz: 8\n")
    with pytest.raises(UserError) as e:
        parta("--config", str(cfg))
    assert "filterz" in str(e.value) and str(cfg) in str(e.value)
    with pytest.raises(UserError, match="freeze"):  # a Part B flag is no flag of Part A
        parta("--config", str(write(tmp_path / "b.yaml", "freeze: all\n")))


@pytest.mark.parametrize(
    "text, key",
    [
        ("filters: sixteen\n", "filters"),
        ("filters: 16.5\n", "filters"),
        ("dropout: true\n", "dropout"),
        ("batch_norm: maybe\n", "batch_norm"),
        ("optimizer: adamx\n", "optimizer"),
        ("kernel_size: [3, x]\n", "kernel_size"),
        ("filters: null\n", "filters"),
        ("epochs: {a: 1}\n", "epochs"),
    ],
)
def test_wrong_type_names_file_and_key(tmp_path, text, key):
    cfg = write(tmp_path / "a.yaml", text)
    with pytest.raises(UserError) as e:
        parta("--config", str(cfg))
    assert f"--config {cfg}: {key}:" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name, text",
    [
        ("missing.yaml", None),
        ("broken.yaml", "filters: [16, 32\n"),
        ("broken.json", '{"filters": 16,'),
        ("list.yaml", "- filters\n- 16\n"),
    ],
)
def test_missing_or_unparsable_file_is_one_line(tmp_path, name, text):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError) as e:
        parta("--config", str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_partb_yaml_and_its_args_json_round_trip(tmp_path):
    cfg = write(
        tmp_path / "b.yaml",
        "model: resnet18\nweights: none\nfreeze: upto:layer3\nlr-mult: 0.5\n"
        "freeze_bn: false\nunfreeze_at: null\nepochs: 3\n",
    )
    args = partb("--config", str(cfg), "--lr", "0.01")
    assert (args.model, args.weights, args.freeze, args.lr_mult, args.freeze_bn) == (
        "resnet18",
        "none",
        "upto:layer3",
        0.5,
        False,
    )
    assert args.lr == 0.01 and args.unfreeze_at is None and typed_flags(args) == {"config", "lr"}
    # What runs.new_run_dir writes after resolve_recipe: resolved recipe flags plus use_cache, no flag.
    train_partb.resolve_recipe(args)
    saved = json_safe(vars(args))
    assert "use_cache" in saved
    run_json = write(tmp_path / "args.json", json.dumps(saved, indent=1))
    again = partb("--config", str(run_json))
    train_partb.resolve_recipe(again)
    assert json_safe(vars(again)) == saved | {"config": str(run_json)}


def test_a_real_runs_args_json_reproduces_its_flags(tmp_path):
    data, out = make_dataset(tmp_path / "ds"), tmp_path / "runs"
    base = write(tmp_path / "base.yaml", "kernel_size: [5, 3]\ndropout: 0.3\nbatch_norm: false\n")
    args = parta(*train_args(data, out, "orig", 1, "--config", base))
    train_parta.main(args)
    saved = json.loads((out / "orig" / "args.json").read_text())
    assert (saved["kernel_size"], saved["dropout"], saved["config"]) == ([5, 3], 0.3, str(base))

    again = parta("--config", str(out / "orig" / "args.json"), "--epochs", "5")
    assert again.kernel_size == [5, 3] and again.batch_norm is False
    assert typed_flags(again) == {"config", "epochs"}
    differ = {k for k, v in json_safe(vars(again)).items() if saved.get(k, "absent") != v}
    assert differ == {"epochs", "run_name", "config"}, differ
    assert again.epochs == 5 and again.run_name is None  # a new run folder, never the original one
    assert again.out_dir == str(out) and again.data_dir == str(data)


def test_bad_config_on_the_command_line_is_one_stderr_line_and_exit_2(tmp_path):
    cfg = write(tmp_path / "bad.yaml", "epochs: 2\nfilterz: 8\n")
    proc = run_cli("train_parta.py", "--config", cfg, "--wandb", "disabled")
    assert proc.returncode == 2
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1, proc.stderr
    assert_one_line_error(proc, "filterz", str(cfg))
