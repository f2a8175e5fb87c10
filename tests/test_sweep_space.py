"""sweep.yaml as an Optuna search: every W&B parameter form samples inside its bounds with its type, reaches the
training scripts through the agent's argv as intended, and whatever cannot be mapped is one line naming its key."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

import train_parta
import train_partb
from inat_classifier.cli import UserError
from inat_classifier.sweep.commands import build_command
from inat_classifier.sweep.space import build_pruner, build_sampler, check_config, parse_parameters, suggest

REPO = Path(__file__).resolve().parents[1]
EXPECTED_TYPES = {
    "filters": int,
    "filter_org": float,
    "conv_layers": int,
    "activation": str,
    "dropout": float,
    "batch_norm": bool,
    "batch_size": int,
    "lr": float,
    "augment": bool,
    "dense_neurons": int,
    "epochs": int,
    "image_size": int,
}
PARTB_TYPES = {
    "freeze": str,
    "lr": float,
    "lr_mult": float,
    "unfreeze_at": int,
    "augment": bool,
    "model": str,
    "epochs": int,
}


def yaml_config(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def agent_args(values: dict) -> list[str]:
    """The ${args} `wandb agent` puts on the command line for a run with these values."""
    return create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]


def samples(config: dict, n: int, seed: int = 0) -> list[dict]:
    """n runs' values ({name: value}) as the runner samples them, from an in-memory study."""
    params = parse_parameters(config, "test")
    study = optuna.create_study(sampler=build_sampler(config, params, seed), direction="maximize")
    out = []
    for i in range(n):
        trial = study.ask()
        out.append({k: v["value"] for k, v in suggest(trial, params).items()})
        study.tell(trial, float(i % 3))
    return out


@pytest.mark.parametrize(
    "name,types,script", [("sweep.yaml", EXPECTED_TYPES, train_parta), ("sweep_partb.yaml", PARTB_TYPES, train_partb)]
)
def test_every_sampled_run_of_the_shipped_yamls_parses_to_its_values(name, types, script):
    config = yaml_config(name)
    check_config(config, name)
    assert set(config["parameters"]) == set(types)
    parser = script.get_args_parser()
    for method in ("random", "bayes"):
        for values in samples(dict(config, method=method), 12):
            args = parser.parse_args(agent_args(values))
            for key, value in values.items():
                got = getattr(args, key)
                assert type(got) is types[key] and got == value, (key, value, got)


def test_booleans_and_float_factors_survive_the_agent_format():
    args = train_parta.get_args_parser().parse_args(
        agent_args({"batch_norm": False, "augment": False, "filter_org": 0.5})
    )
    assert args.batch_norm is False and args.augment is False and args.filter_org == 0.5


