"""The one inference path: a trained model over photos (a held-out split or loose files), batch by batch.

evaluate.py, `evaluate.py --predict` and visualize.py all run their images through `predict`,
with the checkpoint's own preprocessing; an exported model (exported.py) takes the same rows.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from inat_classifier import dataset as data
from inat_classifier.calibration import calibration_metrics, temperature_of
from inat_classifier.checkpoint import preprocess_of
from inat_classifier.cli import UserError
from inat_classifier.decoded_cache import decode_fixed
from inat_classifier.device_batches import DecodedRows, DeviceLoader, model_inputs
from inat_classifier.metrics import classification_metrics, confusion_matrix, most_confused
from inat_classifier.presets import Preprocess
from inat_classifier.tracking import progress, say, took
from inat_classifier.training import amp_dtype, autocast


class FlipTTA(nn.Module):
    """Average the softmax of an image and its mirror image (test-time augmentation)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.takes_rows = getattr(model, "takes_rows", False)  # an exported model: mirrored rows work the same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.model(x).float().softmax(1) + self.model(torch.flip(x, dims=[3])).float().softmax(1)
        return torch.log(p / 2)  # log-probabilities: argmax and softmax work as on logits


@dataclass
class Predictions:
    """The model's outputs for the readable samples of a list, in list order."""

    index: torch.Tensor  # position of each row in the sample list (unreadable files are missing)
    outputs: torch.Tensor  # float32 logits (or log-probabilities), one row per readable sample
    targets: torch.Tensor  # the samples' labels

    def tempered(self, temperature: float) -> Predictions:
        """The same predictions with the outputs divided by a temperature (calibration.py); argmax unchanged."""
        return Predictions(self.index, self.outputs / temperature, self.targets)

    @property
    def probs(self) -> torch.Tensor:
        return self.outputs.softmax(1)

    @property
    def preds(self) -> torch.Tensor:
        return self.outputs.argmax(1)

    @property
    def loss(self) -> float:
        return F.cross_entropy(self.outputs, self.targets).item() if len(self.targets) else float("nan")


@torch.no_grad()
def predict(
    model: nn.Module,
    samples: list[tuple[str, int]],
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
) -> Predictions:
    """Run (path, label) samples through the model in eval mode; unreadable files are reported and skipped."""
    # The training run's validation pipeline (device_batches), whose "labels" here are positions.
    rows = DecodedRows(
        [path for path, _ in samples], preprocess.decode_side, workers if len(samples) > batch_size else 0
    )
    loader = DeviceLoader(rows, list(range(len(samples))), batch_size, preprocess, device, augment=False)
    # An exported model (exported.py) takes the uint8 rows themselves, in the precision it was exported in.
    raw = getattr(model, "takes_rows", False)
    dtype = None if raw else amp_dtype("auto", device)
    model.eval()
    outputs, index = [], []
    with progress(total=len(samples), desc="predicting", unit="img", leave=False) as bar:
        for x, positions in loader.host_batches() if raw else loader:
            bar.update(min(batch_size, bar.total - bar.n))  # unreadable images count as done too
            if x is None:  # no image of the batch could be read
                continue
            with autocast(device, dtype):
                outputs.append(model(x).float().cpu())
            index.append(positions.cpu())
    idx = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    out = torch.cat(outputs) if outputs else torch.zeros(0, 0)
    return Predictions(idx, out, torch.tensor([samples[i][1] for i in idx.tolist()], dtype=torch.long))


def predict_readable(
    model: nn.Module,
    samples: list[tuple[str, int]],
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
) -> Predictions:
    """predict over a split, then one line with its time; none of the images readable is a one-line error."""
    start = time.perf_counter()
    p = predict(model, samples, preprocess, device, batch_size, workers)
    if len(p.targets) == 0:
        raise UserError(f"none of the {len(samples)} images could be read")
    say(f"evaluated {len(samples)} images {took(len(samples), start)}")
    return p


