"""Which Optuna sampler `method: bayes` maps to: random, TPE and GP on a stand-in of the Part A search space.

The stand-in metric has the shape sweeps of this model show: a peak in log(lr), a best filter count
and activation, batch norm helping, one parameter that does nothing, and run-to-run noise. Two
runners share each study (trials are asked two at a time before either is told), as in a sweep
with two GPUs. Reported: the mean regret (best possible minus best found) after 12 and 30 runs over
many seeds, and the sampler's own time per run.

    python tools/compare_samplers.py [--seeds 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inat_classifier.cli import UserError  # noqa: E402
from inat_classifier.storage import atomic_write_text, json_object_where, refuse_foreign  # noqa: E402
from inat_classifier.sweep.space import build_sampler, parse_parameters, suggest  # noqa: E402

SPACE = {
    "program": "train_parta.py",
    "method": "bayes",
    "metric": {"name": "val_acc", "goal": "maximize"},
    "parameters": {
        "filters": {"values": [32, 64, 128]},
        "filter_org": {"values": [0.5, 1, 2]},
        "conv_layers": {"values": [3, 4, 5]},
        "activation": {"values": ["relu", "gelu", "silu", "mish"]},
        "dropout": {"values": [0.2, 0.3]},
        "batch_norm": {"values": [True, False]},
        "dense_neurons": {"values": [128, 256, 512]},
        "augment": {"values": [True, False]},
        "batch_size": {"values": [32, 64]},
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
    },
}
BEST = 0.80  # the stand-in's maximum (before noise)


def stand_in_metric(v: dict, rng: np.random.Generator) -> float:
    """A val_acc-like surface over the Part A flags: what matters, what barely does, and noise."""
    acc = BEST - 0.12 * (math.log10(v["lr"]) + 2.7) ** 2  # peak at lr 2e-3
    acc -= {32: 0.04, 64: 0.0, 128: 0.01}[v["filters"]] + {3: 0.03, 4: 0.0, 5: 0.01}[v["conv_layers"]]
    acc -= {"relu": 0.02, "gelu": 0.0, "silu": 0.005, "mish": 0.0}[v["activation"]]
    acc -= 0.0 if v["batch_norm"] else 0.05
    acc -= 0.0 if v["augment"] else 0.02
    acc -= 0.01 * abs(math.log2(v["filter_org"]))
    return acc + rng.normal(0, 0.005)  # dropout, dense_neurons and batch_size do nothing


def samplers(seed: int) -> dict:
    """The candidates; the one `method: bayes` maps to (inat_classifier.sweep.space.build_sampler) is marked *."""
    params = parse_parameters(SPACE, "space")
    ours = build_sampler(SPACE, params, seed)
    candidates = {
        "random": optuna.samplers.RandomSampler(seed=seed),
        "tpe (10 random runs first)": optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True),
        "tpe (5 random runs first)": optuna.samplers.TPESampler(
            seed=seed, multivariate=True, constant_liar=True, n_startup_trials=5
        ),
        "gp (10 random runs first)": optuna.samplers.GPSampler(seed=seed),
        "gp (5 random runs first)": optuna.samplers.GPSampler(seed=seed, n_startup_trials=5),
    }
    for name, sampler in candidates.items():
        if type(sampler) is type(ours) and getattr(sampler, "_n_startup_trials", None) == getattr(
            ours, "_n_startup_trials", None
        ):
            return {(f"{k} *" if k == name else k): v for k, v in candidates.items()}
    return candidates


def run(sampler, seed: int, budget: int, workers: int = 2) -> tuple[list[float], float]:
    """Best metric found after each run, with `workers` runners asking before they tell; sampler seconds."""
    params = parse_parameters(SPACE, "space")
    study = optuna.create_study(direction="maximize", sampler=sampler)
    rng = np.random.default_rng(seed)
    best, curve, spent = -1.0, [], 0.0
    while len(curve) < budget:
        t0 = time.perf_counter()
        batch = [study.ask() for _ in range(min(workers, budget - len(curve)))]
        values = [{k: v["value"] for k, v in suggest(t, params).items()} for t in batch]
        spent += time.perf_counter() - t0
        for trial, v in zip(batch, values, strict=True):
            metric = stand_in_metric(v, rng)
            study.tell(trial, metric)
            best = max(best, metric)
            curve.append(best)
    return curve, spent / budget


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="studies per sampler (default: %(default)s)")
    parser.add_argument("--budget", type=int, default=30, help="runs per study (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()
    if args.json:  # replaces only a table of this tool's (every row with s_per_run)
        ours = json_object_where(lambda d: all("s_per_run" in row for row in d.values()))
        try:
            refuse_foreign(Path(args.json), ours, "a compare_samplers.py table", "--json")
        except UserError as e:
            parser.exit(2, f"error: {e}\n")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    names = list(samplers(0))
    results = {name: {"regret_12": [], f"regret_{args.budget}": [], "s_per_run": []} for name in names}
    for seed in range(args.seeds):
        for name, sampler in samplers(seed).items():
            curve, s = run(sampler, seed, args.budget)
            results[name]["regret_12"].append(BEST - curve[min(11, len(curve) - 1)])
            results[name][f"regret_{args.budget}"].append(BEST - curve[-1])
            results[name]["s_per_run"].append(s)
    table = {name: {k: float(np.mean(v)) for k, v in r.items()} for name, r in results.items()}
    print(f"mean over {args.seeds} seeds, 2 runners per study (regret: {BEST} minus the best val_acc found):")
    print(f"{'sampler':42s} {'regret@12':>10s} {'regret@' + str(args.budget):>10s} {'s/run':>8s}")
    for name, row in table.items():
        print(f"{name:42s} {row['regret_12']:10.4f} {row[f'regret_{args.budget}']:10.4f} {row['s_per_run']:8.3f}")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
