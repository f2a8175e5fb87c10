"""Checkpoints: the training state they hold, written atomically, read safely (weights_only), rebuilt into models.

A checkpoint describes itself: model spec, class names, preprocessing, split and flags travel with
the weights, so evaluate.py and visualize.py need nothing but the file.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inat_classifier.cli import UserError
from inat_classifier.presets import Preprocess
from inat_classifier.storage import atomic_write

CHECKPOINT_FORMAT = "inat-classifier/2"  # /2: preprocessing as one "preprocess" entry
READABLE_FORMATS = (CHECKPOINT_FORMAT, "inat-classifier/1")  # /1: image_size, mean and std apart
CHECKPOINT_KEYS = ("model_state", "spec", "class_names", "preprocess", "config")
EXPORT_NAMES = {"onnx": "ONNX", "torchscript": "TorchScript"}  # export.py's formats (exported.py)


@dataclass
class TrainState:
    """Everything that changes while training and is saved in last.pt."""

    epoch: int = 0  # completed epochs
    history: list = field(default_factory=list)
    best_val_acc: float = -1.0
    best_epoch: int = 0
    batches_done: int = 0  # within the current epoch, when saved mid-epoch
    partial: dict = field(default_factory=dict)  # running sums of the current epoch


def json_safe(config: dict) -> dict:
    """Flags as plain JSON types, so they load with weights_only=True and dump to args.json."""
    out = {}
    for k, v in config.items():
        if k.startswith("_"):  # bookkeeping such as cli's record of typed flags
            continue
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (bool, int, float, str)) else str(x) for x in v]
        else:
            out[k] = str(v)
    return out


def checkpoint_meta(
    spec: dict, class_names: list[str], preprocess: Preprocess, split: dict, config: dict, **extra: Any
) -> dict:
    """What every checkpoint of a run says about itself, besides weights and training state."""
    return {
        "spec": spec,
        "class_names": list(class_names),
        "preprocess": preprocess.to_dict(),
        "split": split,
        "config": json_safe(config),
        **extra,
    }


def checkpoint_payload(meta: dict, model: nn.Module, state: TrainState) -> dict:
    """meta plus a snapshot of the model's weights and the run's progress: a complete best.pt."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}  # a snapshot, not live tensors
    return {
        **meta,
        "format": CHECKPOINT_FORMAT,
        "model_state": weights,
        "epoch": state.epoch,
        "metrics": state.history,
        "best_val_acc": state.best_val_acc,
        "best_epoch": state.best_epoch,
    }


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested payload: about the size torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file, fsync, rename, with Ctrl-C held meanwhile: `path` is never half-written.

    A full disk (checked first, from the tensors' size) is one line naming the folder.
    """
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(obj, tmp), tensor_bytes(obj) + 2**20, path.name)


def load_checkpoint(path: str | Path) -> dict:
    """Load one of our checkpoints safely (weights_only); any other file is a one-line error."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if kind := exported_format(path):
        raise UserError(
            f"{path} is a model exported as {EXPORT_NAMES[kind]} (export.py), not a checkpoint: it holds no "
            "training state or layers to look into; give the run's best.pt or last.pt (evaluate.py reads exports)"
        )
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a PyTorch checkpoint, or truncated (no zip archive structure)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unsupported content"
        raise UserError(
            f"{path}: refused to load: it holds objects beyond weights and plain data "
            f"(not one of our checkpoints, or unsafe): {reason[:150]}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(
            f"{path}: not a readable checkpoint (truncated or corrupt): "
            f"{str(e).splitlines()[0][:150] if str(e) else type(e).__name__}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        raise UserError(f"{path}: not a checkpoint written by this tool (no '{CHECKPOINT_FORMAT}' format tag)")
    if "preprocess" not in ckpt and all(k in ckpt for k in ("image_size", "mean", "std")):
        # Written before checkpoints carried a Preprocess: the same rule, spelled out.
        ckpt["preprocess"] = Preprocess.for_size(ckpt["image_size"], ckpt["mean"], ckpt["std"]).to_dict()
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path}: incomplete checkpoint, it lacks {', '.join(missing)}")
    with zipfile.ZipFile(path) as zf:  # torch.load does not check the CRCs torch.save wrote
        bad = zf.testzip()
    if bad is not None:
        raise UserError(f"{path}: corrupt checkpoint (bad CRC in {bad})")
    return ckpt


def exported_format(path: str | Path) -> str | None:
    """'onnx' or 'torchscript' for a file that holds an exported model, None for anything else."""
    path = Path(path)
    if not path.is_file():
        return None
    if zipfile.is_zipfile(path):  # a TorchScript archive has its constants beside its code; torch.save's has none
        with zipfile.ZipFile(path) as zf:
            return "torchscript" if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in zf.namelist()) else None
    with open(path, "rb") as f:
        head = f.read(32)  # an ONNX model written by torch: ir_version (field 1), then producer_name "pytorch"
    return "onnx" if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and b"\x12\x07pytorch" in head) else None


def load_weights(model: nn.Module, state: dict, path: str | Path) -> None:
    """Load a state dict, turning architecture or class-set mismatches into one line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(
            f"{path}: weights do not fit the model (other architecture or class set): {detail[:200]}"
        ) from None


def preprocess_of(ckpt: dict) -> Preprocess:
    """How the checkpoint's model wants its images: resize, centre crop, mean/std."""
    return Preprocess.from_dict(ckpt["preprocess"])


def rng_state(device: torch.device) -> dict:
    """The RNG states a resume needs (torch, Python, and the training GPU's), for an exact resume.

    Only the GPU this process trains on: a run is resumable on a machine with fewer GPUs, and a
    CPU run never initialises CUDA.
    """
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what rng_state saved; a GPU state only onto the GPU this process trains on."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per GPU visible when saved
        if not cuda:
            return
        cuda = cuda[device.index or 0] if (device.index or 0) < len(cuda) else cuda[0]
    torch.cuda.set_rng_state(cuda, device)
