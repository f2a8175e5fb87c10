"""sweep.yaml, sweep_engine.py and sweep_offline.py: every swept value reaches train_parta.py as intended, and the
offline runner trains, ranks, fails gracefully, early-stops and resumes. No network, ~90 s on 2 cores."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sweep_engine  # noqa: E402
import sweep_offline  # noqa: E402
import train_parta  # noqa: E402
from cli import UserError  # noqa: E402  (the one every module raises, sweep_offline too)
from runs import METRIC_FIELDS, read_metrics_csv  # noqa: E402

sweeps = sweep_engine.import_sweeps()
from sweeps.params import HyperParameter  # noqa: E402
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args  # noqa: E402

SWEEP_YAML = REPO / "sweep.yaml"
# The type each swept flag must arrive with in train_parta's args.
EXPECTED_TYPES = {"filters": int, "filter_org": float, "conv_layers": int, "activation": str, "dropout": float,
                  "batch_norm": bool, "batch_size": int, "lr": float, "augment": bool, "dense_neurons": int,
                  "epochs": int, "image_size": int}


def sweep_config() -> dict:
    return yaml.safe_load(SWEEP_YAML.read_text())


def agent_args(values: dict) -> list[str]:
    """The ${args} `wandb agent` puts on the command line for a run with these values."""
    return create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]


def parse(argv: list[str]):
    return train_parta.get_args_parser().parse_args(argv)


def param_cases() -> list[tuple[str, object]]:
    """Every listed value and fixed value of sweep.yaml, plus samples of every distribution."""
    cases = []
    rng_state = np.random.get_state()
    np.random.seed(0)
    try:
        for name, spec in sweep_config()["parameters"].items():
            if "values" in spec:
                cases += [(name, v) for v in spec["values"]]
            elif "value" in spec:
                cases.append((name, spec["value"]))
            else:
                param = HyperParameter(name, spec)
                cases += [(name, sweep_engine.plain(param.sample())) for _ in range(4)]
                cases += [(name, spec["min"]), (name, spec["max"])]
    finally:
        np.random.set_state(rng_state)
    return cases


# ----------------------------------------------------------------------------- sweep.yaml
def test_sweep_yaml_is_a_valid_wandb_sweep():
    cfg = sweep_config()
    assert sweeps.schema_violations_from_proposed_config(cfg) == []
    assert cfg["program"] == "train_parta.py" and (REPO / cfg["program"]).is_file()
    assert cfg["method"] == "bayes"
    assert cfg["metric"] == {"name": "val_acc", "goal": "maximize"}
    assert cfg["metric"]["name"] in METRIC_FIELDS
    assert cfg["command"] == ["${env}", "${interpreter}", "${program}", "${args}"]
    assert cfg["early_terminate"]["type"] == "hyperband" and cfg["early_terminate"]["min_iter"] >= 1
    params = cfg["parameters"]
    assert params["filters"]["values"] == [32, 64, 128]
    assert params["filter_org"]["values"] == [0.5, 1, 2]
    assert params["conv_layers"]["values"] == [3, 4, 5]
    assert params["activation"]["values"] == ["relu", "gelu", "silu", "mish"]
    assert params["dropout"]["values"] == [0.2, 0.3]
    assert params["batch_norm"]["values"] == [True, False]
    assert params["batch_size"]["values"] == [32, 64]
    assert params["lr"] == {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}
    assert params["augment"]["values"] == [True, False]
    assert params["dense_neurons"]["values"] == [128, 256, 512]
    assert set(params) == set(EXPECTED_TYPES)
    assert "value" in params["epochs"] and "value" in params["image_size"]


def test_every_parameter_is_a_flag_of_train_parta():
    dests = {a.dest for a in train_parta.get_args_parser()._actions}
    for name in sweep_config()["parameters"]:
        assert name in dests, f"sweep parameter {name} is not a flag of train_parta.py"


@pytest.mark.parametrize("name,value", param_cases(), ids=lambda v: str(v))
def test_agent_argument_parses_to_the_intended_value(name, value):
    argv = agent_args({name: value})
    assert argv == [f"--{name}={value}"]
    got = getattr(parse(argv), name)
    want_type = EXPECTED_TYPES[name]
    assert type(got) is want_type, f"{argv} gave {got!r} ({type(got).__name__}), want {want_type.__name__}"
    assert got == (value if want_type is bool else want_type(value))


def test_booleans_and_float_factors_survive_the_agent_format():
    args = parse(agent_args({"batch_norm": False, "augment": False, "filter_org": 0.5}))
    assert args.batch_norm is False and args.augment is False
    assert args.filter_org == 0.5 and isinstance(args.filter_org, float)
    args = parse(["--batch_norm=True", "--augment=True", "--filter_org=2"])
    assert args.batch_norm is True and args.augment is True and args.filter_org == 2.0


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_engine_proposals_parse_as_a_whole(method):
    cfg = dict(sweep_config(), method=method)
    for i in range(3):
        proposal = sweep_engine.propose(cfg, [], seed=7, number=i)
        values = {k: v["value"] for k, v in proposal.items()}
        args = parse(agent_args(values))
        for k, v in values.items():
            assert getattr(args, k) == v and type(getattr(args, k)) is EXPECTED_TYPES[k]
        assert 1e-4 <= args.lr <= 1e-2


def test_runner_builds_the_agents_command():
    cfg = sweep_config()
    proposal = sweep_engine.propose(cfg, [], seed=1, number=1)
    cmd = sweep_engine.build_command(cfg, proposal, "python")
    values = {k: v["value"] for k, v in proposal.items()}
    assert cmd[:3] == ["/usr/bin/env", "python", "train_parta.py"]
    assert cmd[3:] == agent_args(values)
    alt = dict(cfg, command=["${env}", "${interpreter}", "${program}", "--seed", "1", "${args_no_hyphens}"])
    alt_cmd = sweep_engine.build_command(alt, proposal, "py")
    assert alt_cmd[1:5] == ["py", "train_parta.py", "--seed", "1"]
    assert alt_cmd[5:] == create_sweep_command_args({"args": proposal})["args_no_hyphens"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """ImageFolder of coloured 32 px JPEGs: 3 classes x 12 train images, 3 x 3 in val/."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    colours = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}
    for split, n in (("train", 12), ("val", 3)):
        for cls, rgb in colours.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-40, 40, (32, 32, 3))
                pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{cls}_{i:02d}.jpg", quality=90)
    return root


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tiny_sweep_config() -> dict:
    """sweep.yaml scaled to the fixture: 32 px, one epoch, few filters."""
    cfg = sweep_config()
    cfg["method"] = "random"
    cfg["parameters"].update(filters={"values": [4, 8]}, dense_neurons={"values": [16, 32]},
                             batch_size={"values": [8, 16]}, epochs={"value": 1}, image_size={"value": 32})
    return cfg


