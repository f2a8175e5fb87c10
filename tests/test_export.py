"""export.py: ONNX and TorchScript files that take uint8 images and give the checkpoint's probabilities.

Part A and Part B runs (torchvision's resnet18 and timm's tiny test_vit, from scratch) on a tiny
JPEG/PNG folder; each export is run here as a deployer would run it (PIL resize and crop, the
file's own metadata, onnxruntime or torch.jit), and through evaluate.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import evaluate
import export
import train_parta
import train_partb
from conftest import CLASSES, REPO, assert_one_line_error, clean_env, make_dataset, run_cli, train_args
from inat_classifier.checkpoint import load_checkpoint
from inat_classifier.cli import UserError
from inat_classifier.exported import METADATA_FILE, export_checked
from inat_classifier.images import load_image
from models import restore_model

# torch.jit.load warns that TorchScript is deprecated; these tests load files as a deployer would.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
N_VAL = 3  # held-out photos per class


def needs(fmt: str) -> None:
    """ONNX is optional (requirements.txt): its tests skip without onnx and onnxruntime."""
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("export") / "ds", CLASSES, n_train=6, n_val=N_VAL, size=40)


@pytest.fixture(scope="module")
def part_a_run(photos, tmp_path_factory) -> Path:
    """Part A at 32 px for 1 epoch (its default augmentation on)."""
    out = tmp_path_factory.mktemp("runs-a")
    train_parta.main(train_parta.get_args_parser().parse_args(train_args(photos, out, "a", 1, "--seed", "0")))
    return out / "a"


def part_b_run(photos: Path, out: Path, model: str, *extra: str) -> Path:
    flags = [*("--model", model, "--weights", "none", "--freeze", "none", "--data_dir", str(photos)), *extra]
    flags += [*("--out_dir", str(out), "--run_name", "b", "--cache", str(out / "_cache"), "--epochs", "1")]
    flags += [*("--batch_size", "8", "--workers", "0", "--wandb", "disabled", "--device", "cpu", "--seed", "0")]
    train_partb.main(train_partb.get_args_parser().parse_args(flags))
    return out / "b"


@pytest.fixture(scope="module")
def resnet18_run(photos, tmp_path_factory) -> Path:
    return part_b_run(photos, tmp_path_factory.mktemp("runs-r18"), "resnet18", "--image_size", "32")


@pytest.fixture(scope="module")
def vit_run(photos, tmp_path_factory) -> Path:
    """timm's smallest ViT at its own input size (160 px)."""
    pytest.importorskip("timm")
    return part_b_run(photos, tmp_path_factory.mktemp("runs-vit"), "timm:test_vit")


def run_export(ckpt: Path, fmt: str, out: Path | None = None, *extra: str) -> dict:
    flags = ["--ckpt", str(ckpt), "--format", fmt, *(["--out", str(out)] if out else []), *extra]
    return export.main(export.get_args_parser().parse_args(flags))


# ----------------------------------------------------------------------------- as a deployer runs the file
def read_export(path: Path, fmt: str):
    """(metadata, run): the file's metadata and a function of uint8 (N, S, S, 3) images, with nothing of ours."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
        return meta, lambda x: session.run(None, {session.get_inputs()[0].name: x})[0]
    files = {METADATA_FILE: ""}
    module = torch.jit.load(str(path), _extra_files=files)
    return json.loads(files[METADATA_FILE]), lambda x: module(torch.from_numpy(x)).numpy()


def deployer_images(paths: list[str], meta: dict) -> np.ndarray:
    """PIL: short side to resize_size, the centre input_size square, uint8 RGB (N, S, S, 3)."""
    from PIL import Image

    size, resize = meta["input_size"], meta["resize_size"]
    out = []
    for path in paths:
        img = load_image(path)
        w, h = img.size
        img = img.resize((round(w * resize / min(w, h)), round(h * resize / min(w, h))), Image.BILINEAR)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        out.append(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8))
    return np.stack(out)


def checkpoint_probabilities(ckpt_path: Path, images: np.ndarray, meta: dict) -> np.ndarray:
    """The checkpoint's model on the same uint8 images, normalised with the metadata's mean/std."""
    model, ckpt = restore_model(ckpt_path, torch.device("cpu"))
    mean, std = np.asarray(meta["mean"], np.float32), np.asarray(meta["std"], np.float32)
    x = torch.from_numpy(((images.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        return (model(x) / ckpt.get("temperature", 1.0)).softmax(1).numpy()


def assert_matches_checkpoint(path: Path, fmt: str, ckpt_path: Path, photos: Path) -> None:
    """The file, run with its metadata alone, gives the checkpoint's probabilities within 1e-4 and its top 1."""
    meta, run = read_export(path, fmt)
    ckpt = load_checkpoint(ckpt_path)
    assert meta["class_names"] == ckpt["class_names"] == CLASSES
    assert meta["input_size"] == ckpt["preprocess"]["image_size"]
    assert meta["mean"] == ckpt["preprocess"]["mean"] and meta["std"] == ckpt["preprocess"]["std"]
    images = deployer_images(sorted(str(p) for p in (photos / "val").rglob("*.*")), meta)
    got, want = run(images), checkpoint_probabilities(ckpt_path, images, meta)
    assert got.shape == (len(images), len(CLASSES)) and np.allclose(got.sum(1), 1, atol=1e-5)
    assert np.abs(got - want).max() <= 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()


