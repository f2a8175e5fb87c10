"""Every training flag takes effect: two values give a different first step, and the value is recorded.

The first step is built by the scripts' own builders (train_parta.build_model,
train_partb.build_backbone_for and param_groups, training.build_trainer) on a
fixed batch, without a data folder. A flag that cannot change a first step is in EXEMPT with the
test that covers what it does. A new flag in neither list fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_parta
import train_partb
from conftest import CLASSES, clean_env, make_dataset
from inat_classifier import training
from inat_classifier.checkpoint import load_checkpoint
from inat_classifier.cli import json_safe
from inat_classifier.devices import Dist
from inat_classifier.freezing import set_train_mode
from inat_classifier.training import train_step

SCRIPTS = {"parta": train_parta, "partb": train_partb}
N_CLASSES = 3
R18 = "<r18_file>"  # replaced by the r18_file fixture's path
BASE = {  # small and quick; each case's flags come after these and win
    "parta": [
        "--image_size",
        "16",
        "--conv_layers",
        "2",
        "--filters",
        "4",
        "--dense_neurons",
        "8",
        "--epochs",
        "2",
        "--batch_size",
        "4",
        "--warmup_epochs",
        "0",
        "--dropout",
        "0",
        "--device",
        "cpu",
    ],
    "partb": [
        "--model",
        "mobilenet_v3_small",
        "--weights",
        "none",
        "--freeze",
        "none",
        "--image_size",
        "32",
        "--epochs",
        "2",
        "--batch_size",
        "4",
        "--warmup_epochs",
        "0",
        "--device",
        "cpu",
    ],
}

# flag -> (value 1, value 2, flags both need): the two values must give different first steps.
COMMON = {
    "image_size": ("16", "24", []),
    "batch_size": ("4", "6", []),
    "epochs": ("2", "20", []),  # the cosine schedule's length: the LR after the first step
    "optimizer": ("adamw", "sgd", []),
    "lr": ("0.001", "0.01", []),
    "weight_decay": ("0", "0.5", []),
    "momentum": ("0.5", "0.9", ["--optimizer", "sgd"]),  # nesterov: the first update is grad * (1 + m)
    "scheduler": ("cosine", "none", []),
    "warmup_epochs": ("0", "1", []),
    "label_smoothing": ("0", "0.3", []),
    "class_weights": ("none", "balanced", []),  # with first_step's imbalanced class counts
    "accum_steps": ("1", "2", []),  # 2: the first batch only gathers gradients
    "grad_clip": ("0", "0.001", []),
    "mixup": ("0", "1.0", []),
    "cutmix": ("0", "1.0", []),
    "ema": ("0", "0.5", []),
    "seed": ("1", "2", []),  # the initial weights
    "amp": ("off", "bf16", []),
    "channels_last": ("True", "False", []),  # the weights' memory format
}
STEP_FLAGS = {
    "parta": {
        **COMMON,
        "filters": ("4", "6", []),
        "filter_org": ("1", "2", []),
        "conv_layers": ("2", "3", []),
        "kernel_size": ("3", "5", []),
        "activation": ("relu", "gelu", []),
        "batch_norm": ("True", "False", []),
        "dropout": ("0", "0.5", []),
        "dense_neurons": ("8", "12", []),
        "pool": ("avg", "flatten", []),
    },
    "partb": {
        **COMMON,
        "image_size": ("32", "40", []),
        "model": ("mobilenet_v3_small", "shufflenet_v2_x0_5", []),
        "weights": ("none", R18, ["--model", "resnet18"]),
        "freeze": ("none", "all", []),
        "backbone_lr": ("0.0001", "0.01", []),
        "lr_mult": ("0.1", "0.5", []),
        "unfreeze_at": ("1", "3", ["--freeze", "all"]),  # epoch 1 starts by unfreezing the body
        "freeze_bn": ("True", "False", []),
    },  # the body's batch-norm statistics after the step
}

# Flags that cannot change a first step, with the test of what each does.
EXEMPT_COMMON = {
    "config": "tests/test_config_file.py::test_a_real_runs_args_json_reproduces_its_flags",
    "data_dir": "tests/test_first_run.py::test_offline_first_run_names_the_url_and_where_to_put_the_zip",
    "download": "tests/test_first_run.py::test_data_url_flag_and_no_download",
    "data_url": "tests/test_first_run.py::test_data_url_flag_and_no_download",
    "val_fraction": "tests/test_data.py::test_stratified_split_keeps_each_class_fraction",  # which photos train
    "augment": "tests/test_cache.py::test_device_augmentation_keeps_shape_dtype_and_range_and_is_seeded",
    "crop_scale": "tests/test_cache.py::test_device_loader_draws_crops_at_its_crop_scale",
    "workers": "tests/test_data.py::test_unreadable_image_is_reported_once_and_skipped",
    "cache": "tests/test_cache.py::test_cache_is_reused_and_rebuilt_when_files_change",
    "sampler": "tests/test_balanced_sampler.py::"
    "test_balanced_sampling_draws_the_classes_evenly_over_epochs_of_a_10_to_1_dataset",
    "lr_find": "tests/test_recipes.py::test_lr_find_flag_writes_the_plot_and_trains_nothing",
    "patience": "tests/test_resume.py::test_patience_stops_after_n_epochs_without_a_better_val_acc",
    "device": "tests/test_bad_data.py::test_bad_flags_found_late_leave_no_orphan_run_folder",
    "compile": "tests/test_device_paths.py::test_compile_wraps_the_ddp_module_not_the_other_way_round",  # slow
    "out_dir": "tests/test_bad_data.py::test_run_name_stays_inside_out_dir",
    "run_name": "tests/test_bad_data.py::test_run_name_stays_inside_out_dir",
    "resume": "tests/test_robustness.py::test_sigkill_mid_run_then_resume_reproduces_the_uninterrupted_run",
    "save_every": "tests/test_robustness.py::test_sigint_and_sigterm_mid_epoch_save_last_pt_exit_130_and_resume",
    "wandb": "tests/test_training.py::test_wandb_offline_needs_no_account",
    "wandb_project": "test_a_real_run_records_every_step_flag (the W&B run's project)",
    "wandb_entity": "tests/test_training.py::test_wandb_offline_needs_no_account",  # needs an account
}
EXEMPT = {
    "parta": {
        **EXEMPT_COMMON,
        "summary": "tests/test_models.py::test_summary_flag_prints_every_layer_from_a_traced_pass_without_a_dataset",
    },
    "partb": {
        **EXEMPT_COMMON,
        "summary": "tests/test_models.py::test_partb_summary_marks_frozen_layers",
        "list_stages": "tests/test_partb.py::test_list_stages_expands_a_single_features_body",
        "cache_features": "tests/test_partb.py::test_feature_cache_matches_the_uncached_path_and_is_reused",
        "feature_cache_dir": "tests/test_signals.py::"
        "test_a_feature_cache_of_the_wrong_shape_is_recomputed_with_one_line",
    },
}


def flag_names(script) -> set[str]:
    return {a.dest for a in script.get_args_parser()._actions if a.dest != "help"}


@pytest.mark.parametrize("part", SCRIPTS)
def test_every_training_flag_is_checked_or_exempt(part):
    flags = flag_names(SCRIPTS[part])
    unlisted = flags - set(STEP_FLAGS[part]) - set(EXEMPT[part])
    assert not unlisted, f"add {sorted(unlisted)} to STEP_FLAGS (two values, different first steps) or EXEMPT"
    assert not set(STEP_FLAGS[part]) & set(EXEMPT[part])
    assert not (set(STEP_FLAGS[part]) | set(EXEMPT[part])) - flags, "a listed flag no longer exists"


def parse(part: str, flags: list[str], r18: Path):
    flags = [str(r18) if f == R18 else f for f in flags]
    return SCRIPTS[part].get_args_parser().parse_args(BASE[part] + flags)


def fixed_batch(size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 40, 40, generator=g)
    return F.interpolate(x, size=size, mode="bilinear", antialias=True)[:n], torch.arange(8)[:n] % N_CLASSES


def first_step(part: str, flags: list[str], r18: Path) -> torch.Tensor:
    """One optimizer step as fit takes it: loss, group LRs, weights, buffers and EMA weights, in one vector."""
    args = parse(part, flags, r18)
    if part == "parta":
        torch.manual_seed(args.seed)  # as train_parta.main
        model = train_parta.build_model(args, N_CLASSES)
        groups = train_parta.param_groups_with_decay(model.named_parameters(), args.lr, args.weight_decay, "model")
    else:
        train_partb.resolve_recipe(args)
        backbone = train_partb.build_backbone_for(args, N_CLASSES)
        model, groups = backbone.model, train_partb.param_groups(backbone, args)
        train_partb.unfreezer(backbone, args)(1)  # fit's on_epoch_start of the first epoch
    counts = [4, 2, 1]  # an imbalanced training split, for --class_weights balanced
    trainer = training.build_trainer(args, model, groups, torch.device("cpu"), 4, N_CLASSES, Dist(), counts)
    set_train_mode(trainer.model)
    torch.manual_seed(7)  # the same dropout and MixUp/CutMix draws for both values
    x, y = fixed_batch(args.image_size, args.batch_size)
    if trainer.mix is not None:
        x, y = trainer.mix(x, y)
    loss, _ = train_step(trainer, x, y, min(args.accum_steps, 4), update=args.accum_steps == 1)
    conv = next(m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    parts = [
        loss.float().reshape(1),
        torch.tensor([g["lr"] for g in trainer.optimizer.param_groups]),
        torch.tensor([float(conv.is_contiguous(memory_format=torch.channels_last))]),
    ]
    parts += [t.detach().float().flatten() for t in model.state_dict().values() if t.is_floating_point()]
    if trainer.ema is not None:
        parts += [p.detach().float().flatten() for p in trainer.ema.parameters()]
    return torch.cat(parts)


CASES = [(part, flag) for part in SCRIPTS for flag in STEP_FLAGS[part]]


@pytest.mark.parametrize("part,flag", CASES, ids=[f"{p}-{f}" for p, f in CASES])
def test_two_values_of_a_flag_give_different_first_steps(part, flag, r18_file):
    one, two, needs = STEP_FLAGS[part][flag]
    a = first_step(part, [*needs, f"--{flag}", one], r18_file)
    b = first_step(part, [*needs, f"--{flag}", two], r18_file)
    assert a.shape != b.shape or not torch.equal(a, b), f"--{flag} {one} and {two} take the same first step"


@pytest.mark.parametrize("part", SCRIPTS)
def test_the_same_flags_take_the_same_first_step(part, r18_file):
    """So a difference above comes from the flag, not from chance."""
    flags = ["--mixup", "1.0", "--dropout", "0.5"] if part == "parta" else ["--mixup", "1.0"]
    assert torch.equal(first_step(part, flags, r18_file), first_step(part, flags, r18_file))


# ----------------------------------------------------------------------------- recorded where it belongs
RECORDED = {  # second values that work together in one real run
    "parta": [
        "--filters",
        "6",
        "--filter_org",
        "2",
        "--conv_layers",
        "3",
        "--kernel_size",
        "5",
        "--activation",
        "relu",
        "--no-batch_norm",
        "--dropout",
        "0.5",
        "--dense_neurons",
        "12",
        "--pool",
        "flatten",
        "--image_size",
        "24",
        "--batch_size",
        "6",
        "--epochs",
        "1",
        "--optimizer",
        "sgd",
        "--lr",
        "0.01",
        "--weight_decay",
        "0.5",
        "--momentum",
        "0.8",
        "--scheduler",
        "none",
        "--warmup_epochs",
        "1",
        "--label_smoothing",
        "0.3",
        "--class_weights",
        "balanced",
        "--sampler",
        "balanced",
        "--accum_steps",
        "2",
        "--grad_clip",
        "0.001",
        "--mixup",
        "1.0",
        "--cutmix",
        "1.0",
        "--ema",
        "0.5",
        "--seed",
        "2",
        "--amp",
        "bf16",
        "--no-channels_last",
    ],
    "partb": [
        "--model",
        "resnet18",
        "--weights",
        R18,
        "--freeze",
        "all",
        "--unfreeze_at",
        "1",
        "--no-freeze_bn",
        "--backbone_lr",
        "0.01",
        "--lr_mult",
        "0.5",
        "--image_size",
        "40",
        "--batch_size",
        "6",
        "--epochs",
        "1",
        "--optimizer",
        "adam",
        "--lr",
        "0.01",
        "--weight_decay",
        "0.5",
        "--momentum",
        "0.8",
        "--scheduler",
        "none",
        "--warmup_epochs",
        "1",
        "--label_smoothing",
        "0.3",
        "--class_weights",
        "balanced",
        "--sampler",
        "balanced",
        "--accum_steps",
        "2",
        "--grad_clip",
        "0.001",
        "--mixup",
        "1.0",
        "--cutmix",
        "1.0",
        "--ema",
        "0.5",
        "--seed",
        "2",
        "--amp",
        "bf16",
        "--no-channels_last",
    ],
}


def record_wandb_config(monkeypatch) -> list[dict]:
    """The config of each W&B run started, as W&B holds it (run.config of the real wandb.init)."""
    import wandb

    seen, real_init = [], wandb.init

    def init(*args, **kwargs):
        run = real_init(*args, **kwargs)
        seen.append(dict(run.config))
        return run

    monkeypatch.setattr(wandb, "init", init)
    return seen


@pytest.mark.parametrize("part", SCRIPTS)
def test_a_real_run_records_every_step_flag(part, r18_file, tmp_path, monkeypatch):
    """One tiny run with a second value of every step flag: args.json, the checkpoint and W&B hold them."""
    for key, value in clean_env(HOME=tmp_path, WANDB_DIR=tmp_path / "wandb", WANDB_MODE="offline").items():
        monkeypatch.setenv(key, value)
    data = make_dataset(tmp_path / "ds", CLASSES[:N_CLASSES], n_train=4, n_val=1, size=40)
    flags = [
        *RECORDED[part],
        "--data_dir",
        str(data),
        "--out_dir",
        str(tmp_path / "runs"),
        "--run_name",
        "r",
        "--cache",
        "off",
        "--workers",
        "0",
        "--wandb",
        "offline",
        "--wandb_project",
        "flags-recorded",
    ]
    args = parse(part, flags, r18_file)
    expected = json_safe(vars(args))
    wandb_configs = record_wandb_config(monkeypatch)
    SCRIPTS[part].main(args)
    run_dir = tmp_path / "runs" / "r"
    saved = {
        "args.json": json.loads((run_dir / "args.json").read_text()),
        "checkpoint": load_checkpoint(run_dir / "last.pt")["config"],
        "W&B": wandb_configs[0],
    }
    typed = {f.lstrip("-").removeprefix("no-") for f in RECORDED[part] if f.startswith("--")}
    assert typed >= set(STEP_FLAGS[part]), set(STEP_FLAGS[part]) - typed  # every step flag has a value here
    for where, config in saved.items():
        for flag in sorted(typed):
            assert config.get(flag) == expected[flag], (where, flag, config.get(flag), expected[flag])
    assert saved["W&B"]["wandb_project"] == "flags-recorded"
