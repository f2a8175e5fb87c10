"""A W&B sweep.yaml as an Optuna search: parameters as trial suggestions, method as sampler, hyperband as pruner.

Every W&B parameter form maps to one Optuna distribution, or is refused in one line naming its key
before anything starts. Forms Optuna has no distribution for are sampled through one it has:
the normal family through a uniform quantile (recorded as `<name>.quantile`), `q` steps by
rounding the sampled value, `probabilities` by a sampler that draws that categorical by its weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from inat_classifier.cli import UserError
from inat_classifier.config_file import load_yaml, read_bounded_text

METHODS = ("grid", "random", "bayes")
TOP_KEYS = {
    "program",
    "method",
    "metric",
    "parameters",
    "command",
    "run_cap",
    "early_terminate",
    "name",
    "description",
    "project",
    "entity",
}
FLOAT_FORMS = {  # distribution -> (Optuna bounds from min/max, log scale)
    "uniform": (lambda lo, hi: (lo, hi), False),
    "q_uniform": (lambda lo, hi: (lo, hi), False),
    "log_uniform_values": (lambda lo, hi: (lo, hi), True),
    "q_log_uniform_values": (lambda lo, hi: (lo, hi), True),
    "log_uniform": (lambda lo, hi: (math.exp(lo), math.exp(hi)), True),  # bounds are natural logs
    "q_log_uniform": (lambda lo, hi: (math.exp(lo), math.exp(hi)), True),
    "inv_log_uniform_values": (lambda lo, hi: (lo, hi), True),  # 1/X of a log-uniform X is log-uniform
    "inv_log_uniform": (lambda lo, hi: (math.exp(-hi), math.exp(-lo)), True),
}
NORMAL_FORMS = ("normal", "q_normal", "log_normal", "q_log_normal")
GRID_FORMS = ("constant", "categorical", "int_uniform", "q_uniform")
QUANTILE_EDGE = 1e-6  # the normal's quantile stays inside (0, 1)


@dataclass
class Parameter:
    """One sweep parameter: how a trial samples it and which value the program gets."""

    name: str
    form: str  # constant, categorical, int_uniform, a FLOAT_FORMS key, or a NORMAL_FORMS key
    spec: dict

    @property
    def searched(self) -> bool:
        return self.form != "constant"

    @property
    def optuna_name(self) -> str:
        return f"{self.name}.quantile" if self.form in NORMAL_FORMS else self.name

    def choices(self) -> list:
        """The categorical's values as Optuna can store them (lists and mappings as JSON text)."""
        return [
            v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v) for v in self.spec["values"]
        ]

    def distribution(self):
        """The Optuna distribution this parameter is sampled from (None for a constant)."""
        s = self.spec
        if self.form == "constant":
            return None
        if self.form == "categorical":
            return CategoricalDistribution(self.choices())
        if self.form == "int_uniform":
            return IntDistribution(int(s["min"]), int(s["max"]))
        if self.form in NORMAL_FORMS:
            return FloatDistribution(QUANTILE_EDGE, 1 - QUANTILE_EDGE)
        bounds, log = FLOAT_FORMS[self.form]
        lo, hi = bounds(float(s["min"]), float(s["max"]))
        return FloatDistribution(lo, hi, log=log)

    def value(self, sampled: Any) -> Any:
        """The program's value for what the trial sampled (a quantile, an unrounded float, a JSON choice)."""
        s = self.spec
        if self.form == "constant":
            return s["value"]
        if self.form == "categorical":
            return s["values"][self.choices().index(sampled)]
        if self.form == "int_uniform":
            return int(sampled)
        x = sampled
        if self.form in NORMAL_FORMS:
            x = NormalDist(float(s.get("mu", 0.0)), float(s.get("sigma", 1.0))).inv_cdf(sampled)
            x = math.exp(x) if "log" in self.form else x
        if self.form.startswith("q_"):
            q = s.get("q", 1.0)
            x = round(x / q) * q
            return int(round(x)) if isinstance(q, int) and float(x).is_integer() else x
        return x


def parameter_form(name: str, spec: Any) -> str:
    """The W&B distribution of one `parameters:` entry (as W&B infers it when none is named)."""
    where = f"parameters.{name}"
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected a mapping with value, values, or a distribution with its bounds")
    if "parameters" in spec:
        raise UserError(f"{where}.parameters: nested parameters cannot be mapped to flags of one program")
    form = spec.get("distribution")
    if form is None:
        if "value" in spec:
            form = "constant"
        elif "values" in spec:
            form = "categorical"
        elif "min" in spec and "max" in spec:
            form = "int_uniform" if all(isinstance(spec[k], int) for k in ("min", "max")) else "uniform"
        elif "mu" in spec or "sigma" in spec:
            form = "normal"
        else:
            raise UserError(f"{where}: needs value, values, min and max, or a distribution")
    if form not in ("constant", "categorical", "int_uniform", *FLOAT_FORMS, *NORMAL_FORMS):
        raise UserError(f"{where}.distribution: '{form}' cannot be mapped to an Optuna distribution")
    return form