# ----------------------------------------------------------------------------- exports match
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_part_a_export_matches_the_checkpoint_and_evaluates_to_the_same_metrics(part_a_run, photos, fmt, tmp_path):
    needs(fmt)
    out = tmp_path / f"model{SUFFIX[fmt]}"
    result = run_export(part_a_run / "best.pt", fmt, out)
    assert result["n"] == len(CLASSES) * N_VAL and result["max_diff"] <= 1e-4 and result["top1_agreement"] == 1.0
    assert_matches_checkpoint(out, fmt, part_a_run / "best.pt", photos)
    common = ["--workers", "0", "--device", "cpu"]
    of_ckpt = evaluate.main(
        evaluate.get_args_parser().parse_args(["--ckpt", str(part_a_run / "best.pt"), "--out", str(tmp_path / "c")])
    )
    of_export = evaluate.main(
        evaluate.get_args_parser().parse_args(["--ckpt", str(out), "--out", str(tmp_path / "e"), *common])
    )
    assert of_export["n"] == of_ckpt["n"] == len(CLASSES) * N_VAL
    assert of_export["accuracy"] == of_ckpt["accuracy"] and of_export["macro_f1"] == of_ckpt["macro_f1"]
    assert of_export["confusion_matrix"] == of_ckpt["confusion_matrix"]
    assert of_export["loss"] == pytest.approx(of_ckpt["loss"], abs=1e-4)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("run", ["resnet18_run", "vit_run"])
def test_part_b_export_matches_the_checkpoint(request, photos, run, fmt):
    """torchvision's and timm's backbones; the default file lands beside the checkpoint."""
    needs(fmt)
    run_dir = request.getfixturevalue(run)
    result = run_export(run_dir, fmt)
    out = run_dir / f"best{SUFFIX[fmt]}"
    assert result["out"] == str(out) and result["max_diff"] <= 1e-4 and result["top1_agreement"] == 1.0
    assert_matches_checkpoint(out, fmt, run_dir / "best.pt", photos)


def test_the_checkpoints_temperature_divides_the_logits_inside_the_export(part_a_run, photos, tmp_path):
    """A calibrated checkpoint (its "temperature") gives softmax(logits / T); its metadata says T."""
    ckpt = torch.load(part_a_run / "best.pt", weights_only=True)
    torch.save({**ckpt, "temperature": 0.2}, tmp_path / "best.pt")
    run_export(tmp_path / "best.pt", "torchscript")
    out = tmp_path / "best.torchscript.pt"
    assert_matches_checkpoint(out, "torchscript", tmp_path / "best.pt", photos)  # softmax(logits / 0.2)
    meta, run = read_export(out, "torchscript")
    images = deployer_images(sorted(str(p) for p in (photos / "val").rglob("*.*")), meta)
    assert meta["temperature"] == 0.2
    assert np.abs(run(images) - checkpoint_probabilities(part_a_run / "best.pt", images, meta)).max() > 1e-2
    # evaluate.py applies the temperature once: on the export as on the calibrated checkpoint
    common = ["--workers", "0", "--device", "cpu"]
    reports = [
        evaluate.main(evaluate.get_args_parser().parse_args(["--ckpt", str(f), "--out", str(tmp_path / d), *common]))
        for f, d in ((tmp_path / "best.pt", "c"), (out, "e"))
    ]
    assert reports[1]["nll"] == pytest.approx(reports[0]["nll"], rel=1e-3)
    assert reports[1]["ece"] == pytest.approx(reports[0]["ece"], abs=1e-3)


