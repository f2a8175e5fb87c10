"""Exported models: a trained model with its preprocessing and softmax in one ONNX or TorchScript file, and back.

export.py writes them (`export_checked`); evaluate.py reads them (`load_exported`). The file takes
uint8 RGB images, N x S x S x 3, already resized and centre-cropped to the checkpoint's input size
S (as evaluation crops them, presets.Preprocess), and returns probabilities: softmax(logits / T),
T the checkpoint's temperature (1.0 without one). Its metadata names the classes, the input size,
mean/std and the rest of the preprocessing. Each export is checked against its checkpoint on real
photos before it is moved into place.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from inat_classifier.calibration import temperature_of
from inat_classifier.checkpoint import EXPORT_NAMES, exported_format, preprocess_of
from inat_classifier.cli import UserError
from inat_classifier.device_batches import DecodedRows, DeviceLoader, colour_constants, eval_resize, model_inputs
from inat_classifier.presets import Preprocess
from inat_classifier.storage import (
    full_disk_is_one_line,
    is_disk_full,
    move_into_place,
    remove_stale_temps,
    signals_held,
    temp_name,
)
from inat_classifier.tracking import progress

EXPORT_FORMAT = "inat-classifier-export/1"
METADATA_FILE = "metadata.json"  # TorchScript: the _extra_files entry holding the metadata
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
OPSET = 17  # ONNX opset: onnxruntime >= 1.12 runs it, and it has LayerNormalization for transformers
TOLERANCE = 1e-4  # largest difference in probability an export may have from its checkpoint


def require(module: str, what: str) -> ModuleType:
    """An optional package, or the one line naming what to pip install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the {module} package: pip install {module}") from None


class Deployable(nn.Module):
    """uint8 images (N, S, S, 3) -> probabilities (N, classes): normalisation, the model, softmax(logits / T).

    The normalisation is device_batches.normalize_batch's, with its constants: x * 1/(255 std) - mean/std.
    """

    def __init__(self, model: nn.Module, preprocess: Preprocess, temperature: float) -> None:
        super().__init__()
        self.model, self.temperature = model, temperature
        self.requires_grad_(False)  # a TorchScript file's outputs need no .detach() where it is deployed
        k = colour_constants(tuple(preprocess.mean), tuple(preprocess.std), torch.device("cpu"))
        self.register_buffer("scale", k["inv_std_255"].view(1, 3, 1, 1).clone())
        self.register_buffer("shift", k["shift"].view(1, 3, 1, 1).clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() * self.scale - self.shift
        return (self.model(x).float() / self.temperature).softmax(1)


def export_metadata(ckpt: dict, ckpt_path: Path) -> dict:
    """What the file says about itself: classes, input, mean/std, the whole preprocessing, where it came from."""
    pre = preprocess_of(ckpt)
    return {
        "format": EXPORT_FORMAT,
        "class_names": list(ckpt["class_names"]),
        "input_size": pre.image_size,
        "input": f"uint8 RGB, N x {pre.image_size} x {pre.image_size} x 3, resized and centre-cropped",
        "output": f"probabilities, N x {len(ckpt['class_names'])}",
        "mean": list(pre.mean),
        "std": list(pre.std),
        "resize_size": pre.resize_size,
        "preprocess": pre.to_dict(),
        "temperature": temperature_of(ckpt),
        "data_dir": ckpt["config"].get("data_dir"),
        "checkpoint": str(ckpt_path),
        "epoch": ckpt.get("epoch"),
    }


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Warnings, and what the ONNX exporter writes from C++ (the whole graph, on a failure), kept off the console.

    Its reason is in the exception, which the caller turns into one line.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(os.devnull, "w") as null, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def write_onnx(deployable: Deployable, size: int, path: Path, meta: dict, opset: int) -> None:
    onnx = require("onnx", "--format onnx")
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # batch 2: no batch-1 shortcut is traced
    # The TorchScript-based exporter: it needs no package beyond onnx, on every torch requirements.txt allows.
    torch.onnx.export(
        deployable,
        (example,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["images"],
        output_names=["probabilities"],
        dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
    )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in meta.items()})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def write_torchscript(deployable: Deployable, size: int, path: Path, meta: dict, opset: int) -> None:
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    traced = torch.jit.trace(deployable, example, check_trace=False)  # export_checked checks it on photos
    torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(meta)})


WRITERS: dict[str, Callable[[Deployable, int, Path, dict, int], None]] = {
    "onnx": write_onnx,
    "torchscript": write_torchscript,
}


def write_export(deployable: Deployable, fmt: str, path: Path, meta: dict, opset: int) -> None:
    """The file at path; a model the tracer or exporter cannot take is one line with their reason."""
    need = sum(t.numel() * t.element_size() for t in deployable.state_dict().values()) + 2**20
    with full_disk_is_one_line(path.parent, need, "the exported model"), torch.no_grad():
        try:
            with quiet_exporters():
                WRITERS[fmt](deployable, meta["input_size"], path, meta, opset)
        except UserError:
            raise
        except Exception as e:
            if is_disk_full(e):
                raise
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            raise UserError(
                f"cannot export {type(deployable.model).__name__} to {EXPORT_NAMES[fmt]}: {lines[0][:300]}"
            ) from None


