"""How sure the model is: ECE, NLL and Brier as defined, a temperature fitted on the validation split,
stored in the checkpoint, and used wherever the model gives probabilities."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, clean_env, make_dataset, run_cli, train_args
from inat_classifier.calibration import calibration_metrics, expected_calibration_error, fit_temperature
from inat_classifier.inference import heldout_samples, predict
from inat_classifier.presets import Preprocess
from models import restore_model


def test_ece_on_hand_made_probabilities_equals_the_formula():
    probs = torch.tensor(
        [
            [0.95, 0.05],  # right, bin 15 (14/15, 1]
            [0.05, 0.95],  # wrong, same bin
            [0.55, 0.45],  # right, bin 9 (8/15, 9/15]
            [0.65, 0.35],  # wrong, bin 10 (9/15, 10/15]
        ],
        dtype=torch.float64,
    )
    targets = torch.tensor([0, 0, 0, 1])
    # sum_b n_b/N |acc_b - conf_b|: 2/4 |0.5 - 0.95| + 1/4 |1 - 0.55| + 1/4 |0 - 0.65|
    expected = 0.5 * 0.45 + 0.25 * 0.45 + 0.25 * 0.65
    assert expected_calibration_error(probs, targets) == pytest.approx(expected, abs=1e-12)
    # a confidence on a bin edge (exactly 2/3 = 10/15) belongs to the bin below: (9/15, 10/15]
    edge = torch.tensor([[2 / 3, 1 / 3]], dtype=torch.float64)
    bins = calibration_metrics(edge.log(), torch.tensor([0]))["reliability"]
    assert [b["count"] for b in bins].index(1) == 9


def test_nll_and_brier_follow_their_definitions():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    p = logits.softmax(1)
    m = calibration_metrics(logits, targets)
    assert m["nll"] == pytest.approx(-(p[0, 0].log() + p[1, 2].log()).item() / 2)
    one_hot = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]], dtype=torch.float64)
    assert m["brier"] == pytest.approx(((p - one_hot) ** 2).sum(1).mean().item())
    assert m["ece_bins"] == 15


def test_the_fitted_temperature_minimises_nll():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 5, generator=gen, dtype=torch.float64) * 4
    targets = torch.multinomial((logits / 4).softmax(1), 1, generator=gen)[:, 0]  # truly calibrated at T = 4
    t = fit_temperature(logits, targets)
    nll = lambda temp: torch.nn.functional.cross_entropy(logits / temp, targets).item()  # noqa: E731
    assert nll(t) <= min(nll(t * 0.97), nll(t * 1.03))
    assert 2.5 < t < 6


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A weak Part A run (2 epochs on 12 photos a class) whose last layer is scaled up 25 times:
    the same predictions, deliberately over-confident."""
    import train_parta

    base = tmp_path_factory.mktemp("calibration")
    data = make_dataset(base / "data", n_train=12, n_val=6)
    args = train_parta.get_args_parser().parse_args(train_args(data, base / "runs", "r", 2, "--seed", "0"))
    train_parta.main(args)
    ckpt_path = base / "runs" / "r" / "best.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    last = [k for k, v in ckpt["model_state"].items() if v.ndim == 2][-1].rsplit(".", 1)[0]
    for suffix in ("weight", "bias"):
        ckpt["model_state"][f"{last}.{suffix}"] *= 25
    torch.save(ckpt, ckpt_path)
    return base / "runs" / "r"


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    copy = tmp_path / "r"
    shutil.copytree(run, copy)
    return copy


