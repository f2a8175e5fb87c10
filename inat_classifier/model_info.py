"""What a model is and costs, traced on one image: parameters, MACs, the per-layer table, the input sizes it takes.

Parameters and multiply-accumulates come from PyTorch's FlopCounterMode over one image; `--summary`
prints each layer's type, output shape, parameters, MACs and trainability. A model that cannot take
--image_size (a ViT built for 224 px, Inception v3 below 75 px) is found from shapes alone, traced
on the meta device, before any folder or data is touched, with one line naming the sizes it takes.
The memory a training run needs is estimated the same way (`check_memory`), before anything big is allocated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from inat_classifier import dataset as data
from inat_classifier.cli import UserError
from inat_classifier.devices import memory_available
from inat_classifier.storage import format_bytes
from inat_classifier.training import amp_dtype


# ----------------------------------------------------------------------------- cost: parameters and MACs
@contextmanager
def plain_inference(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, attention through its plain matmul path; the model's mode restored after.

    nn.MultiheadAttention's inference fast path and the fused CPU attention kernels are ops that
    FlopCounterMode has no formula for.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)


def trace_flops(model: nn.Module, image_size: int, in_channels: int = 3):
    """One image through the model in eval mode under PyTorch's FlopCounterMode; returns the counter
    (per-module counts in get_flop_counts(), FLOPs: two per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    with plain_inference(model), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_channels, image_size, image_size, device=device))
    return counter


def count_complexity(model: nn.Module, image_size: int, in_channels: int = 3) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image), counted on one traced image, so every layer type
    counts: convolutions, matmuls, attention."""
    macs = trace_flops(model, image_size, in_channels).get_total_flops() // 2
    return sum(p.numel() for p in model.parameters()), macs


def published_complexity(name: str) -> tuple[nn.Module, int, int, float]:
    """A torchvision model built as its DEFAULT weights build it (random weights), its input size, and
    the weights' published num_params and GFLOPs (`_ops`, which are multiply-accumulates)."""
    from torchvision.models import get_model, get_model_weights

    weights = get_model_weights(name).DEFAULT
    kwargs = {"num_classes": len(weights.meta["categories"])}
    if name == "googlenet":
        kwargs["aux_logits"] = False  # its builder drops the auxiliary heads when it loads weights
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False  # skips the slow scipy init; the counts do not depend on it
    if name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]  # e.g. 518 px for vit_h_14's SWAG weights
    model = get_model(name, weights=None, **kwargs)
    size = int(weights.transforms().crop_size[0])
    return model, size, int(weights.meta["num_params"]), float(weights.meta["_ops"])


def format_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


# ----------------------------------------------------------------------------- the per-layer table (--summary)
def shape_of(output) -> str:
    """`1x64x32x32` for a tensor; the first tensor's shape for a tuple or list (with a `+` for more)."""
    if isinstance(output, torch.Tensor):
        return "x".join(map(str, output.shape))
    tensors = [o for o in output if isinstance(o, torch.Tensor)] if isinstance(output, (tuple, list)) else []
    return shape_of(tensors[0]) + ("+" if len(tensors) > 1 else "") if tensors else "-"


def layer_table(model: nn.Module, image_size: int) -> tuple[list[dict], int]:
    """One row per leaf module, in the order the forward pass calls them (a traced pass, so it is
    right for any architecture), and the model's total MACs (attention inside non-leaf modules too)."""
    shapes: dict[str, str] = {}
    leaves = {name: m for name, m in model.named_modules() if name and not any(True for _ in m.children())}

    def record(name: str):
        def hook(module: nn.Module, inputs, output) -> None:  # returns None: the output stays as it is
            shapes.setdefault(name, shape_of(output))

        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in leaves.items()]
    try:
        counter = trace_flops(model, image_size)
    finally:
        for h in hooks:
            h.remove()
    flops = {
        name.split(".", 1)[1] if "." in name else "": sum(ops.values())
        for name, ops in counter.get_flop_counts().items()
    }
    rows = []
    for name in shapes:  # call order
        params = list(leaves[name].parameters(recurse=False))
        rows.append(
            {
                "layer": name,
                "type": type(leaves[name]).__name__,
                "output": shapes[name],
                "params": sum(p.numel() for p in params),
                "macs": flops.get(name, 0) // 2,
                "trainable": any(p.requires_grad for p in params) if params else None,
            }
        )
    return rows, counter.get_total_flops() // 2


