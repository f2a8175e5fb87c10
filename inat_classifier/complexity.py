"""What a model costs: parameters and multiply-accumulates counted by tracing one image (PyTorch's FlopCounterMode)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


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
