"""Models: the flexible from-scratch ConvNet (Part A) and pretrained backbones with freezing (Part B).

Every model is described by a small JSON-able `spec` dict stored in checkpoints, so
`build_from_spec(spec, num_classes)` rebuilds it without the training flags.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


# ----------------------------------------------------------------------------- Part A
def block_widths(filters: int, filter_org: float, conv_layers: int) -> list[int]:
    """Filters per block: `filters` first, times `filter_org` per block, at least 1."""
    return [max(1, int(round(filters * filter_org**i))) for i in range(conv_layers)]


def kernel_sizes(kernel_size: int | Sequence[int], conv_layers: int) -> list[int]:
    ks = [int(kernel_size)] * conv_layers if isinstance(kernel_size, int) else [int(k) for k in kernel_size]
    if len(ks) == 1:
        ks = ks * conv_layers
    if len(ks) != conv_layers:
        raise ValueError(f"kernel_size lists {len(ks)} sizes but there are {conv_layers} conv layers")
    if any(k < 1 for k in ks):
        raise ValueError(f"kernel sizes must be >= 1, got {ks}")
    return ks


class ConvNet(nn.Module):
    """`conv_layers` blocks of conv -> [batch norm] -> activation -> 2x2 max-pool, then a dense head."""

    def __init__(
        self,
        num_classes: int,
        image_size: int = 224,
        in_channels: int = 3,
        conv_layers: int = 5,
        filters: int = 32,
        filter_org: float = 1.0,
        kernel_size: int | Sequence[int] = 3,
        activation: str = "relu",
        batch_norm: bool = True,
        dropout: float = 0.0,
        dense_neurons: int = 256,
        pool: str = "flatten",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; choose from {', '.join(ACTIVATIONS)}")
        if conv_layers < 1:
            raise ValueError(f"conv_layers must be >= 1, got {conv_layers}")
        if filters < 1 or filter_org <= 0:
            raise ValueError(f"filters must be >= 1 and filter_org > 0, got {filters} and {filter_org}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if pool not in ("flatten", "avg"):
            raise ValueError(f"pool must be 'flatten' or 'avg', got {pool}")
        final = image_size // 2**conv_layers
        if final < 1:
            raise ValueError(
                f"image_size {image_size} is too small for {conv_layers} conv layers: each max-pool "
                f"halves it, so it must be at least {2**conv_layers}"
            )
        act = ACTIVATIONS[activation]
        widths = block_widths(filters, filter_org, conv_layers)
        blocks, c_in = [], in_channels
        for c_out, k in zip(widths, kernel_sizes(kernel_size, conv_layers)):
            blocks.append(nn.Sequential(
                nn.Conv2d(c_in, c_out, k, padding="same", bias=not batch_norm),
                nn.BatchNorm2d(c_out) if batch_norm else nn.Identity(),
                act(),
                nn.MaxPool2d(2),
            ))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        if pool == "avg":
            self.pool, n_flat = nn.AdaptiveAvgPool2d(1), c_in
        else:
            self.pool, n_flat = nn.Identity(), c_in * final * final
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(n_flat, dense_neurons),
            act(),
            nn.Dropout(dropout),
            nn.Linear(dense_neurons, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


CONVNET_KEYS = ("conv_layers", "filters", "filter_org", "kernel_size", "activation",
                "batch_norm", "dropout", "dense_neurons", "pool")


def convnet_spec(args, image_size: int) -> dict:
    """The JSON-able description of a ConvNet from parsed flags."""
    kwargs = {k: getattr(args, k) for k in CONVNET_KEYS}
    kwargs["image_size"] = image_size
    return {"kind": "convnet", "kwargs": kwargs}


# ----------------------------------------------------------------------------- complexity
def count_complexity(model: nn.Module, image_size: int, in_channels: int = 3) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image) of conv and linear layers, by tracing one image."""
    macs = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal macs
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        macs += out[0].numel() * k

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal macs
        macs += out[0].numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, in_channels, image_size, image_size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sum(p.numel() for p in model.parameters()), macs


def format_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def build_from_spec(spec: dict, num_classes: int) -> nn.Module:
    """Rebuild a model from the `spec` saved in a checkpoint (weights are loaded separately)."""
    if spec["kind"] == "convnet":
        return ConvNet(num_classes=num_classes, **spec["kwargs"])
    raise ValueError(f"unknown model kind in checkpoint: {spec['kind']}")
