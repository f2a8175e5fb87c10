"""evaluate.py: metrics from a checkpoint alone, the CLI's files, and top-3 predictions."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import evaluate
from conftest import run_cli
from inat_classifier.checkpoint import load_checkpoint
from inat_classifier.cli import UserError
from inat_classifier.images import load_image
from inat_classifier.inference import FlipTTA
from inat_classifier.metrics import classification_metrics, confusion_matrix
from models import restore_model

EVAL_KEYS = {"accuracy", "macro_f1", "per_class", "confusion_matrix"}


def copy_checkpoint(trained_run, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(trained_run.run_dir / "best.pt", dest / "best.pt"))


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) > 100
        img.verify()


# ----------------------------------------------------------------------------- metrics
def test_confusion_matrix_rows_true_columns_predicted():
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 1, 0, 1, 1, 0])
    cm = confusion_matrix(targets, preds, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_classification_metrics_by_hand():
    cm = torch.tensor([[2, 1], [0, 3]])
    m = classification_metrics(cm, ["a", "b"])
    assert m["accuracy"] == pytest.approx(5 / 6)
    a, b = m["per_class"]["a"], m["per_class"]["b"]
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(1.0), pytest.approx(2 / 3), 3)
    assert (b["precision"], b["recall"], b["support"]) == (pytest.approx(3 / 4), pytest.approx(1.0), 3)
    f1_a, f1_b = 2 * 1 * (2 / 3) / (1 + 2 / 3), 2 * 0.75 * 1 / 1.75
    assert a["f1"] == pytest.approx(f1_a) and b["f1"] == pytest.approx(f1_b)
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)
    assert m["confusion_matrix"] == [[2, 1], [0, 3]]
    # a class never predicted and never present: zeros, not NaN
    m3 = classification_metrics(torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert m3["per_class"]["c"] == {"recall": 0.0, "precision": 0.0, "f1": 0.0, "support": 0}


def test_flip_tta_averages_image_and_mirror():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()
    x = torch.randn(2, 3, 4, 4)
    expected = (model(x).softmax(1) + model(torch.flip(x, dims=[3])).softmax(1)) / 2
    assert torch.allclose(FlipTTA(model)(x).exp(), expected, atol=1e-6)


# ----------------------------------------------------------------------------- in process
def torchvision_inputs(ckpt: dict, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The readable samples through torchvision's own transforms, with the numbers the checkpoint stores:
    short side to the stored side, its centre square, the eval centre of that, resized (antialiased)."""
    from torchvision import transforms as T

    pre = ckpt["preprocess"]
    stored = pre["stored_side"] or pre["resize_size"]
    eval_side = max(pre["image_size"], round(pre["image_size"] * stored / pre["resize_size"]))
    tf = T.Compose(
        [
            T.Resize(stored),
            T.CenterCrop(stored),
            T.CenterCrop(eval_side),
            T.ToTensor(),
            T.Resize(pre["image_size"], antialias=True),
            T.Normalize(pre["mean"], pre["std"]),
        ]
    )
    xs, ys = [], []
    for path, label in samples:
        try:
            img = load_image(path)  # decoding to RGB (alpha over white, 16-bit scaled) is not what is pinned
        except OSError:  # the truncated JPEG
            continue
        xs.append(tf(img))
        ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def test_split_val_reproduces_the_runs_best_val_acc(trained_run):
    """The run's validation split: accuracy as in training, loss as torchvision's pipeline gives (4 decimals)."""
    args = evaluate.get_args_parser().parse_args(
        [
            "--ckpt",
            str(trained_run.run_dir / "best.pt"),
            "--split",
            "val",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--out",
            str(trained_run.run_dir / "eval_val"),
        ]
    )
    metrics = evaluate.main(args)
    assert metrics["accuracy"] == pytest.approx(trained_run.state.best_val_acc, abs=1e-9)
    val = json.loads((trained_run.run_dir / "split.json").read_text())["val"]
    assert metrics["n"] == len([p for p in val if "odd_truncated" not in p])  # unreadable ones skipped
    model, ckpt = restore_model(trained_run.run_dir / "best.pt", torch.device("cpu"))
    from inat_classifier import inference

    samples, _ = inference.heldout_samples(ckpt, None, "val")
    x, y = torchvision_inputs(ckpt, samples)
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model.eval()(x), y).item()
    assert metrics["loss"] == pytest.approx(loss, abs=1e-4)


