"""Checkpoints: the training state they hold, written atomically, read safely (weights_only), rebuilt into models.

A checkpoint describes itself: model spec, class names, preprocessing, split and flags travel with
the weights, so evaluate.py and visualize.py need nothing but the file.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inat_classifier.cli import UserError, json_safe
from inat_classifier.dataset import shown, unshowable
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


# ----------------------------------------------------------------------------- field checks
# Every field a checkpoint may carry, checked by type when it is read, so a hand-edited or foreign file is
# one line naming the field, never a TypeError deep in a reader. Each check returns what is wrong, or None.
Check = Callable[[Any], "str | None"]


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def expect(test: Callable[[Any], bool], wanted: str) -> Check:
    return lambda v: None if test(v) else f"is {describe(v)}, expected {wanted}"


def describe(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def tensor_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def str_keyed(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) for k in v)


def plain_value(v: Any) -> bool:
    scalar = lambda x: x is None or isinstance(x, (bool, int, float, str))  # noqa: E731
    return scalar(v) or (isinstance(v, list) and all(scalar(x) for x in v))


def check_class_names(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
        return f"is {describe(v)}, expected a list of class names (strings)"
    if len(v) < 2 or len(set(v)) != len(v):
        return f"is {describe(v)}, expected at least 2 distinct class names"
    odd = next((c for c in v if unshowable(c)), None)
    return None if odd is None else f"holds the name {shown(odd)}, which {unshowable(odd)}"


def check_spec(v: Any) -> str | None:
    if not isinstance(v, dict) or v.get("kind") not in ("convnet", "torchvision", "timm"):
        return f"is {describe(v)}, expected a model description with kind convnet, torchvision or timm"
    if v["kind"] != "convnet" and not isinstance(v.get("name"), str):
        return f"lacks the model's name (a string), got {describe(v.get('name'))}"
    if not str_keyed(v.get("kwargs", {})):
        return f"has kwargs {describe(v.get('kwargs'))}, expected a mapping of argument names to values"
    return None


def check_preprocess(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"is {describe(v)}, expected a mapping (image_size, resize_size, mean, std, stored_side)"
    triple = lambda x: isinstance(x, (list, tuple)) and len(x) == 3 and all(map(is_number, x))  # noqa: E731
    wanted = {
        "image_size": (lambda x: is_int(x) and x > 0, "a positive integer"),
        "resize_size": (lambda x: is_int(x) and x > 0, "a positive integer"),
        "mean": (triple, "3 numbers"),
        "std": (lambda x: triple(x) and all(n > 0 for n in x), "3 positive numbers"),
        "stored_side": (lambda x: is_int(x) and x >= 0, "an integer >= 0"),
    }
    for key, (test, what) in wanted.items():
        if key not in v and key != "stored_side":  # stored_side: written since /2's first files
            return f"lacks '{key}'"
        if key in v and not test(v[key]):
            return f"has {key} {describe(v[key])}, expected {what}"
    return None


def check_split(v: Any) -> str | None:
    lists = isinstance(v, dict) and all(
        isinstance(v.get(k), list) and all(isinstance(p, str) for p in v[k]) for k in ("train", "val")
    )
    return None if lists else f"is {describe(v)}, expected lists of photo paths under 'train' and 'val'"


def check_rng(v: Any) -> str | None:
    torch_state = isinstance(v, dict) and isinstance(v.get("torch"), torch.Tensor) and v["torch"].dtype == torch.uint8
    python = isinstance(v, dict) and isinstance(v.get("python"), list) and len(v["python"]) == 625
    if not (torch_state and python and all(map(is_int, v["python"]))):
        return f"is {describe(v)}, expected the torch (uint8 tensor) and python (625 integers) random states"
    return None


FIELD_CHECKS: dict[str, Check] = {
    "model_state": expect(tensor_map, "a mapping of parameter names to tensors"),
    "spec": check_spec,
    "class_names": check_class_names,
    "preprocess": check_preprocess,
    "split": check_split,
    "config": expect(
        lambda v: (
            str_keyed(v) and all(map(plain_value, v.values())) and isinstance(v.get("data_dir", ""), (str, type(None)))
        ),
        "a mapping of flags to plain values",
    ),
    "epoch": expect(lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "metrics": expect(lambda v: isinstance(v, list) and all(map(str_keyed, v)), "a list of epoch rows"),
    "best_val_acc": expect(is_number, "a number"),
    "best_epoch": expect(lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "params": expect(is_int, "an integer"),
    "macs": expect(is_int, "an integer"),
    "weights_source": expect(lambda v: isinstance(v, str), "a string"),
    "freeze": expect(lambda v: isinstance(v, str), "a string"),
    "precision": expect(lambda v: isinstance(v, str), "a string"),
    "batches_done": expect(lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "partial": expect(lambda v: str_keyed(v) and all(map(is_number, v.values())), "a mapping of running sums"),
    "optimizer": expect(
        lambda v: str_keyed(v) and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list),
        "an optimizer state (state and param_groups)",
    ),
    "scheduler": expect(str_keyed, "a learning-rate schedule's state (a mapping)"),
    "scaler": expect(str_keyed, "a loss scaler's state (a mapping)"),
    "rng": check_rng,
    "loader_rng": expect(lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8, "a uint8 tensor"),
    "ema": expect(tensor_map, "a mapping of names to tensors"),
    "train_state": expect(tensor_map, "a mapping of parameter names to tensors"),
}


def check_fields(ckpt: dict, path: Path) -> None:
    """Every field of FIELD_CHECKS that ckpt has, by type: the first malformed one is a one-line error."""
    for key, check in FIELD_CHECKS.items():
        problem = check(ckpt[key]) if key in ckpt else None
        if problem:
            raise UserError(f"{path}: malformed checkpoint: its '{key}' {problem}")


def legacy_preprocess(ckpt: dict, path: Path) -> dict:
    """A /1 checkpoint's image_size, mean and std as the one preprocess entry (checked first)."""
    for key in ("image_size", "mean", "std"):
        problem = check_preprocess({"image_size": 1, "resize_size": 1, "mean": [0] * 3, "std": [1] * 3, key: ckpt[key]})
        if problem:
            raise UserError(f"{path}: malformed checkpoint: its '{key}' is {problem.split(' ', 2)[-1]}")
    return Preprocess.for_size(ckpt["image_size"], ckpt["mean"], ckpt["std"]).to_dict()


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
        ckpt["preprocess"] = legacy_preprocess(ckpt, path)
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path}: incomplete checkpoint, it lacks {', '.join(missing)}")
    check_fields(ckpt, path)
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