# ----------------------------------------------------------------------------- reading an export
class ExportedModel(nn.Module):
    """An exported file, run on the CPU: what inference.predict gives it are the pipeline's uint8 rows
    (the eval centre at the stored side), what it returns log-probabilities (argmax and softmax work as
    on logits)."""

    takes_rows = True  # inference.predict hands over the rows, not normalised inputs

    def __init__(self, path: Path, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt
        if fmt == "onnx":
            ort = require("onnxruntime", "running an ONNX model")
            try:
                self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            except Exception as e:
                raise UserError(f"{path}: onnxruntime cannot load it: {str(e).splitlines()[0][:200]}") from None
            raw = self.session.get_modelmeta().custom_metadata_map
            try:
                meta = {k: json.loads(v) for k, v in raw.items()}
            except json.JSONDecodeError:
                meta = {}
        else:
            files = {METADATA_FILE: ""}
            try:
                with quiet_exporters():  # torch's notice that TorchScript is deprecated, at every load
                    self.script = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
            except Exception as e:
                raise UserError(f"{path}: not a loadable TorchScript file: {str(e).splitlines()[0][:200]}") from None
            try:
                meta = json.loads(files[METADATA_FILE] or "{}")
            except json.JSONDecodeError:
                meta = {}
        if meta.get("format") != EXPORT_FORMAT:
            raise UserError(f"{path}: an {EXPORT_NAMES[fmt]} file without this tool's metadata (not from export.py)")
        self.meta, self.preprocess = meta, Preprocess.from_dict(meta["preprocess"])

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, S, S) at the input size -> float32 probabilities (N, classes), on the CPU."""
        nhwc = images.permute(0, 2, 3, 1).contiguous().cpu()
        if self.fmt == "onnx":
            return torch.from_numpy(self.session.run(None, {"images": nhwc.numpy()})[0]).float()
        return self.script(nhwc).float()

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        p = self.probabilities(eval_rows(rows.cpu(), self.preprocess.image_size))
        return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def load_exported(path: str | Path) -> tuple[ExportedModel, dict]:
    """An exported model and, from its metadata, what evaluate.py reads of a checkpoint."""
    path = Path(path)
    model = ExportedModel(path, exported_format(path))
    meta = model.meta
    ckpt = {
        "class_names": meta["class_names"],
        "preprocess": meta["preprocess"],
        "config": {"data_dir": meta.get("data_dir")} if meta.get("data_dir") else {},
        "epoch": meta.get("epoch"),
        # no "temperature": the export divides by it inside, so its outputs are calibrated already
    }
    return model, ckpt


def eval_rows(rows: torch.Tensor, size: int) -> torch.Tensor:
    """The eval centre as an exported model takes it: uint8 at the input size (resized pixels rounded)."""
    x = eval_resize(rows, size)
    return x if x.dtype == torch.uint8 else x.round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- the check
@dataclass
class Agreement:
    """An export against its checkpoint on the same uint8 images."""

    n: int
    max_diff: float  # largest |p_export - p_checkpoint| over all images and classes
    same_top1: int  # images whose top class is the same


@torch.no_grad()
def compare(model: nn.Module, exported: ExportedModel, ckpt: dict, paths: list[str], batch_size: int = 32) -> Agreement:
    """The checkpoint's model (softmax of logits / T, in float32) and the export on the same photos' uint8 inputs."""
    preprocess, temperature = preprocess_of(ckpt), temperature_of(ckpt)
    rows = DecodedRows(paths, preprocess.decode_side, 0)
    loader = DeviceLoader(rows, list(range(len(paths))), batch_size, preprocess, torch.device("cpu"), augment=False)
    model.eval()
    n, worst, same = 0, torch.zeros(()), 0
    for x, _ in progress(loader.host_batches(), desc="check", total=len(loader), leave=False):
        if x is None:  # no photo of the batch could be read
            continue
        images = eval_rows(x, preprocess.image_size)
        want = (model(model_inputs(images, preprocess)).float() / temperature).softmax(1)
        got = exported.probabilities(images)
        n, worst = n + len(images), torch.maximum(worst, (got - want).abs().max())  # NaN stays NaN
        same += int((got.argmax(1) == want.argmax(1)).sum())
    if n == 0:
        raise UserError(f"none of the {len(paths)} photos to check the export on could be read")
    return Agreement(n, worst.item(), same)


def export_checked(
    model: nn.Module, ckpt: dict, ckpt_path: Path, fmt: str, out: Path, check_paths: list[str], opset: int = OPSET
) -> Agreement | None:
    """Write the export to a temp file, check it on check_paths (none: unchecked), then move it into place.

    An export further than TOLERANCE from its checkpoint is one line, and nothing is written.
    """
    deployable = Deployable(model.float().eval().cpu(), preprocess_of(ckpt), temperature_of(ckpt)).eval()
    remove_stale_temps(out.parent)  # of exports killed before they finished
    tmp = temp_name(out)
    try:
        write_export(deployable, fmt, tmp, export_metadata(ckpt, ckpt_path), opset)
        agreement = compare(model, ExportedModel(tmp, fmt), ckpt, check_paths) if check_paths else None
        if agreement is not None and not agreement.max_diff <= TOLERANCE:  # NaN fails too
            raise UserError(
                f"the {EXPORT_NAMES[fmt]} export differs from the checkpoint by {agreement.max_diff:.2e} in "
                f"probability (over {TOLERANCE:g}) on {agreement.n} photos; {out} not written"
            )
        with signals_held():
            move_into_place(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return agreement