def raw_outputs(ckpt_path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    model, ckpt = restore_model(ckpt_path, torch.device("cpu"))
    samples, _ = heldout_samples(ckpt, None, split)
    p = predict(model, samples, Preprocess.from_dict(ckpt["preprocess"]), torch.device("cpu"))
    return p.outputs, p.targets, [samples[i][0] for i in p.index.tolist()]


def test_calibrate_lowers_test_nll_of_an_over_confident_model_and_stores_the_temperature(run_copy):
    ckpt_path = run_copy / "best.pt"
    run_cli("evaluate.py", "--ckpt", ckpt_path, "--workers", "0", check=True)
    before = json.loads((run_copy / "eval.json").read_text())
    assert before["temperature"] == 1.0 and before["ece_bins"] == 15
    assert 0 < before["accuracy"] < 1, "the run must be right on some photos and wrong on others"

    proc = run_cli("evaluate.py", "--ckpt", ckpt_path, "--calibrate", "--workers", "0", check=True)
    after = json.loads((run_copy / "eval.json").read_text())
    stored = torch.load(ckpt_path, weights_only=True)["temperature"]
    assert stored > 1 and after["temperature"] == pytest.approx(stored)
    assert after["nll"] < before["nll"]  # (ECE need not fall: it was fitted on NLL, over a few photos)
    assert after["accuracy"] == before["accuracy"]  # a temperature never changes the predicted class
    assert f"before, temperature 1.0000: ECE {before['ece']:.4f}  NLL {before['nll']:.4f}" in proc.stdout
    # fitted on the validation split alone: the same fit in process on the val outputs gives the same T
    logits, targets, _ = raw_outputs(ckpt_path, "val")
    assert fit_temperature(logits, targets) == pytest.approx(stored, rel=1e-6)
    # and eval.json's figures are those of the tempered test outputs
    logits, targets, _ = raw_outputs(ckpt_path, "test")
    assert after["nll"] == pytest.approx(calibration_metrics(logits / stored, targets)["nll"], rel=1e-6)


def test_predict_and_the_figures_use_the_stored_temperature(run_copy, tmp_path):
    ckpt_path = run_copy / "best.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    torch.save({**ckpt, "temperature": 7.5}, ckpt_path)
    logits, targets, paths = raw_outputs(ckpt_path, "test")
    out_csv = tmp_path / "predictions.csv"
    run_cli("evaluate.py", "--ckpt", ckpt_path, "--predict", *paths[:4], "--csv", out_csv, "--workers", "0", check=True)
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    expected = (logits[:4] / 7.5).softmax(1).max(1).values
    assert [float(r["prob_1"]) for r in rows] == pytest.approx(expected.tolist(), abs=2e-6)
    proc = run_cli("visualize.py", "calibration", "--ckpt", ckpt_path, "--workers", "0", check=True)
    assert f"NLL {calibration_metrics(logits / 7.5, targets)['nll']:.4f}" in proc.stdout
    assert (run_copy / "calibration.png").stat().st_size > 10_000


def test_a_checkpoint_without_a_temperature_gives_the_plain_softmax(run_copy, tmp_path):
    ckpt_path = run_copy / "best.pt"
    logits, _, paths = raw_outputs(ckpt_path, "test")
    out_csv = tmp_path / "predictions.csv"
    run_cli("evaluate.py", "--ckpt", ckpt_path, "--predict", *paths[:3], "--csv", out_csv, "--workers", "0", check=True)
    with open(out_csv, newline="") as f:
        got = [float(r["prob_1"]) for r in csv.DictReader(f)]
    assert got == pytest.approx(logits[:3].softmax(1).max(1).values.tolist(), abs=2e-6)


def test_calibrating_without_a_validation_split_is_one_line(run_copy):
    ckpt_path = run_copy / "best.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt["split"]
    torch.save(ckpt, ckpt_path)
    before = ckpt_path.read_bytes()
    proc = run_cli("evaluate.py", "--ckpt", ckpt_path, "--calibrate", "--workers", "0")
    assert_one_line_error(proc, "--calibrate", "validation split")
    assert ckpt_path.read_bytes() == before


@pytest.mark.parametrize("value", ["hot", -1.0, math.inf])
def test_a_malformed_temperature_is_one_line(run_copy, value):
    ckpt_path = run_copy / "best.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    torch.save({**ckpt, "temperature": value}, ckpt_path)
    assert_one_line_error(run_cli("evaluate.py", "--ckpt", ckpt_path, "--workers", "0"), "temperature")


def test_evaluate_logs_calibration_to_the_runs_wandb_project(run_copy, tmp_path):
    ckpt_path = run_copy / "best.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["config"] = {**ckpt["config"], "wandb": "offline", "wandb_project": "calibration-test"}
    torch.save(ckpt, ckpt_path)
    out = tmp_path / "eval"
    env = clean_env(HOME=tmp_path, NETRC=tmp_path / "no-netrc", WANDB_DIR=tmp_path)
    run_cli("evaluate.py", "--ckpt", ckpt_path, "--out", out, "--workers", "0", "--wandb", env=env, check=True)
    report = json.loads((out / "eval.json").read_text())
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, sorted(p.name for p in (out / "wandb").rglob("*"))
    summary = offline_summary(runs[0].read_bytes())
    assert summary["test_ece"] == pytest.approx(report["ece"]) and summary["test_nll"] == pytest.approx(report["nll"])
    assert summary["test_accuracy"] == pytest.approx(report["accuracy"])


def offline_summary(record_log: bytes) -> dict:
    """Summary items of an offline W&B run file: each is a protobuf SummaryItem, the key (field 1) then
    value_json (field 16: tag bytes 0x82 0x01, a length byte, the JSON text)."""
    found = re.finditer(rb"\n.(test_[a-z_0-9]+)\x82\x01(.)", record_log, re.S)
    return {m[1].decode(): json.loads(record_log[m.end() : m.end() + m[2][0]]) for m in found}


def test_calibrate_into_an_output_it_may_not_write_changes_no_checkpoint(run_copy, tmp_path):
    ckpt_path = run_copy / "best.pt"
    before = ckpt_path.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text('{"mine": true}\n')  # not an evaluation's: refused before any work
    proc = run_cli("evaluate.py", "--ckpt", ckpt_path, "--calibrate", "--out", out, "--workers", "0")
    assert_one_line_error(proc, "eval.json")
    assert ckpt_path.read_bytes() == before