FORMS = [  # (spec, check of one sampled value)
    ({"distribution": "uniform", "min": -1.0, "max": 2.0}, lambda v: isinstance(v, float) and -1 <= v <= 2),
    ({"min": 0.1, "max": 0.9}, lambda v: isinstance(v, float) and 0.1 <= v <= 0.9),
    ({"distribution": "int_uniform", "min": 3, "max": 7}, lambda v: type(v) is int and 3 <= v <= 7),
    ({"min": 2, "max": 5}, lambda v: type(v) is int and 2 <= v <= 5),
    (
        {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25},
        lambda v: 0 <= v <= 1 and math.isclose(v / 0.25, round(v / 0.25)),
    ),
    (
        {"distribution": "q_uniform", "min": 8, "max": 64, "q": 8},
        lambda v: type(v) is int and v % 8 == 0 and 8 <= v <= 64,
    ),
    ({"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-1}, lambda v: 1e-5 <= v <= 1e-1),
    (
        {"distribution": "q_log_uniform_values", "min": 16, "max": 512, "q": 16},
        lambda v: type(v) is int and v % 16 == 0 and 16 <= v <= 512,
    ),
    (
        {"distribution": "log_uniform", "min": math.log(1e-4), "max": math.log(1e-2)},
        lambda v: 1e-4 * 0.999 <= v <= 1e-2 * 1.001,
    ),
    ({"distribution": "inv_log_uniform_values", "min": 0.01, "max": 1.0}, lambda v: 0.01 <= v <= 1.0),
    ({"distribution": "normal", "mu": 5.0, "sigma": 0.5}, lambda v: isinstance(v, float) and 2.0 < v < 8.0),
    ({"distribution": "q_normal", "mu": 10, "sigma": 3, "q": 2}, lambda v: type(v) is int and v % 2 == 0),
    ({"distribution": "log_normal", "mu": 0.0, "sigma": 1.0}, lambda v: v > 0),
    ({"distribution": "q_log_normal", "mu": 3.0, "sigma": 0.5, "q": 1}, lambda v: type(v) is int and v >= 0),
    ({"values": [16, 32, 64]}, lambda v: v in (16, 32, 64) and type(v) is int),
    ({"values": ["relu", "gelu"], "probabilities": [0.9, 0.1]}, lambda v: v in ("relu", "gelu")),
    ({"value": 0.5}, lambda v: v == 0.5),
]


@pytest.mark.parametrize(
    "spec,check", FORMS, ids=lambda v: str(v.get("distribution", v)) if isinstance(v, dict) else ""
)
@pytest.mark.parametrize("method", ["random", "bayes"])
def test_every_wandb_form_samples_inside_its_bounds_with_its_type(spec, check, method):
    config = {
        "program": "train_parta.py",
        "method": method,
        "metric": {"name": "val_acc", "goal": "maximize"},
        "parameters": {"x": spec},
    }
    values = [run["x"] for run in samples(config, 15)]
    assert all(check(v) for v in values), values
    if len(spec) > 1 and "value" not in spec:
        assert len(set(values)) > 1  # it does vary


@pytest.mark.parametrize(
    "flag,spec,wanted",
    [
        ("lr", {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}, float),
        ("dense_neurons", {"distribution": "q_log_uniform_values", "min": 32, "max": 512, "q": 32}, int),
        ("dropout", {"distribution": "q_uniform", "min": 0.0, "max": 0.5, "q": 0.1}, float),
        ("filters", {"distribution": "int_uniform", "min": 8, "max": 64}, int),
        ("weight_decay", {"distribution": "normal", "mu": 0.05, "sigma": 0.01}, float),
    ],
)
def test_sampled_forms_reach_train_parta_as_the_flag_type(flag, spec, wanted):
    config = {"program": "train_parta.py", "method": "random", "parameters": {flag: spec}}
    for run in samples(config, 6):
        got = getattr(train_parta.get_args_parser().parse_args(agent_args(run)), flag)
        assert type(got) is wanted and math.isclose(got, run[flag], rel_tol=1e-9)


def test_probabilities_weight_the_choices():
    config = {
        "program": "p",
        "method": "random",
        "parameters": {"a": {"values": ["x", "y"], "probabilities": [0.8, 0.2]}, "b": {"min": 0.0, "max": 1.0}},
    }
    values = [run["a"] for run in samples(config, 300)]
    assert 0.7 < values.count("x") / len(values) < 0.9


def test_grid_walks_every_point_of_values_int_uniform_and_q_uniform():
    config = {
        "program": "p",
        "method": "grid",
        "parameters": {
            "a": {"values": ["x", "y"]},
            "b": {"distribution": "int_uniform", "min": 1, "max": 3},
            "c": {"distribution": "q_uniform", "min": 0.0, "max": 0.5, "q": 0.25},
            "d": {"value": 7},
        },
    }
    runs = samples(config, 18)
    assert {(r["a"], r["b"], r["c"]) for r in runs} == {
        (a, b, c) for a in "xy" for b in (1, 2, 3) for c in (0.0, 0.25, 0.5)
    }
    assert all(r["d"] == 7 for r in runs)


BAD = [
    ({"controller": {"type": "local"}}, "'controller' cannot be mapped"),
    ({"method": "hyperopt"}, "method 'hyperopt' cannot be mapped"),
    ({"parameters": {"x": {"distribution": "beta", "a": 1, "b": 2}}}, "parameters.x.distribution: 'beta'"),
    ({"parameters": {"x": {"parameters": {"y": {"value": 1}}}}}, "parameters.x.parameters"),
    ({"parameters": {"x": {"distribution": "uniform", "min": 2, "max": 1}}}, "parameters.x: min and max"),
    ({"parameters": {"x": {"distribution": "log_uniform_values", "min": 0, "max": 1}}}, "parameters.x.min"),
    ({"parameters": {"x": {"values": [1, 2], "probabilities": [0.5, 0.6]}}}, "parameters.x.probabilities"),
    ({"parameters": {"x": {"distribution": "q_uniform", "min": 0, "max": 1, "q": -1}}}, "parameters.x.q"),
    (
        {"method": "grid", "parameters": {"x": {"distribution": "uniform", "min": 0.0, "max": 1.0}}},
        "method grid needs value or values",
    ),
    ({"early_terminate": {"type": "envelope"}}, "only type hyperband"),
    ({"early_terminate": {"type": "hyperband", "eta": 3}}, "needs min_iter or max_iter"),
    ({"early_terminate": {"type": "hyperband", "min_iter": 1, "bands": 2}}, "early_terminate.bands"),
    ({"run_cap": 0}, "run_cap"),
    ({"metric": {"name": "val_acc", "goal": "up"}}, "metric:"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_what_cannot_be_mapped_is_one_line_naming_its_key(change, message):
    config = {
        "program": "train_parta.py",
        "method": "random",
        "metric": {"name": "val_acc", "goal": "maximize"},
        "parameters": {"lr": {"values": [0.1]}},
    }
    config.update(change)
    with pytest.raises(UserError) as e:
        check_config(config, "s.yaml")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "early,pruner,settings",
    [
        ({"type": "hyperband", "min_iter": 2, "eta": 3}, "HyperbandPruner", (2, "auto", 3)),
        ({"type": "hyperband", "max_iter": 27, "s": 2, "eta": 3}, "HyperbandPruner", (3, 27, 3)),
        (None, "NopPruner", None),
    ],
)
def test_early_terminate_becomes_optunas_hyperband(early, pruner, settings):
    config = {"program": "p", "method": "random", "metric": {"name": "val_acc"}, "parameters": {"a": {"values": [1]}}}
    if early:
        config["early_terminate"] = early
    built = build_pruner(config)
    assert type(built).__name__ == pruner
    if settings:
        assert (built._min_resource, built._max_resource, built._reduction_factor) == settings


def test_runner_builds_the_agents_command():
    config = yaml_config("sweep.yaml")
    run_config = {k: {"value": v} for k, v in samples(config, 1)[0].items()}
    cmd = build_command(config, run_config, "python")
    assert cmd[:3] == ["/usr/bin/env", "python", "train_parta.py"]
    assert cmd[3:] == agent_args({k: v["value"] for k, v in run_config.items()})
    alt = dict(config, command=["${env}", "${interpreter}", "${program}", "--seed", "1", "${args_no_hyphens}"])
    alt_cmd = build_command(alt, run_config, "py")
    assert alt_cmd[1:5] == ["py", "train_parta.py", "--seed", "1"]
    assert alt_cmd[5:] == create_sweep_command_args({"args": run_config})["args_no_hyphens"]
