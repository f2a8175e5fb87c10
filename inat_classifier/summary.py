"""A model as a table: each layer's type, output shape, parameters, MACs and trainability, from one traced image."""

from __future__ import annotations

import torch
from torch import nn

from inat_classifier import dataset as data
from inat_classifier.cli import UserError
from inat_classifier.complexity import format_count, trace_flops


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