# ----------------------------------------------------------------------------- failures
class TracesOneBranch(nn.Module):
    """A model whose trace keeps the branch of its example input (all black), not what bright photos take."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, len(CLASSES), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        return y if float(x.max()) > 0 else -y


def test_an_export_that_differs_from_its_checkpoint_is_refused_and_not_written(part_a_run, photos, tmp_path):
    ckpt = load_checkpoint(part_a_run / "best.pt")
    out = tmp_path / "model.torchscript.pt"
    paths = sorted(str(p) for p in (photos / "val").rglob("*.*"))
    with pytest.raises(UserError, match=r"differs from the checkpoint by .* in probability \(over 0.0001\)"):
        export_checked(TracesOneBranch(), ckpt, part_a_run / "best.pt", "torchscript", out, paths)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp


def test_a_model_the_exporter_cannot_take_is_one_line_and_nothing_is_written(vit_run, tmp_path):
    """timm's ViT needs opset 14 (scaled_dot_product_attention): the exporter's reason, not its graph dump."""
    needs("onnx")
    proc = run_cli("export.py", "--ckpt", vit_run, "--opset", "13", "--out", tmp_path / "vit.onnx")
    assert_one_line_error(proc, "cannot export VisionTransformer to ONNX", "opset version 13")
    assert len((proc.stdout + proc.stderr).splitlines()) <= 2 and list(tmp_path.iterdir()) == []


# python -c HIDDEN PACKAGE SCRIPT ARGS: the script run as if PACKAGE were not installed
HIDDEN = (
    "import runpy, sys; sys.modules[sys.argv[1]] = None; sys.argv = sys.argv[2:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_a_missing_onnx_package_is_one_line_naming_it(part_a_run, package, tmp_path):
    cmd = [
        sys.executable,
        "-c",
        HIDDEN,
        package,
        "export.py",
        "--ckpt",
        str(part_a_run),
        "--out",
        str(tmp_path / "m.onnx"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert_one_line_error(proc, f"pip install {package}")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_without_onnxruntime_is_one_line_naming_it(part_a_run, tmp_path):
    needs("onnx")
    run_export(part_a_run / "best.pt", "onnx", tmp_path / "m.onnx")
    cmd = [sys.executable, "-c", HIDDEN, "onnxruntime", "evaluate.py", "--ckpt", str(tmp_path / "m.onnx")]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert_one_line_error(proc, "pip install onnxruntime")


@pytest.fixture(scope="module")
def exported_files(part_a_run, tmp_path_factory) -> dict[str, Path]:
    """Part A's best.pt exported in every format whose packages are here."""
    folder = tmp_path_factory.mktemp("exported")
    files = {}
    for fmt in ("torchscript", "onnx"):
        try:
            needs(fmt)
        except pytest.skip.Exception:
            continue
        files[fmt] = folder / f"best{SUFFIX[fmt]}"
        run_export(part_a_run / "best.pt", fmt, files[fmt], "--check_images", "0")
    return files


@pytest.mark.parametrize(
    "script,flags",
    [
        ("train_parta.py", ["--resume"]),
        ("train_partb.py", ["--resume"]),
        ("visualize.py", ["predictions", "--ckpt"]),
    ],
)
def test_an_export_given_for_resume_or_visualize_is_one_line(exported_files, script, flags):
    fmt = "onnx" if script == "train_partb.py" and "onnx" in exported_files else "torchscript"
    path = exported_files[fmt]
    proc = run_cli(script, *flags, path)
    assert_one_line_error(proc, str(path), f"exported as {'ONNX' if fmt == 'onnx' else 'TorchScript'}")


def test_export_never_overwrites_a_file_it_did_not_write(part_a_run, tmp_path):
    target = shutil.copy(part_a_run / "last.pt", tmp_path / "last.pt")
    before = Path(target).read_bytes()
    with pytest.raises(UserError, match="exists and is not an exported model"):
        run_export(part_a_run / "best.pt", "torchscript", Path(target))
    assert Path(target).read_bytes() == before