def print_table(model: nn.Module, image_size: int) -> list[dict]:
    """Print layer_table with totals (trainable marked, for Part B's freezing); returns the rows."""
    rows, macs = layer_table(model, image_size)
    width = max([5] + [len(r["layer"]) for r in rows])
    type_width = max([4] + [len(r["type"]) for r in rows])
    print(f"{'layer':<{width}}  {'type':<{type_width}}  {'output':>18}  {'params':>11}  {'MACs':>9}  trains")
    for r in rows:
        trains = "" if r["trainable"] is None else ("yes" if r["trainable"] else "frozen")
        print(
            f"{r['layer']:<{width}}  {r['type']:<{type_width}}  {r['output']:>18}  {r['params']:>11,}  "
            f"{format_count(r['macs']):>9}  {trains}"
        )
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"total: {total:,} parameters ({trainable:,} trainable), {format_count(macs)} "
        f"multiply-accumulates per {image_size}x{image_size} image"
    )
    return rows


def class_count(data_dir: str) -> int:
    """The number of classes in data_dir, or 10 (iNaturalist 12K's) when there is no dataset there yet."""
    try:
        return len(data.discover(data_dir).classes)
    except (UserError, OSError):
        return 10


# ----------------------------------------------------------------------------- input sizes
def size_error(model: nn.Module, image_size: int, in_channels: int = 3) -> str | None:
    """What one image of image_size px raises in the model, from shapes alone; None when it fits.

    The model runs with meta tensors in place of its weights (functional_call), so the check costs
    no arithmetic and no memory, and the model's own weights are untouched.
    """
    image = torch.empty(1, in_channels, image_size, image_size, device="meta")
    try:
        with plain_inference(model):
            functional_call(model, meta_tensors(model), (image,))
    except Exception as e:  # a layer refusing the size: an assert (ViT), a kernel larger than its input, a view
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:150]}" if text else type(e).__name__
    return None


def smallest_size(model: nn.Module, fits: int) -> int:
    """The smallest size at most `fits` (one that fits) that fits, by bisection: strided layers and
    pooling only ever need more pixels, so every size between the smallest and `fits` fits too."""
    low, high = 1, fits
    while low < high:
        mid = (low + high) // 2
        if size_error(model, mid) is None:
            high = mid
        else:
            low = mid + 1
    return high


def check_input_size(model: nn.Module, name: str, image_size: int, native: int) -> None:
    """A one-line UserError naming the sizes `name` takes when it cannot take image_size px.

    `native` is the size its weights were trained at. When even that fails the shape-only pass,
    it cannot judge this model (an op without a meta kernel, say) and leaves it to the real pass.
    """
    error = size_error(model, image_size)
    if error is None or size_error(model, native) is not None:
        return
    least = smallest_size(model, native)
    if least == native and size_error(model, 2 * native) is not None:
        raise UserError(f"{name} takes exactly {native} px, not --image_size {image_size}")
    if image_size < least:
        raise UserError(f"{name} needs at least {least} px, not --image_size {image_size}")
    raise UserError(f"{name} cannot take --image_size {image_size} ({error}); it takes {native} px")