def test_tta_loss_is_the_mean_of_image_and_mirror_probabilities(trained_run, tmp_path):
    """--tta's loss is -log of the averaged softmax of image and mirror (computed here); it differs from the
    plain loss, which is the logits' cross entropy."""
    ckpt_path = trained_run.run_dir / "best.pt"
    common = ["--ckpt", str(ckpt_path), "--workers", "0", "--device", "cpu"]
    tta = evaluate.main(evaluate.get_args_parser().parse_args([*common, "--tta", "--out", str(tmp_path / "t")]))
    plain = evaluate.main(evaluate.get_args_parser().parse_args([*common, "--out", str(tmp_path / "p")]))
    assert tta["tta"] is True and plain["tta"] is False
    assert tta["n"] == plain["n"] == sum(trained_run.data.val_counts.values())
    model, ckpt = restore_model(ckpt_path, torch.device("cpu"))
    x, y = torchvision_inputs(
        ckpt,
        [
            (str(p), i)
            for i, c in enumerate(ckpt["class_names"])
            for p in sorted((trained_run.data.root / "val" / c).iterdir())
        ],
    )
    with torch.no_grad():
        logits, mirrored = model.eval()(x), model(torch.flip(x, dims=[3]))
    expected_tta = nn.functional.nll_loss(torch.log((logits.softmax(1) + mirrored.softmax(1)) / 2), y).item()
    expected_plain = nn.functional.cross_entropy(logits, y).item()
    assert abs(expected_tta - expected_plain) > 2e-5  # the data can tell them apart
    assert tta["loss"] == pytest.approx(expected_tta, abs=2e-6)
    assert plain["loss"] == pytest.approx(expected_plain, abs=2e-6)