def read_leaderboard(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "leaderboard.csv", newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- training
def test_sampled_configuration_trains_one_epoch(tiny_data, tmp_path):
    proposal = sweep_engine.propose(sweep_config(), [], seed=3, number=1)
    argv = agent_args({k: v["value"] for k, v in proposal.items()})
    argv += ["--epochs", "1", "--image_size", "32", "--data_dir", str(tiny_data), "--workers", "0",
             "--out_dir", str(tmp_path / "runs"), "--run_name", "one", "--wandb", "disabled", "--device", "cpu"]
    state = train_parta.main(parse(argv))
    rows = read_metrics_csv(tmp_path / "runs" / "one" / "metrics.csv")
    assert len(rows) == 1 and 0.0 <= rows[0]["val_acc"] <= 1.0
    assert state.best_val_acc == pytest.approx(rows[0]["val_acc"])


def test_offline_random_sweep_ranks_and_resumes(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # runs inherit it: one torch thread is fastest on 2 shared cores
    cfg_path = write_yaml(tmp_path / "tiny_sweep.yaml", tiny_sweep_config())
    sweep_dir = tmp_path / "sweep"
    extra = ["--", "--data_dir", str(tiny_data), "--workers", "0", "--device", "cpu"]
    code = sweep_offline.main(sweep_offline.parse_args(
        ["--config", str(cfg_path), "--sweep_dir", str(sweep_dir), "--count", "3", "--seed", "0", "--quiet", *extra]))
    assert code == 0
    board = read_leaderboard(sweep_dir)
    assert [r["rank"] for r in board] == ["1", "2", "3"]
    assert all(r["state"] == "finished" for r in board), board
    accs = [float(r["val_acc"]) for r in board]
    assert accs == sorted(accs, reverse=True)
    out = capsys.readouterr().out
    assert "leaderboard of" in out and "run-001" in out

    state = json.loads((sweep_dir / "sweep.json").read_text())
    for rec in state["runs"]:
        values = {k: v["value"] for k, v in rec["config"].items()}
        n = len(values)
        assert rec["command"][3:3 + n] == agent_args(values)  # exactly what wandb agent passes
        assert rec["command"][3 + n:] == ["--out_dir", str(sweep_dir / "runs"), "--run_name", rec["name"],
                                          "--wandb", "disabled", *extra[1:]]
        best = max(r["val_acc"] for r in read_metrics_csv(Path(rec["run_dir"]) / "metrics.csv"))
        assert rec["metric"] == pytest.approx(best)
        assert next(float(r["val_acc"]) for r in board if r["run"] == rec["name"]) == pytest.approx(best)

    # Continue the same sweep: one more run, numbered after the others, earlier runs kept.
    code = sweep_offline.main(sweep_offline.parse_args(  # no -- flags: the sweep's last ones are reused
        ["--sweep_dir", str(sweep_dir), "--count", "1", "--seed", "0", "--quiet"]))
    assert code == 0
    state2 = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["name"] for r in state2["runs"]] == ["run-001", "run-002", "run-003", "run-004"]
    assert state2["runs"][:3] == state["runs"]
    assert len(read_leaderboard(sweep_dir)) == 4
    assert (sweep_dir / "runs" / "run-004" / "metrics.csv").is_file()
    assert state2["runs"][3]["command"][-len(extra) + 1:] == extra[1:]


# ----------------------------------------------------------------------------- runner logic (fake program)
FAKE_TRAIN = r'''
import argparse, csv, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--q", type=float, required=True)
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--out_dir"); p.add_argument("--run_name"); p.add_argument("--wandb")
a = p.parse_args()
if a.q < 0:
    sys.exit("error: q must be >= 0")
run = os.path.join(a.out_dir, a.run_name)
os.makedirs(run)
rows = []
for e in range(1, a.epochs + 1):
    time.sleep(a.sleep)
    rows.append({"epoch": e, "train_loss": 1, "train_acc": a.q, "val_loss": 1, "val_acc": a.q * e / a.epochs,
                 "lr": 0.1, "epoch_time": a.sleep})
    with open(run + "/.m", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader(); w.writerows(rows)
    os.replace(run + "/.m", run + "/metrics.csv")
print("run folder: " + run)
'''


def fake_sweep(tmp_path: Path, method: str, q_values: list, extra_params: dict | None = None, **top) -> Path:
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    params = {"q": {"values": q_values}, **(extra_params or {})}
    cfg = {"program": "fake_train.py", "method": method, "metric": {"name": "val_acc", "goal": "maximize"},
           "parameters": params, **top}
    return write_yaml(tmp_path / "fake.yaml", cfg)


def test_failed_run_is_recorded_and_grid_completes(tmp_path, capsys):
    cfg = fake_sweep(tmp_path, "grid", [0.5, -1, 0.9])
    sweep_dir = tmp_path / "s"
    code = sweep_offline.main(sweep_offline.parse_args(
        ["--config", str(cfg), "--sweep_dir", str(sweep_dir), "--count", "5", "--quiet"]))
    assert code == 0
    board = read_leaderboard(sweep_dir)
    assert [(r["run"], r["state"]) for r in board] == [("run-003", "finished"), ("run-001", "finished"),
                                                       ("run-002", "failed")]
    assert "q must be >= 0" in board[2]["note"]
    assert "grid search complete" in capsys.readouterr().out
    # the sweep's config is fixed once started
    other = write_yaml(tmp_path / "other.yaml", dict(yaml.safe_load(cfg.read_text()), method="random"))
    with pytest.raises(UserError, match="differs"):
        sweep_offline.main(sweep_offline.parse_args(["--config", str(other), "--sweep_dir", str(sweep_dir)]))


def test_hyperband_stops_a_run_below_the_band_threshold(tmp_path):
    cfg = fake_sweep(tmp_path, "grid", [0.9, 0.8, 0.1],
                     {"epochs": {"value": 8}, "sleep": {"value": 0.15}},
                     early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2})
    sweep_dir = tmp_path / "s"
    code = sweep_offline.main(sweep_offline.parse_args(
        ["--config", str(cfg), "--sweep_dir", str(sweep_dir), "--count", "3", "--quiet", "--poll_s", "0.05"]))
    assert code == 0
    runs = {r["name"]: r for r in json.loads((sweep_dir / "sweep.json").read_text())["runs"]}
    assert runs["run-001"]["state"] == runs["run-002"]["state"] == "finished"
    assert runs["run-003"]["state"] == "stopped" and 2 <= runs["run-003"]["epochs"] < 8


