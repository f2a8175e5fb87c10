"""Flag parsing (booleans as wandb agent passes them, hyphen spellings, help) and one-line CLI errors."""

from __future__ import annotations

import argparse
import shutil

import pytest

import data
import evaluate
import export
import train_parta
from conftest import assert_one_line_error, make_dataset, run_cli, train_args


def parse(*argv: str) -> argparse.Namespace:
    return train_parta.get_args_parser().parse_args(list(argv))


# ----------------------------------------------------------------------------- booleans
@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], True),  # the default
        (["--batch_norm=False"], False),
        (["--batch_norm=false"], False),
        (["--batch_norm=0"], False),
        (["--batch_norm=no"], False),
        (["--batch_norm", "False"], False),
        (["--no-batch_norm"], False),
        (["--no-batch-norm"], False),
        (["--no_batch_norm"], False),
        (["--batch-norm=False"], False),
        (["--batch_norm"], True),
        (["--batch_norm=True"], True),
        (["--batch_norm=1"], True),
        (["--batch-norm"], True),
        (["--no-batch_norm", "--batch_norm"], True),  # the last one wins
    ],
)
def test_batch_norm_flag_spellings(argv, expected):
    assert parse(*argv).batch_norm is expected


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], True),
        (["--augment=False"], False),
        (["--augment=false"], False),
        (["--augment=0"], False),
        (["--no-augment"], False),
        (["--augment"], True),
        (["--augment=True"], True),
    ],
)
def test_augment_flag_spellings(argv, expected):
    assert parse(*argv).augment is expected


def test_bare_bool_flag_does_not_swallow_the_next_flag():
    args = parse("--batch_norm", "--epochs", "3")
    assert args.batch_norm is True and args.epochs == 3


@pytest.mark.parametrize("value", ["maybe", "2", "", "Truee"])
def test_garbage_bool_exits_with_code_2(value, capsys):
    with pytest.raises(SystemExit) as e:
        parse(f"--batch_norm={value}")
    assert e.value.code == 2
    assert "expected a boolean" in capsys.readouterr().err


def test_garbage_bool_on_the_command_line_exits_2_without_traceback():
    proc = run_cli("train_parta.py", "--batch_norm=maybe")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "expected a boolean" in proc.stderr.splitlines()[-1]


# ----------------------------------------------------------------------------- spellings, types
@pytest.mark.parametrize(
    "argv, dest, expected",
    [
        (["--batch-size", "8"], "batch_size", 8),
        (["--batch_size", "8"], "batch_size", 8),
        (["--dense-neurons", "64"], "dense_neurons", 64),
        (["--filter-org", "0.5"], "filter_org", 0.5),
        (["--conv-layers", "3"], "conv_layers", 3),
        (["--data-dir", "/x"], "data_dir", "/x"),
        (["--image-size", "48"], "image_size", 48),
        (["--val-fraction", "0.3"], "val_fraction", 0.3),
        (["--weight-decay", "0"], "weight_decay", 0.0),
        (["--kernel-size", "7,5,3"], "kernel_size", [7, 5, 3]),
        (["--kernel_size", "5"], "kernel_size", 5),
        (["--kernel_size", "[7, 5,3]"], "kernel_size", [7, 5, 3]),
    ],
)
def test_hyphen_spellings_and_types(argv, dest, expected):
    value = getattr(parse(*argv), dest)
    assert value == expected and type(value) is type(expected)


def test_bad_kernel_size_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--kernel_size", "3,x")
    assert e.value.code == 2 and "kernel size" in capsys.readouterr().err


def test_bad_choice_exits_2():
    with pytest.raises(SystemExit) as e:
        parse("--activation", "tanh")
    assert e.value.code == 2


