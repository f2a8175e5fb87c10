"""Which input sizes a model takes: one image's shapes traced on the meta device, and the limits when a size fails.

A model that cannot take --image_size (a ViT built for 224 px, Inception v3 below 75 px) would
otherwise fail with a traceback in the first forward pass; this finds out before a run folder
exists, without computing anything or touching the weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from inat_classifier.cli import UserError
from inat_classifier.complexity import plain_inference


def size_error(model: nn.Module, image_size: int, in_channels: int = 3) -> str | None:
    """What one image of image_size px raises in the model, from shapes alone; None when it fits.

    The model runs with meta tensors in place of its weights (functional_call), so the check costs
    no arithmetic and no memory, and the model's own weights are untouched.
    """
    tensors = {
        name: torch.empty_like(t, device="meta") for name, t in [*model.named_parameters(), *model.named_buffers()]
    }
    image = torch.empty(1, in_channels, image_size, image_size, device="meta")
    try:
        with plain_inference(model):
            functional_call(model, tensors, (image,))
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