def test_bayes_gets_the_history_of_earlier_runs(tmp_path):
    cfg = yaml.safe_load(fake_sweep(tmp_path, "bayes", [0.1, 0.5, 0.9], {"r": {"min": 0.0, "max": 1.0}}).read_text())
    records = [
        {"name": "run-001", "number": 1, "state": "finished", "config": {"q": {"value": 0.5}, "r": {"value": 0.2}},
         "history": [{"epoch": 1, "val_acc": 0.3}, {"epoch": 2, "val_acc": 0.4}, {"epoch": 3, "val_acc": 0.35}]},
        {"name": "run-002", "number": 2, "state": "failed", "config": {"q": {"value": 0.9}, "r": {"value": 0.7}},
         "history": []},
        {"name": "run-003", "number": 3, "state": "interrupted", "config": {"q": {"value": 0.1}, "r": {"value": 0.1}},
         "history": [{"epoch": 1, "val_acc": 0.05}]},
        {"name": "run-004", "number": 4, "state": "stopped", "config": {"q": {"value": 0.1}, "r": {"value": 0.9}},
         "history": [{"epoch": 1, "val_acc": 0.1}, {"epoch": 2, "val_acc": 0.15}]},
    ]
    runs = sweep_engine.engine_runs(records)
    assert [(r.name, r.state) for r in runs] == [("run-001", "finished"), ("run-002", "failed"),
                                                 ("run-004", "finished")]
    assert runs[0].metric_extremum("val_acc", "maximum") == pytest.approx(0.4)  # best epoch, not the last
    proposal = sweep_engine.propose(cfg, records, seed=0, number=5)
    assert proposal["q"]["value"] in (0.1, 0.5, 0.9) and 0.0 <= proposal["r"]["value"] <= 1.0