def visible_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every action shown in --help, those of subcommands included (SUPPRESS ones skipped)."""
    out = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += visible_actions(sub)
            continue
        out.append(action)
    return out


@pytest.mark.parametrize(
    "make_parser",
    [train_parta.get_args_parser, evaluate.get_args_parser, data.get_args_parser, export.get_args_parser],
    ids=["train_parta", "evaluate", "data", "export"],
)
def test_every_flag_has_help(make_parser):
    parser = make_parser()
    actions = visible_actions(parser)
    assert len(actions) > 3
    assert [a.option_strings or a.dest for a in actions if not (a.help or "").strip()] == []
    parser.format_help()  # %(default)s and friends all format


# ----------------------------------------------------------------------------- one-line errors (subprocess)
def test_missing_data_dir(tmp_path):
    missing = tmp_path / "no_such_dir"
    proc = run_cli("train_parta.py", *train_args(missing, tmp_path / "runs", "r", 1))
    assert_one_line_error(proc, "no dataset found", str(missing), "download")
    assert not (tmp_path / "runs" / "r").exists()


def test_empty_class_folder(tmp_path):
    root = make_dataset(tmp_path / "ds", ["a", "b"], n_train=4, n_val=1, size=16)
    shutil.rmtree(root / "train" / "b")
    (root / "train" / "b").mkdir()
    (root / "train" / "b" / ".DS_Store").write_bytes(b"\0")
    proc = run_cli("train_parta.py", *train_args(root, tmp_path / "runs", "r", 1))
    assert_one_line_error(proc, str(root / "train" / "b"), "no images")


def test_mismatched_class_folders(tmp_path):
    root = make_dataset(tmp_path / "ds", ["a", "b"], n_train=4, n_val=1, size=16)
    (root / "val" / "b").rename(root / "val" / "c")
    proc = run_cli("train_parta.py", *train_args(root, tmp_path / "runs", "r", 1))
    assert_one_line_error(proc, "class folders differ", "only in train: ['b']", "only in val: ['c']")


def test_too_small_image_size_fails_before_creating_a_run_folder(tmp_path):
    root = make_dataset(tmp_path / "ds", ["a", "b"], n_train=4, n_val=1, size=16)
    argv = train_args(root, tmp_path / "runs", "r", 1) + ["--image_size", "16", "--conv_layers", "5"]
    proc = run_cli("train_parta.py", *argv)
    assert_one_line_error(proc, "image_size 16 is too small", "at least 32")
    assert not (tmp_path / "runs" / "r").exists()


def test_evaluate_on_a_text_file_named_best_pt(tmp_path):
    fake = tmp_path / "best.pt"
    fake.write_text("epoch,val_acc\n1,0.5\n")
    proc = run_cli("evaluate.py", "--ckpt", fake)
    assert_one_line_error(proc, str(fake), "not a PyTorch checkpoint")


def test_evaluate_on_a_missing_checkpoint(tmp_path):
    proc = run_cli("evaluate.py", "--ckpt", tmp_path / "nope" / "best.pt")
    assert_one_line_error(proc, "checkpoint not found", str(tmp_path / "nope" / "best.pt"))


def test_predict_on_a_missing_path(trained_run, tmp_path):
    proc = run_cli(
        "evaluate.py",
        "--ckpt",
        trained_run.run_dir / "best.pt",
        "--predict",
        tmp_path / "nothing.jpg",
        "--device",
        "cpu",
    )
    assert_one_line_error(proc, "--predict: no such file or folder", str(tmp_path / "nothing.jpg"))


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_crop_scale_outside_0_1_is_a_one_line_error(tmp_path, value):
    root = make_dataset(tmp_path / "ds", ["a", "b"], n_train=4, n_val=1, size=16)
    proc = run_cli("train_parta.py", *train_args(root, tmp_path / "runs", "r", 1), "--crop_scale", value)
    assert_one_line_error(proc, "--crop_scale must be in (0, 1]")
    assert not (tmp_path / "runs" / "r").exists()


def every_parser(parser: argparse.ArgumentParser):
    """A parser and, depth first, the parsers of its subcommands."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from every_parser(sub)


@pytest.mark.parametrize(
    "script", ["train_parta", "train_partb", "evaluate", "visualize", "data", "sweep_offline", "export"]
)
def test_every_script_and_subcommand_refuses_abbreviated_flags(script):
    """`--drop 0.9` is not taken for `--dropout`: a typo stays an error, and what a sweep records is what ran."""
    import importlib

    parsers = list(every_parser(importlib.import_module(script).get_args_parser()))
    assert parsers and all(p.allow_abbrev is False for p in parsers), script


def test_an_abbreviated_flag_is_an_error_not_a_setting(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_parta.get_args_parser().parse_args(["--drop", "0.9"])
    assert exit_.value.code == 2 and "unrecognized arguments: --drop" in capsys.readouterr().err
    assert train_parta.get_args_parser().parse_args(["--dropout", "0.9"]).dropout == 0.9