# ----------------------------------------------------------------------------- CLI
def test_evaluate_cli_writes_report_json_and_png_beside_checkpoint(trained_run, tmp_path):
    ckpt = copy_checkpoint(trained_run, tmp_path / "run")
    proc = run_cli("evaluate.py", "--ckpt", ckpt, "--workers", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout
    report = json.loads((ckpt.parent / "eval.json").read_text())
    assert EVAL_KEYS <= set(report)
    assert set(report["per_class"]) == set(trained_run.data.classes)
    assert all(report["per_class"][c]["support"] == trained_run.data.val_counts[c] for c in trained_run.data.classes)
    cm = report["confusion_matrix"]
    assert len(cm) == 4 and all(len(r) == 4 for r in cm)
    assert sum(map(sum, cm)) == sum(trained_run.data.val_counts.values())
    assert report["accuracy"] == pytest.approx(sum(cm[i][i] for i in range(4)) / sum(map(sum, cm)))
    assert report["accuracy"] >= 0.8  # the held-out colours are learnable
    assert f"test accuracy: {report['accuracy']:.4f}" in proc.stdout
    assert_png(ckpt.parent / "confusion_matrix.png")


def test_evaluate_cli_out_dir(trained_run, tmp_path):
    ckpt = copy_checkpoint(trained_run, tmp_path / "run")
    out = tmp_path / "reports" / "a"
    proc = run_cli("evaluate.py", "--ckpt", ckpt.parent, "--out", out, "--workers", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert EVAL_KEYS <= set(json.loads((out / "eval.json").read_text()))
    assert_png(out / "confusion_matrix.png")
    assert not (ckpt.parent / "eval.json").exists() and not (ckpt.parent / "confusion_matrix.png").exists()


def test_predict_prints_top3_and_writes_csv(trained_run, tmp_path):
    ckpt = copy_checkpoint(trained_run, tmp_path / "run")
    val = trained_run.data.root / "val"
    single = sorted((val / "yellow").iterdir())[0]
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(sorted((val / "red").iterdir())[:3]):
        shutil.copy(p, folder / f"red{i}{p.suffix}")
    shutil.copy(sorted((val / "green").iterdir())[0], folder / "sub" / "green.png")
    shutil.copy(trained_run.data.truncated, folder / "broken.jpg")
    (folder / "notes.txt").write_text("not an image")
    out_csv = tmp_path / "pred.csv"
    proc = run_cli("evaluate.py", "--ckpt", ckpt, "--predict", single, folder, "--csv", out_csv, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ": " in ln and not ln.startswith("wrote")]
    assert len(lines) == 5  # the single file, 3 red and 1 green: notes.txt ignored, broken.jpg skipped
    for ln in lines:
        entries = ln.rsplit(": ", 1)[1].split(", ")
        assert len(entries) == 3
        probs = [float(e.split()[-1]) for e in entries]
        assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    assert "broken.jpg" in proc.stderr and "skipping unreadable image" in proc.stderr
    with open(out_csv, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert len(rows) == 1 + 5
    by_name = {Path(r[0]).name: r for r in rows[1:]}
    assert by_name[single.name][1] == "yellow"
    assert [by_name[f"red{i}{p.suffix}"][1] for i, p in enumerate(sorted((val / "red").iterdir())[:3])] == ["red"] * 3
    assert by_name["green.png"][1] == "green"
    for r in rows[1:]:
        assert sum(float(r[i]) for i in (2, 4, 6)) <= 1.0 + 1e-5


# ----------------------------------------------------------------------------- bad checkpoints
def test_restore_model_refuses_files_that_are_not_our_checkpoints(trained_run, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(UserError, match="not a checkpoint written by this tool"):
        restore_model(foreign, torch.device("cpu"))

    import argparse

    unsafe = tmp_path / "unsafe.pt"  # arbitrary pickled objects are refused, never executed
    torch.save({"format": "inat-classifier/1", "obj": argparse.Namespace(a=1)}, unsafe)
    with pytest.raises(UserError, match="refused to load"):
        restore_model(unsafe, torch.device("cpu"))

    cut = tmp_path / "cut.pt"
    full = (trained_run.run_dir / "best.pt").read_bytes()
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(UserError) as e:
        restore_model(cut, torch.device("cpu"))
    assert str(cut) in str(e.value) and "\n" not in str(e.value)


def test_restore_model_with_other_class_count_is_a_user_error(trained_run, tmp_path):
    ck = torch.load(trained_run.run_dir / "best.pt", map_location="cpu", weights_only=True)
    ck["class_names"] = ck["class_names"][:3]
    bad = tmp_path / "best.pt"
    torch.save(ck, bad)
    assert load_checkpoint(bad)["class_names"] == trained_run.data.classes[:3]
    with pytest.raises(UserError, match="weights do not fit"):
        restore_model(bad, torch.device("cpu"))


def test_checkpoints_of_the_previous_format_still_evaluate(trained_run, tmp_path):
    """Format /1 kept image_size, mean and std apart: read as the same Preprocess, same predictions."""
    ck = torch.load(trained_run.run_dir / "best.pt", map_location="cpu", weights_only=True)
    pre = {**ck.pop("preprocess"), "stored_side": 0}  # format /1 decoded every photo at the eval resize
    old = {**ck, "format": "inat-classifier/1", "image_size": pre["image_size"], "mean": pre["mean"], "std": pre["std"]}
    torch.save(old, tmp_path / "best.pt")
    (tmp_path / "now").mkdir()
    torch.save({**ck, "preprocess": pre}, tmp_path / "now" / "best.pt")
    assert load_checkpoint(tmp_path / "best.pt")["preprocess"] == pre
    for ckpt, out in ((tmp_path / "now" / "best.pt", "new"), (tmp_path / "best.pt", "old")):
        evaluate.main(
            evaluate.get_args_parser().parse_args(
                ["--ckpt", str(ckpt), "--out", str(tmp_path / out), "--workers", "0", "--device", "cpu"]
            )
        )
    assert (
        json.loads((tmp_path / "old" / "eval.json").read_text())["confusion_matrix"]
        == json.loads((tmp_path / "new" / "eval.json").read_text())["confusion_matrix"]
    )