BAYES_CFG = {"program": "x.py", "method": "bayes", "metric": {"name": "val_acc", "goal": "maximize"},
             "parameters": {"r": {"min": 0.0, "max": 1.0}}}


def peaked_records(peak: float) -> list[dict]:
    """Ten finished runs over r in [0, 1] whose best epoch (the 2nd) scores a bump at r = peak; the last
    epoch scores the opposite (low at the peak), so only the best-over-epochs points at the peak."""
    import math

    out = []
    for i, r in enumerate([0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]):
        acc = math.exp(-((r - peak) / 0.12) ** 2)
        out.append({"name": f"run-{i + 1:03d}", "number": i + 1, "state": "finished", "config": {"r": {"value": r}},
                    "history": [{"epoch": 1, "val_acc": 0.1 * acc}, {"epoch": 2, "val_acc": 0.2 + 0.8 * acc},
                                {"epoch": 3, "val_acc": 0.15 * (1 - acc)}]})
    return out


def test_bayes_proposals_move_to_the_best_region_of_the_history():
    """Same seeds, histories peaked at r=0.7 vs r=0.2: the proposals follow the peak (within 0.05)."""
    for seed in (0, 1):
        near_07 = sweep_engine.propose(BAYES_CFG, peaked_records(0.7), seed=seed, number=11)["r"]["value"]
        near_02 = sweep_engine.propose(BAYES_CFG, peaked_records(0.2), seed=seed, number=11)["r"]["value"]
        assert abs(near_07 - 0.7) < 0.05 and abs(near_02 - 0.2) < 0.05, (seed, near_07, near_02)


def hb_record(name: str, state: str, accs: list[float]) -> dict:
    return {"name": name, "state": state, "config": {"q": {"value": 0.5}},
            "history": [{"epoch": e, "val_acc": a} for e, a in enumerate(accs, 1)]}