# ----------------------------------------------------------------------------- memory
def meta_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers as meta tensors: shapes without memory, for functional_call."""
    return {name: torch.empty_like(t, device="meta") for name, t in [*model.named_parameters(), *model.named_buffers()]}


def tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


def activation_elements(model: nn.Module, image_size: int, trains_all: bool = False) -> tuple[int, int] | None:
    """Per image, traced on the meta device (nothing allocated, no arithmetic): the elements the backward
    pass keeps, and the most alive at once in one layer (its inputs and outputs); None when the model
    cannot be traced on meta.

    Kept: every layer's inputs and outputs from the first layer with a trainable parameter on (before
    it, autograd records nothing), or from the start with trains_all; each memory block once, so
    in-place results and views (ReLU(inplace=True), Flatten) count as their input.
    """
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    # Read before the call: functional_call swaps in meta tensors, which train nothing.
    trains = {id(m) for m in leaves if any(p.requires_grad for p in m.parameters(recurse=False))}
    kept: dict[int, int] = {}
    alive: list[torch.Tensor] = []  # held so that no block's address is reused during the trace
    peak, recording = 0, trains_all

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal peak, recording
        ins, outs = tensors_in(inputs), tensors_in(output)
        peak = max(peak, sum(t.numel() for t in ins + outs))
        recording = recording or id(module) in trains
        for t in ins + outs if recording else []:
            key = t.untyped_storage()._cdata
            kept[key] = max(kept.get(key, 0), t.untyped_storage().nbytes() // t.element_size())
            alive.append(t)

    hooks = [m.register_forward_hook(hook) for m in leaves]
    try:
        with plain_inference(model):
            functional_call(model, meta_tensors(model), (torch.empty(1, 3, image_size, image_size, device="meta"),))
    except Exception:  # an op without a meta kernel: no estimate, the run is not held up
        return None
    finally:
        for h in hooks:
            h.remove()
    return sum(kept.values()), peak


def training_bytes(
    model: nn.Module, image_size: int, batch_size: int, args, device: torch.device, trains_all: bool = False
) -> int | None:
    """Bytes a training run of model needs on device at batch_size: weights, gradients, optimizer state,
    --ema's copy, and the activations of one traced image times the batch; None when it cannot be traced."""
    elements = activation_elements(model, image_size, trains_all)
    if elements is None:
        return None
    params = list(model.parameters())
    weights = sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])
    trained = sum(p.numel() * p.element_size() for p in params if p.requires_grad or trains_all)
    slots = {"sgd": 1 if args.momentum else 0}.get(args.optimizer, 2)  # Adam(W): two moments per weight
    ema = weights if getattr(args, "ema", 0) else 0
    dtype = amp_dtype(args.amp, device) or params[0].dtype
    kept, peak = elements
    # The busiest layer twice: its input and output in the forward pass, their gradients in the backward.
    activations = batch_size * (kept + 2 * peak) * torch.empty((), dtype=dtype).element_size()
    return weights + trained * (1 + slots) + ema + activations


def check_memory(
    model: nn.Module, image_size: int, batch_size: int, args, device: torch.device, trains_all: bool = False
) -> None:
    """Say what the run needs on device; a one-line UserError when that is more than device has free.

    The margin: a run is refused only when the estimate alone is above what is free. The estimate
    keeps every layer's output until the backward pass at the run's precision, which autograd
    sometimes frees sooner, and leaves out the batch pipeline and the allocator's slack, which are
    small next to it; a model that does not fit misses by far more than either (the 100000-filter
    ConvNet asks for terabytes), and a model that might fit is never refused. Above 80% a warning
    says it may not fit.
    """
    need = training_bytes(model, image_size, batch_size, args, device, trains_all)
    if need is None:
        return
    free = memory_available(device)
    what = f"this model needs about {format_bytes(need)} at batch {batch_size} on {device}"
    if free is None:
        print(f"memory: {what}")
    elif need > free:
        raise UserError(
            f"{what}, which has {format_bytes(free)} free; lower --batch_size or --image_size, or use a smaller model"
        )
    else:
        tight = "; it may not fit, lower --batch_size if it runs out" if need > 0.8 * free else ""
        print(f"memory: {what}, which has {format_bytes(free)} free{tight}")