def check_parameter(name: str, form: str, spec: dict) -> None:
    """Bounds and keys a distribution needs, each missing or wrong one a line naming it."""
    where = f"parameters.{name}"
    needs = {"constant": ("value",), "categorical": ("values",)}.get(
        form, ("min", "max") if form not in NORMAL_FORMS else ()
    )
    for key in needs:
        if key not in spec:
            raise UserError(f"{where}: distribution {form} needs '{key}'")
    if form == "categorical" and (not isinstance(spec["values"], list) or not spec["values"]):
        raise UserError(f"{where}.values: expected a non-empty list")
    if "probabilities" in spec:
        p = spec["probabilities"]
        if (
            form != "categorical"
            or not isinstance(p, list)
            or len(p) != len(spec.get("values", []))
            or any(not isinstance(v, (int, float)) or v < 0 for v in p)
            or not math.isclose(sum(p), 1.0, abs_tol=1e-6)
        ):
            raise UserError(f"{where}.probabilities: expected one weight >= 0 per value, summing to 1")
    if "min" in needs:
        lo, hi = spec["min"], spec["max"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or lo >= hi:
            raise UserError(f"{where}: min and max must be numbers with min < max (got {lo!r}, {hi!r})")
        if form in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values") and lo <= 0:
            raise UserError(f"{where}.min: {form} needs min > 0 (got {lo})")
        if form == "int_uniform" and not all(isinstance(v, int) for v in (lo, hi)):
            raise UserError(f"{where}: int_uniform needs integer min and max")
    if form.startswith("q_") and not (isinstance(spec.get("q", 1.0), (int, float)) and spec.get("q", 1.0) > 0):
        raise UserError(f"{where}.q: must be a number > 0")
    if form in NORMAL_FORMS and not (isinstance(spec.get("sigma", 1.0), (int, float)) and spec.get("sigma", 1.0) > 0):
        raise UserError(f"{where}.sigma: must be a number > 0")


def parse_parameters(config: dict, where: str) -> list[Parameter]:
    """The sweep's parameters, each checked; a grid accepts only forms with a finite set of values."""
    params = config.get("parameters")
    if not isinstance(params, dict) or not params:
        raise UserError(f"{where}: 'parameters' must be a non-empty mapping")
    out = []
    for name, spec in params.items():
        form = parameter_form(str(name), spec)
        check_parameter(str(name), form, spec)
        if config.get("method") == "grid" and form not in GRID_FORMS:
            raise UserError(
                f"{where}: parameters.{name}: method grid needs value or values (or int_uniform, q_uniform), not {form}"
            )
        out.append(Parameter(str(name), form, spec))
    return out


def grid_values(p: Parameter) -> list:
    """A grid parameter's points, in the order W&B's grid walks them."""
    s = p.spec
    if p.form == "categorical":
        return p.choices()
    if p.form == "int_uniform":
        return list(range(int(s["min"]), int(s["max"]) + 1))
    q = s.get("q", 1.0)
    n = int(math.floor((s["max"] - s["min"]) / q + 1e-9))
    return [p.value(s["min"] + i * q) for i in range(n + 1)]


def load_config(path: str | Path) -> dict:
    """A sweep yaml, every key checked (one line naming the first that cannot be mapped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep config not found: {path}")
    try:
        config = load_yaml(read_bounded_text(path, str(path)))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    check_config(config, str(path))
    return config


def check_config(config: Any, where: str) -> None:
    """What the runner maps: program, method, metric, parameters, command, run_cap, early_terminate."""
    if not isinstance(config, dict):
        raise UserError(f"{where}: expected a mapping with program, method, metric and parameters")
    for key in config:
        if key not in TOP_KEYS:
            raise UserError(
                f"{where}: '{key}' cannot be mapped to an offline sweep (known: {', '.join(sorted(TOP_KEYS))})"
            )
    for key in ("program", "method", "parameters"):
        if key not in config:
            raise UserError(f"{where}: needs '{key}'")
    if not isinstance(config["program"], str) or not config["program"].strip():
        raise UserError(f"{where}: program: expected the file name of a script, got {config['program']!r}")
    if config["method"] not in METHODS:
        raise UserError(f"{where}: method '{config['method']}' cannot be mapped; use grid, random or bayes")
    metric = config.get("metric")
    if metric is not None and (
        not isinstance(metric, dict)
        or not isinstance(metric.get("name"), str)
        or metric.get("goal", "maximize") not in ("maximize", "minimize")
    ):
        raise UserError(f"{where}: metric: expected {{name: ..., goal: maximize|minimize}}")
    if (config["method"] == "bayes" or config.get("early_terminate")) and metric is None:
        raise UserError(f"{where}: method {config['method']} and early_terminate need metric: {{name, goal}}")
    cap = config.get("run_cap")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise UserError(f"{where}: run_cap: expected a whole number >= 1")
    if "command" in config:
        check_command(config["command"], where)
    parse_parameters(config, where)
    hyperband_settings(config, where)


def check_command(command: Any, where: str) -> None:
    """`command:` is a list of words and macros like ${args}; a mapping or list in it is no word of a command line."""
    if not isinstance(command, list) or not command:
        raise UserError(f"{where}: command: expected a list of words and macros")
    for i, word in enumerate(command):
        if not isinstance(word, (str, int, float)) or isinstance(word, bool):
            kind = {dict: "a mapping", list: "a list", type(None): "nothing", bool: "true/false"}.get(type(word))
            raise UserError(
                f"{where}: command[{i}]: expected a word or a macro like ${{args}}, got {kind or type(word).__name__}"
                " (quote a word that YAML reads otherwise)"
            )


def metric_of(config: dict) -> tuple[str, str]:
    """(metric name, goal); runs are ranked by it in every method."""
    metric = config.get("metric") or {}
    name = metric.get("name", "val_acc")
    return name, metric.get("goal", "maximize" if "acc" in name else "minimize")


def hyperband_settings(config: dict, where: str = "sweep config") -> dict | None:
    """early_terminate as HyperbandPruner arguments (min_resource, max_resource, reduction_factor), or None."""
    et = config.get("early_terminate")
    if not et:
        return None
    if not isinstance(et, dict) or et.get("type") != "hyperband":
        raise UserError(f"{where}: early_terminate: only type hyperband can be mapped")
    for key in et:
        if key not in ("type", "min_iter", "max_iter", "eta", "s", "strict"):
            raise UserError(f"{where}: early_terminate.{key} cannot be mapped to Optuna's HyperbandPruner")
    eta = et.get("eta", 3)
    if not isinstance(eta, (int, float)) or eta <= 1:
        raise UserError(f"{where}: early_terminate.eta: must be a number > 1")
    if "min_iter" in et:
        min_iter, max_iter = et["min_iter"], et.get("max_iter", "auto")
    elif "max_iter" in et:  # W&B: s brackets below max_iter
        max_iter = et["max_iter"]
        min_iter = max(1, int(round(max_iter / eta ** et.get("s", 1))))
    else:
        raise UserError(f"{where}: early_terminate: hyperband needs min_iter or max_iter")
    if not isinstance(min_iter, int) or min_iter < 1 or not (max_iter == "auto" or isinstance(max_iter, int)):
        raise UserError(f"{where}: early_terminate: min_iter and max_iter must be whole numbers of epochs >= 1")
    return {"min_resource": min_iter, "max_resource": max_iter, "reduction_factor": int(round(eta))}


# ----------------------------------------------------------------------------- trials
def plain(value: Any) -> Any:
    """numpy scalars and nested containers as plain JSON types (what the W&B backend sends)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def suggest(trial, params: list[Parameter]) -> dict:
    """Sample one run: its config as W&B hands it to the agent ({name: {"value": v}})."""
    run_config = {}
    for p in params:
        run_config[p.name] = {"value": p.value(suggest_one(trial, p.optuna_name, p.distribution()))}
    return run_config


def suggest_one(trial: optuna.Trial, name: str, dist) -> Any:
    """trial.suggest_* for one distribution (None for a constant)."""
    if dist is None:
        return None
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def build_sampler(config: dict, params: list[Parameter], seed: int | None):
    """The method's Optuna sampler: GridSampler, RandomSampler, or GPSampler for bayes (see the README's comparison)."""
    method = config["method"]
    if method == "grid":
        space = {p.optuna_name: grid_values(p) for p in params if p.searched}
        base = AskTellGrid(space, seed=seed)
    elif method == "random":
        base = optuna.samplers.RandomSampler(seed=seed)
    else:  # a Gaussian process: best in tools/compare_samplers.py (see the README), 5 random runs first
        base = optuna.samplers.GPSampler(seed=seed, n_startup_trials=5)
    weights = {p.optuna_name: p.spec["probabilities"] for p in params if "probabilities" in p.spec}
    return WeightedChoices(base, weights, seed) if weights and method != "grid" else base


def build_pruner(config: dict, enabled: bool = True):
    """Optuna's HyperbandPruner from early_terminate, reported once per epoch; NopPruner without it."""
    settings = hyperband_settings(config) if enabled else None
    return optuna.pruners.HyperbandPruner(**settings) if settings else optuna.pruners.NopPruner()


class AskTellGrid(optuna.samplers.GridSampler):
    """Optuna's GridSampler for ask-and-tell: it does not stop the study when the grid is used up
    (Study.stop works only inside optimize); the runner sees that itself and says so."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


class WeightedChoices(optuna.samplers.BaseSampler):
    """A sampler that draws the categoricals with `probabilities` by their weights, the rest by `base`."""

    def __init__(self, base: optuna.samplers.BaseSampler, weights: dict[str, list[float]], seed: int | None) -> None:
        self.base, self.weights = base, weights
        self.rng = np.random.default_rng(seed)

    def infer_relative_search_space(self, study, trial):
        space = self.base.infer_relative_search_space(study, trial)
        return {k: v for k, v in space.items() if k not in self.weights}

    def sample_relative(self, study, trial, search_space):
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        if param_name in self.weights:
            choices = param_distribution.choices
            return choices[self.rng.choice(len(choices), p=self.weights[param_name])]
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
        self.rng = np.random.default_rng()