def test_hyperband_should_stop_below_the_band_threshold_only():
    """min_iter 1, eta 2: bands at history index 1, 2, 4...; the threshold is the median (index int(n/2) of the
    sorted negated values) of val_acc at the band. Below it: stopped; above it, or before the first band: not."""
    cfg = {"program": "x.py", "method": "grid", "metric": {"name": "val_acc", "goal": "maximize"},
           "parameters": {"q": {"values": [0.5]}}, "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2}}
    done = [hb_record("a", "finished", [0.5, 0.6, 0.7]), hb_record("b", "finished", [0.6, 0.7, 0.8])]
    # band 1 values (epoch 2): 0.6, 0.7 and the run's own; threshold = the middle one
    assert sweep_engine.hyperband_should_stop(cfg, done, hb_record("slow", "running", [0.1, 0.2]))
    assert not sweep_engine.hyperband_should_stop(cfg, done, hb_record("fast", "running", [0.7, 0.9]))
    assert not sweep_engine.hyperband_should_stop(cfg, done, hb_record("young", "running", [0.0]))  # no band yet
    # its best epoch counts, not its last: 0.65 at epoch 1 beats the 0.6 threshold
    assert not sweep_engine.hyperband_should_stop(cfg, done, hb_record("dip", "running", [0.65, 0.2]))
    # interrupted runs never set a threshold: with only them, nothing is stopped
    gone = [dict(r, state="interrupted") for r in done]
    assert not sweep_engine.hyperband_should_stop(cfg, gone, hb_record("slow", "running", [0.1, 0.2]))


def test_runner_owns_its_bookkeeping_flags(tmp_path):
    cfg = fake_sweep(tmp_path, "random", [0.5])
    for flag in (["--out_dir", "x"], ["--run-name=x"], ["--wandb", "online"]):
        with pytest.raises(UserError, match="set by the sweep runner"):
            sweep_offline.main(sweep_offline.parse_args(["--config", str(cfg), "--sweep_dir", str(tmp_path / "s"),
                                                         "--", *flag]))


# ----------------------------------------------------------------------------- sweep_partb.yaml
SWEEP_PARTB_YAML = REPO / "sweep_partb.yaml"
PARTB_TYPES = {"freeze": str, "lr": float, "lr_mult": float, "unfreeze_at": int, "augment": bool, "model": str,
               "epochs": int}


def partb_cases() -> list[tuple[str, object]]:
    cases = []
    np.random.seed(0)
    for name, spec in yaml.safe_load(SWEEP_PARTB_YAML.read_text())["parameters"].items():
        if "values" in spec:
            cases += [(name, v) for v in spec["values"]]
        elif "value" in spec:
            cases.append((name, spec["value"]))
        else:
            cases += [(name, sweep_engine.plain(HyperParameter(name, spec).sample())) for _ in range(4)]
            cases += [(name, spec["min"]), (name, spec["max"])]
    return cases


def test_partb_sweep_is_a_valid_wandb_sweep_over_the_freezing_strategies():
    import train_partb
    from freezing import list_stages
    from models import build_backbone

    cfg = yaml.safe_load(SWEEP_PARTB_YAML.read_text())
    assert sweeps.schema_violations_from_proposed_config(cfg) == []
    assert cfg["program"] == "train_partb.py" and cfg["metric"] == {"name": "val_acc", "goal": "maximize"}
    assert set(cfg["parameters"]) == set(PARTB_TYPES)
    freezes = cfg["parameters"]["freeze"]["values"]
    assert {"auto", "all", "none"} <= set(freezes) and any(f.startswith("upto:") for f in freezes)
    # the upto: stages exist in the sweep's model, which is train_partb.py's default
    model = cfg["parameters"]["model"]["value"]
    assert model == train_partb.get_args_parser().get_default("model")
    stages = [name for name, _ in list_stages(build_backbone(model, "none", 10).model)]
    assert all(f[5:] in stages for f in freezes if f.startswith("upto:"))


@pytest.mark.parametrize("name,value", partb_cases(), ids=lambda v: str(v))
def test_partb_agent_argument_parses_to_the_intended_value(name, value):
    import train_partb

    argv = agent_args({name: value})
    assert argv == [f"--{name}={value}"]
    got = getattr(train_partb.get_args_parser().parse_args(argv), name)
    assert type(got) is PARTB_TYPES[name] and got == value


# ----------------------------------------------------------------------------- several runners
def start_runner(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(REPO / "sweep_offline.py"), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_runners_share_one_sweep_folder(tiny_data, tmp_path):
    cfg_path = write_yaml(tmp_path / "tiny_sweep.yaml", tiny_sweep_config())
    sweep_dir = tmp_path / "sweep"
    args = ["--config", cfg_path, "--sweep_dir", sweep_dir, "--count", "2", "--seed", "0", "--quiet", "--",
            "--data_dir", tiny_data, "--workers", "0", "--device", "cpu"]
    runners = [start_runner(*args, cwd=tmp_path) for _ in range(2)]
    outputs = [r.communicate(timeout=600)[0] for r in runners]
    assert [r.returncode for r in runners] == [0, 0], outputs
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert sorted(r["number"] for r in state["runs"]) == [1, 2, 3, 4]
    assert len({r["run_dir"] for r in state["runs"]}) == 4 and all(r["state"] == "finished" for r in state["runs"])
    assert len({r["runner"] for r in state["runs"]}) == 2  # each runner trained its own --count
    assert all((Path(r["run_dir"]) / "metrics.csv").is_file() for r in state["runs"])
    board = read_leaderboard(sweep_dir)
    assert sorted(r["run"] for r in board) == ["run-001", "run-002", "run-003", "run-004"]
    assert not list((sweep_dir / "runners").iterdir())  # both leases released


def running_records(sweep_dir: Path) -> list[dict]:
    try:
        return [r for r in json.loads((sweep_dir / "sweep.json").read_text())["runs"] if r["state"] == "running"]
    except (OSError, ValueError):
        return []


def test_a_runner_killed_mid_run_is_reported_and_never_blocks_the_others(tmp_path, capsys):
    import signal
    import time

    cfg = fake_sweep(tmp_path, "random", [0.2, 0.4, 0.6, 0.8], {"epochs": {"value": 60}, "sleep": {"value": 0.25}})
    sweep_dir = tmp_path / "s"
    slow = start_runner("--config", cfg, "--sweep_dir", sweep_dir, "--count", "1", "--quiet", cwd=tmp_path)
    deadline = time.time() + 60
    while not running_records(sweep_dir) and time.time() < deadline:
        time.sleep(0.1)
    victim = running_records(sweep_dir)[0]
    fast = start_runner("--sweep_dir", sweep_dir, "--count", "2", "--quiet", "--", "--sleep", "0.01",
                        cwd=tmp_path)
    while len(running_records(sweep_dir)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert len(running_records(sweep_dir)) == 2  # both train at the same moment
    slow.send_signal(signal.SIGKILL)
    slow.wait(timeout=30)
    out = fast.communicate(timeout=120)[0]
    assert fast.returncode == 0, out

    sweep_offline.main(sweep_offline.parse_args(["--sweep_dir", str(sweep_dir), "--show"]))
    shown = capsys.readouterr().out
    runs = {r["number"]: r for r in json.loads((sweep_dir / "sweep.json").read_text())["runs"]}
    assert len(runs) == 3
    killed = runs[victim["number"]]
    assert killed["state"] == "interrupted" and "runner died" in killed["note"]
    assert [r["state"] for n, r in sorted(runs.items()) if n != victim["number"]] == ["finished", "finished"]
    assert victim["name"] in shown and "interrupted" in shown and "runner died" in shown
    # the killed runner's training process got SIGTERM with it, instead of training on as an orphan
    csv_path = Path(killed["run_dir"]) / "metrics.csv"
    size = csv_path.stat().st_size if csv_path.exists() else 0
    time.sleep(1.0)
    assert (csv_path.stat().st_size if csv_path.exists() else 0) == size


# ----------------------------------------------------------------------------- interrupted, finished, rejected runs
from conftest import assert_one_line_error, clean_env, make_dataset, run_cli  # noqa: E402

# A trainer that behaves like train_parta.py where the runner can tell: last.pt on SIGTERM (exit 130), --resume
# from it, result.json once complete; --linger keeps it alive after that (say, a slow W&B sync). Any other
# flag is accepted, so that a parameter can have any name.
FAKE_RESUMABLE = r'''
import argparse, csv, json, os, signal, sys, time
p = argparse.ArgumentParser()
for flag in ("--q", "--sleep", "--linger"):
    p.add_argument(flag, type=float, default=0.0)
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--out_dir"); p.add_argument("--run_name"); p.add_argument("--wandb"); p.add_argument("--resume")
a, _ = p.parse_known_args()
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
run = a.resume or os.path.join(a.out_dir, a.run_name)
os.makedirs(run, exist_ok=True)
rows = json.load(open(run + "/last.pt"))["rows"] if a.resume else []
if a.resume:
    print("resuming after epoch %d" % len(rows))
for e in range(len(rows) + 1, a.epochs + 1):
    t = time.time()
    while time.time() - t < a.sleep and not stop:
        time.sleep(0.01)
    rows.append({"epoch": e, "train_loss": 1, "val_acc": a.q * e / a.epochs})
    with open(run + "/metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
    json.dump({"rows": rows}, open(run + "/last.pt", "w"))
    if stop:
        print("interrupted: progress is in last.pt"); sys.exit(130)
json.dump({"epochs": len(rows)}, open(run + "/result.json", "w"))
print("run folder: " + run)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
time.sleep(a.linger)
'''


def resumable_sweep(tmp_path: Path, q_values: list, extra_params: dict | None = None, metric: str = "val_acc") -> Path:
    (tmp_path / "fake_resumable.py").write_text(FAKE_RESUMABLE)
    cfg = {"program": "fake_resumable.py", "method": "grid", "metric": {"name": metric, "goal": "maximize"},
           "parameters": {"q": {"values": q_values}, **(extra_params or {})}}
    return write_yaml(tmp_path / "resumable.yaml", cfg)


def wait_for(predicate, timeout: float = 60.0, runner: subprocess.Popen | None = None) -> None:
    import time

    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        assert runner is None or runner.poll() is None, runner.communicate()[0]
        time.sleep(0.05)


def children_of(pid: int) -> list[int]:
    """Pids whose parent is pid (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def process_gone(pid: int) -> bool:
    """Exited (a zombie no init has reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def sweep_runs(sweep_dir: Path) -> dict:
    return {r["name"]: r for r in json.loads((sweep_dir / "sweep.json").read_text())["runs"]}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_a_runner_stops_its_real_trainer_which_saves_last_pt(tmp_path):
    import signal

    data = make_dataset(tmp_path / "data", ["a", "b"], n_train=6, n_val=2, size=32)
    cfg = tiny_sweep_config()
    cfg["parameters"].update(filters={"value": 4}, dense_neurons={"value": 16}, batch_size={"values": [4]},
                             epochs={"value": 300}, conv_layers={"value": 2})
    sweep_dir = tmp_path / "s"
    runner = start_runner("--config", write_yaml(tmp_path / "sweep.yaml", cfg), "--sweep_dir", sweep_dir, "--count",
                          "1", "--quiet", "--", "--data_dir", data, "--workers", "0", "--device", "cpu", "--cache",
                          "off", cwd=tmp_path)
    run_dir = sweep_dir / "runs" / "run-001"
    wait_for(lambda: (run_dir / "metrics.csv").is_file(), 120, runner)  # the trainer is in its epochs
    trainer = children_of(runner.pid)
    assert len(trainer) == 1
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=30)
    wait_for(lambda: process_gone(trainer[0]), 10)
    log = (sweep_dir / "logs" / "run-001.log").read_text()
    assert "interrupted: progress is in" in log and "Traceback" not in log, log  # stopped cleanly, saved last.pt
    assert (run_dir / "last.pt").is_file() and not (run_dir / "result.json").exists()


def test_finished_runs_are_never_retrained_and_interrupted_ones_resume(tmp_path):
    import signal

    cfg = resumable_sweep(tmp_path, [0.2, 0.4, 0.6])
    sweep_dir, runs = tmp_path / "s", tmp_path / "s" / "runs"
    common = ["--sweep_dir", sweep_dir, "--quiet", "--poll_s", "0.05"]
    # 1. kill -9 of the runner after its run completed (result.json), while the trainer still lingers
    a = start_runner("--config", cfg, *common, "--count", "1", "--", "--linger", "60", cwd=tmp_path)
    wait_for(lambda: (runs / "run-001" / "result.json").is_file(), runner=a)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    # 2. SIGTERM of the next runner (it reaps run-001) after its own run completed
    b = start_runner(*common, "--count", "1", cwd=tmp_path)
    wait_for(lambda: (runs / "run-002" / "result.json").is_file(), runner=b)
    b.send_signal(signal.SIGTERM)
    out_b = b.communicate(timeout=60)[0]
    assert b.returncode == 130 and "Traceback" not in out_b, out_b
    got = sweep_runs(sweep_dir)
    assert [got[n]["state"] for n in ("run-001", "run-002")] == ["finished", "finished"], got
    assert got["run-001"]["metric"] == pytest.approx(0.2) and got["run-002"]["metric"] == pytest.approx(0.4)
    # 3. SIGTERM mid-training: interrupted, with its last.pt
    c = start_runner(*common, "--count", "1", "--", "--epochs", "30", "--sleep", "0.1", cwd=tmp_path)
    wait_for(lambda: (runs / "run-003" / "metrics.csv").is_file(), runner=c)
    c.send_signal(signal.SIGTERM)
    out_c = c.communicate(timeout=60)[0]
    assert c.returncode == 130 and "Traceback" not in out_c, out_c
    assert sweep_runs(sweep_dir)["run-003"]["state"] == "interrupted"
    # 4. continuing resumes run-003 from its last.pt; nothing is trained again, and the grid is then complete
    d = start_runner(*common, "--count", "3", cwd=tmp_path)
    out_d = d.communicate(timeout=120)[0]
    assert d.returncode == 0, out_d
    got = sweep_runs(sweep_dir)
    assert sorted(got) == ["run-001", "run-002", "run-003"] and sorted(p.name for p in runs.iterdir()) == sorted(got)
    assert all(r["state"] == "finished" for r in got.values()), got
    assert got["run-003"]["resumes"] == 1 and "resuming after epoch" in (sweep_dir / "logs" / "run-003.log").read_text()
    assert [r["epoch"] for r in read_metrics_csv(runs / "run-003" / "metrics.csv")] == list(range(1, 31))
    assert got["run-003"]["metric"] == pytest.approx(0.6) and "grid search complete" in out_d


def test_a_rejected_run_stops_the_runner_with_the_trainers_error(tiny_data, tmp_path):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_sweep_config())
    proc = run_cli("sweep_offline.py", "--config", cfg, "--sweep_dir", tmp_path / "s", "--count", "3", "--quiet",
                   "--", "--data_dir", tiny_data, "--workers", "0", "--device", "cpu", "--lr", "-1",
                   env=clean_env(), timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, "run-001 was rejected", "--lr must be > 0")
    assert len(sweep_runs(tmp_path / "s")) == 1  # it stopped at once
    # an unknown flag: argparse's 'prog: error: unrecognized arguments'
    fake = fake_sweep(tmp_path, "grid", [0.5, 0.6])
    proc = run_cli("sweep_offline.py", "--config", fake, "--sweep_dir", tmp_path / "f", "--count", "2", "--",
                   "--bogus", "1", env=clean_env(), timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, "run-001 was rejected", "unrecognized arguments: --bogus")
    # other failures go on, but a runner all of whose runs failed does not exit 0
    fake = fake_sweep(tmp_path, "grid", [-1, -2])
    proc = run_cli("sweep_offline.py", "--config", fake, "--sweep_dir", tmp_path / "g", "--count", "2",
                   env=clean_env(), timeout=120)
    assert proc.returncode == 1 and "every run this runner trained failed (2)" in proc.stderr, proc.stderr
    assert [r["state"] for r in sweep_runs(tmp_path / "g").values()] == ["failed", "failed"]


def test_a_metric_no_run_logs_is_named(tmp_path, capsys):
    own = dict(tiny_sweep_config(), metric={"name": "val_accuracy", "goal": "maximize"})
    proc = run_cli("sweep_offline.py", "--config", write_yaml(tmp_path / "own.yaml", own), "--sweep_dir",
                   tmp_path / "own", "--dry_run", env=clean_env(), timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, "'val_accuracy' is not logged by train_parta.py", "val_acc", "fix metric.name")
    cfg = resumable_sweep(tmp_path, [0.5], metric="val_accuracy")
    code = sweep_offline.main(sweep_offline.parse_args(["--config", str(cfg), "--sweep_dir", str(tmp_path / "s"),
                                                        "--count", "1", "--quiet"]))
    assert code == 0
    out = capsys.readouterr().out
    assert "[sweep] warning: no run logs 'val_accuracy': run-001's metrics.csv has epoch, train_loss, val_acc; " \
           "fix metric.name in the yaml" in out, out


def test_leaderboard_columns_are_unique_when_parameters_share_their_names(tmp_path, capsys):
    clash = {"epochs": {"value": 2}, "state": {"values": ["x"]}, "val_acc": {"values": [7]}, "note": {"value": "n"},
             "param_epochs": {"value": 5}}
    cfg = resumable_sweep(tmp_path, [0.5], clash)
    code = sweep_offline.main(sweep_offline.parse_args(["--config", str(cfg), "--sweep_dir", str(tmp_path / "s"),
                                                        "--count", "1", "--quiet"]))
    assert code == 0
    with open(tmp_path / "s" / "leaderboard.csv", newline="") as f:
        header = next(csv.reader(f))
    assert len(header) == len(set(header)), header
    row = read_leaderboard(tmp_path / "s")[0]
    assert row["state"] == "finished" and float(row["val_acc"]) == pytest.approx(0.5) and row["epochs"] == "2"
    assert (row["param_state"], row["param_val_acc"], row["param_epochs"], row["param_note"]) == ("x", "7", "2", "n")
    assert row["param_param_epochs"] == "5" and row["q"] == "0.5"
    table_header = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("rank"))
    assert len(table_header.split()) == len(set(table_header.split())), table_header
    assert {"param_state", "param_val_acc", "q"} <= set(table_header.split())


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_runner_stopped_at_start_up_says_so_in_one_line(tmp_path, sig):
    import signal
    import time

    cfg = fake_sweep(tmp_path, "grid", [0.5])
    runner = start_runner("--config", cfg, "--sweep_dir", tmp_path / "s", "--count", "1", cwd=tmp_path)
    time.sleep(0.3)  # importing torch and the engine
    runner.send_signal(getattr(signal, sig))
    out = runner.communicate(timeout=60)[0]
    assert runner.returncode == 130, out
    assert "Traceback" not in out and out.strip().splitlines()[-1].startswith("[sweep] interrupted"), out