def load_input(path: str | Path, preprocess: Preprocess) -> torch.Tensor:
    """One image file as the model's (3, H, W) input; a one-line error when it cannot be read."""
    if not Path(path).exists():
        raise UserError(f"--image: no such file: {path}")
    try:
        rows = torch.from_numpy(decode_fixed(str(path), preprocess.decode_side).copy())
    except Exception as e:
        raise UserError(f"--image: cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:150]})") from None
    top, side = preprocess.eval_region(preprocess.decode_side)
    return model_inputs(rows[None, :, top : top + side, top : top + side], preprocess)[0]


def run_data_dir(ckpt: dict, data_dir: str | None) -> str:
    """data_dir, or (None) the folder the checkpoint's run trained on."""
    return data_dir or ckpt["config"].get("data_dir", data.DEFAULT_DATA_DIR)


def heldout_samples(ckpt: dict, data_dir: str | None, split: str) -> tuple[list, str]:
    """Samples of the held-out split (test) or the run's saved validation split (val).

    data_dir None means the folder the run trained on.
    """
    ds = data.discover(run_data_dir(ckpt, data_dir), need_heldout=split == "test")
    if ds.classes != ckpt["class_names"]:
        raise UserError(
            f"classes in {ds.root} ({', '.join(map(data.shown, ds.classes))}) differ from the checkpoint's "
            f"({', '.join(map(data.shown, ckpt['class_names']))})"
        )
    if split == "val":
        if "split" not in ckpt:
            raise UserError("--split val needs the run's saved split, and this checkpoint has none")
        return data.split_from_json(ds.root, ckpt["split"], ds.classes)[1], "val (the run's validation split)"
    return ds.heldout, f"{ds.heldout_name} (held-out)"


def evaluate_predictions(p: Predictions, class_names: list[str]) -> dict:
    """Accuracy, macro F1, per-class metrics, confusion matrix, most-confused pairs, loss and calibration."""
    metrics = classification_metrics(confusion_matrix(p.targets, p.preds, len(class_names)), class_names)
    metrics.update(n=len(p.targets), loss=p.loss, most_confused=most_confused(metrics["confusion_matrix"], class_names))
    metrics.update(calibration_metrics(p.outputs, p.targets))
    return metrics


def evaluate_samples(
    model: nn.Module, ckpt: dict, samples: list, device: torch.device, batch_size: int, workers: int
) -> dict:
    """evaluate_predictions of the model on samples, with the checkpoint's temperature."""
    p = predict_readable(model, samples, preprocess_of(ckpt), device, batch_size, workers)
    return evaluate_predictions(p.tempered(temperature_of(ckpt)), ckpt["class_names"])


def collect_images(paths: list[str]) -> list[str]:
    """Image files named on the command line, folders searched recursively; FIFOs, sockets, devices
    and broken links are skipped with a warning (data.photo_id), never opened."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = (f for f in sorted(p.rglob("*")) if data.is_image_file(f) and not f.is_dir())
            files.extend(str(f) for f in found if data.photo_id(str(f)) is not None)
        elif os.path.lexists(p):
            files.extend([str(p)] if data.photo_id(str(p)) is not None else [])
        else:
            raise UserError(f"--predict: no such file or folder: {p}")
    if not files:
        raise UserError(f"--predict: no image files found in {', '.join(paths)}")
    return files


def top_classes(
    model: nn.Module,
    ckpt: dict,
    files: list[str],
    device: torch.device,
    k: int = 3,
    batch_size: int = 64,
    workers: int = 0,
) -> list[dict]:
    """Top-k classes with probabilities per readable image file."""
    names = ckpt["class_names"]
    p = predict(model, [(f, -1) for f in files], preprocess_of(ckpt), device, batch_size, workers)
    p = p.tempered(temperature_of(ckpt))
    if len(p.index) == 0:
        return []
    top = p.probs.topk(min(k, len(names)))
    rows = []
    for i, probs, classes in zip(p.index.tolist(), top.values.tolist(), top.indices.tolist(), strict=True):
        rows.append({"path": files[i], "top": [(names[c], v) for v, c in zip(probs, classes, strict=True)]})
    return rows
