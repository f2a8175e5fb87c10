"""Figures from a checkpoint: predictions, filters, feature maps, guided backprop, Grad-CAM, confusion, curves.

    python visualize.py predictions     --ckpt runs/<run>/best.pt              # 10x3 held-out grid
    python visualize.py predictions     --ckpt best.pt --per_class             # 3 images of every class
    python visualize.py filters         --ckpt best.pt [--layer features.2.0]
    python visualize.py feature_maps    --ckpt best.pt --image photo.jpg
    python visualize.py guided_backprop --ckpt best.pt --n 4 --neuron features.4:0-9
    python visualize.py gradcam         --ckpt best.pt --image a.jpg b.jpg [--layer layer4]
    python visualize.py confusion       --ckpt best.pt
    python visualize.py curves          --run runs/<run1> runs/<run2>

Every command writes one PNG (default: into the checkpoint's folder) and prints its path; with
--wandb it is also logged to W&B, if the run itself used W&B. Images are shown un-normalised, in
their true colours, as the model saw them (resized and centre-cropped).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

import data
import engine
import evaluate
from data import UserError
from engine import add_bool, add_flag

# Activation modules the guided rule is applied to (each is ~identity for x > 0 and "off" for x < 0).
GUIDED_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
                      nn.SiLU, nn.Mish, nn.Hardswish)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
RIGHT, WRONG = "#1a9850", "#d73027"  # frame colours of right and wrong predictions


# ----------------------------------------------------------------------------- small helpers
def pyplot():
    """matplotlib.pyplot with the file-only backend, imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, dpi: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight", facecolor="white")
    pyplot().close(fig)
    return out


def unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A normalised (3, H, W) image tensor back to (H, W, 3) RGB in [0, 1] for imshow."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * s + m).clamp(0, 1).permute(1, 2, 0).cpu()


def load_input(path: str | Path, ckpt: dict) -> torch.Tensor:
    """One image file as the model's (3, H, W) input (resize, centre crop, normalise)."""
    if not Path(path).is_file():
        raise UserError(f"--image: no such file: {path}")
    try:
        img = data.load_image(str(path))
    except Exception as e:
        raise UserError(f"--image: cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:150]})") from None
    return evaluate.eval_transform(ckpt)(img)


def label_from_path(path: str | Path, class_names: Sequence[str]) -> int | None:
    """The true class of an image inside a <class>/ folder, else None."""
    parent = Path(path).parent.name
    return list(class_names).index(parent) if parent in class_names else None


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        hint = ", ".join(convs[:8]) + (", ..." if len(convs) > 8 else "")
        raise UserError(f"no module named '{name}' in the model; conv layers: {hint or 'none'}")
    return modules[name]


def contains_conv(m: nn.Module) -> bool:
    return any(isinstance(c, nn.Conv2d) for c in m.modules())


def output_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    ckpt = Path(args.ckpt)
    return ckpt if ckpt.is_dir() else ckpt.parent


def grid_shape(n: int, max_cols: int = 8) -> tuple[int, int]:
    cols = min(max_cols, max(1, math.ceil(math.sqrt(n))))
    return math.ceil(n / cols), cols


# ----------------------------------------------------------------------------- samples
def heldout(ckpt: dict, data_dir: str | None, split: str) -> tuple[list, str]:
    data_dir = data_dir or ckpt.get("config", {}).get("data_dir", data.DEFAULT_DATA_DIR)
    return evaluate.heldout_samples(ckpt, data_dir, split)


def choose_samples(samples: Sequence[tuple[str, int]], n: int, seed: int,
                   per_class: int = 0, num_classes: int = 0) -> list[tuple[str, int]]:
    """`n` random samples, or `per_class` of every class (classes in order); `seed` fixes the draw."""
    rng = random.Random(seed)
    if per_class:
        chosen = []
        for c in range(num_classes):
            of_class = [s for s in samples if s[1] == c]
            chosen.extend(rng.sample(of_class, min(per_class, len(of_class))))
        return chosen
    return rng.sample(list(samples), min(n, len(samples)))


def images_for(args: argparse.Namespace, ckpt: dict) -> tuple[torch.Tensor, list[int | None], list[str]]:
    """The inputs of a per-image command: --image files, else --n held-out images chosen by --seed."""
    if args.image:
        paths = list(args.image)
        labels = [label_from_path(p, ckpt["class_names"]) for p in paths]
    else:
        if args.n < 1:
            raise UserError(f"--n must be >= 1, got {args.n}")
        samples, _ = heldout(ckpt, args.data_dir, args.split)
        chosen = choose_samples(samples, args.n, args.seed)
        paths, labels = [p for p, _ in chosen], [y for _, y in chosen]
    return torch.stack([load_input(p, ckpt) for p in paths]), labels, paths


# ----------------------------------------------------------------------------- predictions
@torch.no_grad()
def prediction_samples(model: nn.Module, ckpt: dict, samples: Sequence[tuple[str, int]],
                       device: torch.device, batch_size: int = 64) -> list[dict]:
    """Run the model on `samples`: per sample path, image (normalised), true, pred, confidence, correct."""
    records, images = [], []
    for path, label in samples:
        try:
            images.append(load_input(path, ckpt))
        except UserError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
            continue
        records.append({"path": path, "true": int(label)})
    model.eval()
    for start in range(0, len(records), batch_size):
        x = torch.stack(images[start:start + batch_size]).to(device)
        probs = model(x).float().softmax(1).cpu()
        conf, pred = probs.max(1)
        for j, r in enumerate(records[start:start + batch_size]):
            r.update(image=images[start + j], pred=int(pred[j]), confidence=float(conf[j]),
                     correct=int(pred[j]) == r["true"])
    return records


def plot_prediction_grid(records: list[dict], ckpt: dict, out: Path, cols: int, title: str,
                         dpi: int = 100) -> list[str]:
    """Images titled with true and predicted class; wrong ones framed red, right ones green.

    Returns the frame colour of every panel, in the order of `records`.
    """
    plt = pyplot()
    names = ckpt["class_names"]
    rows = max(1, math.ceil(len(records) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.35 * rows + 0.6),
                             squeeze=False, layout="constrained")
    colours = []
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, records):
        colour = RIGHT if r["correct"] else WRONG
        colours.append(colour)
        ax.axis("on")
        ax.imshow(unnormalize(r["image"], ckpt["mean"], ckpt["std"]).numpy())
        ax.set_xticks([]), ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(5)
        ax.set_title(f"true: {names[r['true']]}\npred: {names[r['pred']]} ({r['confidence']:.0%})",
                     fontsize=9, color=colour)
    n_right = sum(r["correct"] for r in records)
    fig.suptitle(f"{title}\n{n_right}/{len(records)} right (green frame), "
                 f"{len(records) - n_right} wrong (red frame)", fontsize=11)
    save_figure(fig, out, dpi)
    return colours


def cmd_predictions(args, model, ckpt, device) -> Path:
    if args.rows < 1 or args.cols < 1:
        raise UserError(f"--rows and --cols must be >= 1, got {args.rows} and {args.cols}")
    samples, split_name = heldout(ckpt, args.data_dir, args.split)
    chosen = choose_samples(samples, args.rows * args.cols, args.seed,
                            per_class=args.cols if args.per_class else 0, num_classes=len(ckpt["class_names"]))
    records = prediction_samples(model, ckpt, chosen, device)
    if not records:
        raise UserError("no readable held-out images to show")
    out = output_dir(args) / ("predictions_per_class.png" if args.per_class else "predictions.png")
    plot_prediction_grid(records, ckpt, out, args.cols, f"Predictions on {split_name} images "
                         f"(seed {args.seed})", args.dpi)
    return out


# ----------------------------------------------------------------------------- filters
def conv_layer(model: nn.Module, name: str | None = None) -> tuple[str, nn.Conv2d]:
    """The named Conv2d (a container names its first Conv2d), or the model's first Conv2d."""
    root = resolve_module(model, name) if name else model
    for sub, m in root.named_modules():
        if isinstance(m, nn.Conv2d):
            full = f"{name}.{sub}" if name and sub else (name or sub)
            return full, m
    raise UserError(f"'{name or 'the model'}' contains no Conv2d layer")


def plot_filters(weight: torch.Tensor, out: Path, title: str, max_filters: int = 64, dpi: int = 110) -> None:
    """One panel per output channel: RGB when the layer sees the image, else channels averaged.

    Every filter is normalised on its own: min-max to [0, 1] for colour, symmetric about 0
    (red positive, blue negative) for the averaged ones.
    """
    plt = pyplot()
    w = weight.detach().float().cpu()
    n = w.shape[0] if max_filters <= 0 else min(w.shape[0], max_filters)
    w = w[:n]
    colour = w.shape[1] == 3
    rows, cols = grid_shape(n, 8 if n <= 64 else 16)
    panel = 1.1 if cols <= 8 else 0.8
    fig, axes = plt.subplots(rows, cols, figsize=(panel * cols, panel * rows + 0.7),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        if colour:
            f = w[i]
            f = (f - f.min()) / (f.max() - f.min()).clamp(min=1e-12)
            ax.imshow(f.permute(1, 2, 0).numpy(), interpolation="nearest")
        else:
            f = w[i].mean(0)
            lim = f.abs().max().clamp(min=1e-12).item()
            ax.imshow(f.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(str(i), fontsize=7, pad=2)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, out, dpi)


def cmd_filters(args, model, ckpt, device) -> Path:
    name, conv = conv_layer(model, args.layer)
    w = conv.weight
    kind = ("RGB, each filter min-max normalised" if w.shape[1] == 3 else
            f"mean over {w.shape[1]} input channels, red +, blue -, each filter normalised")
    shown = w.shape[0] if args.max_filters <= 0 else min(w.shape[0], args.max_filters)
    title = (f"{name}: {shown}{'' if shown == w.shape[0] else f' of {w.shape[0]}'} filters of "
             f"{w.shape[2]}x{w.shape[3]}x{w.shape[1]} ({kind})")
    out = output_dir(args) / f"filters_{name.replace('.', '_')}.png"
    plot_filters(w, out, title, args.max_filters, args.dpi)
    return out


# ----------------------------------------------------------------------------- feature maps
def conv_stages(model: nn.Module) -> list[str]:
    """Names of the model's conv stages: the conv-holding children, found below single wrappers.

    ConvNet -> features.0 .. features.N-1 (conv -> norm -> activation -> pool blocks);
    torchvision ResNet -> conv1, layer1 .. layer4; VGG/EfficientNet/ConvNeXt -> features.<i>;
    timm EfficientNet -> conv_stem, blocks.0 .. blocks.6, conv_head. A wrapper with one
    conv-holding backbone is looked through; a Sequential body named features/blocks is opened.
    """
    node, prefix = model, ""
    while True:
        kids = [(n, m) for n, m in node.named_children() if contains_conv(m)]
        if len(kids) == 1 and sum(isinstance(c, nn.Conv2d) for c in kids[0][1].modules()) > 1:
            node, prefix = kids[0][1], f"{prefix}{kids[0][0]}."
            continue
        names = []
        for n, m in kids:
            body = n in ("features", "blocks") and isinstance(m, nn.Sequential)
            names.extend([f"{prefix}{n}.{c}" for c, cm in m.named_children() if contains_conv(cm)]
                         if body else [prefix + n])
        return names


@torch.no_grad()
def capture_outputs(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> tuple[dict, torch.Tensor]:
    """Outputs of the named modules for input x (last call wins), and the logits; hooks removed after."""
    outputs, hooks = {}, []
    for name in names:
        def hook(m, inp, out, name=name):
            outputs[name] = out.detach().float().cpu().clone() if torch.is_tensor(out) else None
        hooks.append(resolve_module(model, name).register_forward_hook(hook))
    try:
        model.eval()
        logits = model(x).float().cpu()
    finally:
        for h in hooks:
            h.remove()
    return outputs, logits


def plot_feature_maps(image: torch.Tensor, maps: dict[str, torch.Tensor], ckpt: dict, out: Path,
                      title: str, channels: int = 8, dpi: int = 100) -> None:
    """One row per layer: the input, then its `channels` most active channels (each normalised)."""
    plt = pyplot()
    rows = len(maps)
    cols = channels + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 0.8, 1.75 * rows + 0.6),
                             squeeze=False, layout="constrained")
    rgb = unnormalize(image, ckpt["mean"], ckpt["std"]).numpy()
    for r, (name, fmap) in enumerate(maps.items()):
        fmap = fmap[0]
        axes[r, 0].imshow(rgb)
        axes[r, 0].set_xticks([]), axes[r, 0].set_yticks([])
        axes[r, 0].set_ylabel(f"{name}\n{fmap.shape[0]}x{fmap.shape[1]}x{fmap.shape[2]}", fontsize=8)
        order = fmap.mean((1, 2)).argsort(descending=True)[:channels]
        for c, ax in enumerate(axes[r, 1:]):
            ax.axis("off")
            if c >= len(order):
                continue
            ch = int(order[c])
            ax.imshow(fmap[ch].numpy(), cmap="viridis", interpolation="nearest")
            ax.set_title(f"ch {ch}", fontsize=7, pad=2)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, out, dpi)


def cmd_feature_maps(args, model, ckpt, device) -> Path:
    if args.image:
        path = args.image
        x = load_input(path, ckpt)
    else:
        samples, _ = heldout(ckpt, args.data_dir, args.split)
        path = choose_samples(samples, 1, args.seed)[0][0]
        x = load_input(path, ckpt)
    if args.channels < 1:
        raise UserError(f"--channels must be >= 1, got {args.channels}")
    names = args.layers or conv_stages(model)
    if not names:
        raise UserError("found no conv stages in the model; name them with --layers")
    outputs, logits = capture_outputs(model, x.unsqueeze(0).to(device), names)
    maps = {n: o for n, o in outputs.items() if o is not None and o.ndim == 4}
    skipped = [n for n in names if n not in maps]
    if skipped:
        print(f"note: skipped layers without a 4-D feature map output: {', '.join(skipped)}")
    if not maps:
        raise UserError("none of the layers gives a 4-D feature map")
    maps = {n: maps[n] for n in names if n in maps}
    p = logits.softmax(1)[0]
    pred = int(p.argmax())
    title = (f"Feature maps of {Path(path).name} (predicted {ckpt['class_names'][pred]}, {p[pred]:.0%}): "
             f"the {args.channels} most active channels per layer")
    out = output_dir(args) / f"feature_maps_{Path(path).stem}.png"
    plot_feature_maps(x, maps, ckpt, out, title, args.channels, args.dpi)
    return out


# ----------------------------------------------------------------------------- guided backprop
class _GuidedActivation(torch.autograd.Function):
    """Passes the activation's output forward; backward applies the guided rule (see guided_backprop)."""

    @staticmethod
    def forward(ctx, x, y, fn):
        ctx.save_for_backward(x)
        ctx.fn = fn
        return y.clone()

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (grad_in,) = torch.autograd.grad(ctx.fn(xx), xx, grad_out)  # phi'(x) * grad_out
        return grad_in.clamp(min=0) * (x > 0), None, None


def _guided_hook(module: nn.Module, inputs, output):
    # module.forward (not module()) so the hook does not fire again inside backward.
    return _GuidedActivation.apply(inputs[0], output.detach(), module.forward)


def auto_cam_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The last conv stage's feature map: the layer Grad-CAM and --neuron use by default.

    Found by running x once: the last conv-holding module (not the model itself) whose output is
    a spatial 4-D map; of modules returning the very same tensor (a block and the container
    ending with it) the deepest. A Sequential block that ends in pooling gives the map before the
    pooling instead; norm/activation layers right after it with the same shape are included.
    ConvNet -> features.<last>.2 (the last block's activation, before its max-pool); ResNet ->
    layer4.1; VGG -> features.29 (the last ReLU); EfficientNet -> features.8; timm -> bn2.
    """
    events, hooks = [], []
    for name, m in model.named_modules():
        if name:
            def hook(mod, inp, out, name=name):
                if torch.is_tensor(out) and out.ndim == 4 and out.shape[2] * out.shape[3] > 1:
                    events.append((name, mod, out))
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    conv_idx = [i for i, (_, m, _) in enumerate(events) if contains_conv(m)]
    if not conv_idx:
        raise UserError("the model has no conv layer with a 4-D feature map output; pass --layer NAME")
    last_i = conv_idx[-1]
    last = events[last_i][2]
    name = max((n for n, m, o in events if o is last and contains_conv(m)), key=lambda n: n.count("."))
    module = resolve_module(model, name)
    kids = list(module.named_children()) if isinstance(module, nn.Sequential) else []
    if len(kids) > 1 and isinstance(kids[-1][1], POOLS):
        # A block ending in pooling: use the feature map before it (twice the resolution).
        return f"{name}.{kids[-2][0]}"
    for n, m, o in events[last_i + 1:]:  # e.g. timm's bn2 (batch norm + activation) after conv_head
        if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)):
            continue
        if not (isinstance(m, NORMS + GUIDED_ACTIVATIONS) and o.shape == last.shape):
            break
        name = n
    return name


def parse_neurons(specs: Sequence[str] | None) -> list[tuple[str | None, int]]:
    """'LAYER:INDEX', 'LAYER:A-B' (a range) or 'INDEX' (the auto-picked last conv layer)."""
    out = []
    for spec in specs or []:
        layer, sep, idx = spec.rpartition(":")
        try:
            if "-" in idx:
                a, b = (int(v) for v in idx.split("-"))
                indices = list(range(a, b + 1))
            else:
                indices = [int(idx)]
        except ValueError:
            raise UserError(f"--neuron expects LAYER:INDEX, LAYER:FIRST-LAST or INDEX, got '{spec}'") from None
        if not indices or min(indices) < 0:
            raise UserError(f"--neuron indices must be >= 0 and FIRST <= LAST, got '{spec}'")
        out.extend((layer or None, i) for i in indices)
    return out


def guided_backprop(model: nn.Module, x: torch.Tensor, target: torch.Tensor | Sequence[int] | None = None,
                    neuron: tuple[str, int] | None = None, reduce: str = "max",
                    guided: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided-backpropagation maps d score / d input, same shape as x, and the logits.

    score: the logit of `target` (default: the predicted class) per image, or with
    `neuron=(layer, channel)` that channel's activation map in the named layer, reduced by
    `reduce` ('max': its strongest unit, the classic single neuron; 'sum': the whole map).

    The guided rule (Springenberg et al. 2015), generalised to every activation phi the CNN can
    use: backward through phi passes
        grad_in = 1[x > 0] * max(phi'(x) * grad_out, 0)
    i.e. only positive gradients, and only into units that were "on" in the forward pass. For
    ReLU this is exactly the original rule (phi' = 1[x > 0]). For GELU, SiLU, Mish, ELU and
    LeakyReLU, x > 0 is the region where the unit passes its input on (phi' > 0 there, so the
    clamp only removes negative grad_out); their negative branch is a small, bounded "off"
    response whose gradient, like a dead ReLU's, is exactly what guided backprop suppresses.
    Keeping the true local slope phi'(x) for x > 0 makes the map a real gradient of the network
    restricted to positive paths, not a ReLU-surrogate. Activations are found as modules
    (nn.ReLU, nn.GELU, ...); functional calls such as F.relu inside forward() stay ordinary.

    `guided=False` gives the plain input gradient. The model is deep-copied (in-place
    activations switched off in the copy), so it, its hooks and its gradients are untouched.
    """
    if reduce not in ("max", "sum"):
        raise ValueError(f"reduce must be 'max' or 'sum', got '{reduce}'")
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    hooks, captured = [], {}
    try:
        for m in work.modules():
            if hasattr(m, "inplace"):
                m.inplace = False
            if guided and isinstance(m, GUIDED_ACTIVATIONS):
                hooks.append(m.register_forward_hook(_guided_hook))
        if neuron is not None:
            layer, index = neuron

            def capture(m, inp, out):  # keep this output; later in-place ops get a clone
                if torch.is_tensor(out):
                    captured["act"] = out
                    return out.clone()

            hooks.append(resolve_module(work, layer).register_forward_hook(capture))
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = work(x)
            if neuron is not None:
                act = captured.get("act")
                if act is None or act.ndim != 4:
                    raise UserError(f"--neuron layer '{layer}' gives no 4-D feature map")
                if not 0 <= index < act.shape[1]:
                    raise UserError(f"--neuron index {index} is out of range: '{layer}' has {act.shape[1]} channels")
                ch = act[:, index]
                score = (ch.flatten(1).amax(1) if reduce == "max" else ch.flatten(1).sum(1)).sum()
            else:
                if target is None:
                    target = logits.argmax(1)
                target = torch.as_tensor(target, device=logits.device).view(-1, 1)
                score = logits.gather(1, target).sum()
            (grad,) = torch.autograd.grad(score, x)
    finally:
        for h in hooks:
            h.remove()
    return grad.detach(), logits.detach()


def gradient_image(g: torch.Tensor, std: Sequence[float]) -> torch.Tensor:
    """A (3, H, W) input gradient as an RGB picture: grey = 0, per image scaled by its 99.5th |g| percentile."""
    g = g.detach().float().cpu() / torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)  # pixel space
    scale = torch.quantile(g.abs().flatten(), 0.995).item() or g.abs().max().item() or 1.0
    return (0.5 + 0.5 * g / scale).clamp(0, 1).permute(1, 2, 0)


def cmd_guided_backprop(args, model, ckpt, device) -> Path:
    x, labels, paths = images_for(args, ckpt)
    x = x.to(device)
    names = ckpt["class_names"]
    neurons = []
    for layer, index in parse_neurons(args.neuron):
        neurons.append((layer or auto_cam_layer(model, x), index))
    grads, logits = guided_backprop(model, x, reduce=args.reduce)
    neuron_maps = []
    for layer, index in neurons:
        g, _ = guided_backprop(model, x, neuron=(layer, index), reduce=args.reduce)
        neuron_maps.append(((layer, index), g))
    acts = {}
    if neurons:
        outs, _ = capture_outputs(model, x, sorted({l for l, _ in neurons}))
        acts = {(l, i): outs[l][:, i].flatten(1).amax(1) if args.reduce == "max" else outs[l][:, i].flatten(1).sum(1)
                for l, i in neurons}
    probs = logits.float().softmax(1).cpu()
    plt = pyplot()
    cols = 2 + len(neuron_maps)
    fig, axes = plt.subplots(len(paths), cols, figsize=(2.6 * cols, 2.85 * len(paths) + 0.6),
                             squeeze=False, layout="constrained")
    for r, path in enumerate(paths):
        pred = int(probs[r].argmax())
        true = f"true: {names[labels[r]]}\n" if labels[r] is not None else f"{Path(path).name[:28]}\n"
        panels = [(unnormalize(x[r].cpu(), ckpt["mean"], ckpt["std"]),
                   f"{true}pred: {names[pred]} ({probs[r, pred]:.0%})"),
                  (gradient_image(grads[r], ckpt["std"]), f"guided backprop\nfor '{names[pred]}'")]
        for (layer, index), g in neuron_maps:
            panels.append((gradient_image(g[r], ckpt["std"]),
                           f"neuron {layer}[{index}]\n{args.reduce} act {acts[(layer, index)][r]:.2f}"))
        for ax, (img, title) in zip(axes[r], panels):
            ax.imshow(img.numpy())
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle("Guided backpropagation: input pixels that increase the score (grey = no effect)", fontsize=10)
    out = output_dir(args) / "guided_backprop.png"
    save_figure(fig, out, args.dpi)
    return out


# ----------------------------------------------------------------------------- Grad-CAM
def grad_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor | Sequence[int] | None = None,
             layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Grad-CAM (Selvaraju et al. 2017): (N, H, W) heat maps in [0, 1], the logits, and the layer used.

    cam = relu(sum_k mean_ij(d score / d A_kij) * A_k) of the layer's output A, upsampled to the
    input. `layer` defaults to auto_cam_layer (the last conv stage). The layer's output is cloned
    in the hook so later in-place ops cannot spoil it; hooks are removed and no .grad is written.
    """
    was_training = model.training
    model.eval()
    layer = layer or auto_cam_layer(model, x)
    module = resolve_module(model, layer)
    captured = {}

    def hook(m, inp, out):
        if torch.is_tensor(out):
            captured["act"] = out
            return out.clone()

    handle = module.register_forward_hook(hook)
    try:
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            act = captured.get("act")
            if act is None or act.ndim != 4:
                raise UserError(f"Grad-CAM layer '{layer}' gives no 4-D feature map; choose another --layer")
            if target is None:
                target = logits.argmax(1)
            target = torch.as_tensor(target, device=logits.device).view(-1, 1)
            score = logits.float().gather(1, target).sum()
            (grad,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
        model.train(was_training)
    weights = grad.float().mean((2, 3), keepdim=True)
    cam = torch.relu((weights * act.detach().float()).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).view(-1, 1, 1)
    cam = torch.where(peak > 0, cam / peak.clamp(min=torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
    return cam.cpu(), logits.detach().float().cpu(), layer


def cmd_gradcam(args, model, ckpt, device) -> Path:
    x, labels, paths = images_for(args, ckpt)
    cams, logits, layer = grad_cam(model, x.to(device), layer=args.layer)
    probs = logits.softmax(1)
    names = ckpt["class_names"]
    plt = pyplot()
    n = len(paths)
    per_row = 2 if n > 1 else 1  # image pairs (image, heat map) per row
    rows = math.ceil(n / per_row)
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(5.4 * per_row, 2.9 * rows + 0.6),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, per_row)
        img = unnormalize(x[i], ckpt["mean"], ckpt["std"]).numpy()
        pred = int(probs[i].argmax())
        true = f"true: {names[labels[i]]}" if labels[i] is not None else Path(paths[i]).name[:28]
        axes[r, 2 * c].imshow(img)
        axes[r, 2 * c].set_title(true, fontsize=8)
        axes[r, 2 * c + 1].imshow(img)
        axes[r, 2 * c + 1].imshow(cams[i].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        axes[r, 2 * c + 1].set_title(f"Grad-CAM for '{names[pred]}' ({probs[i, pred]:.0%})", fontsize=8)
    fig.suptitle(f"Grad-CAM at layer '{layer}' for the predicted class (red = most evidence)", fontsize=10)
    out = output_dir(args) / "gradcam.png"
    save_figure(fig, out, args.dpi)
    return out


# ----------------------------------------------------------------------------- confusion
def cmd_confusion(args, model, ckpt, device) -> Path:
    samples, split_name = heldout(ckpt, args.data_dir, args.split)
    loader = data.make_loader(data.ImageListDataset(samples, evaluate.eval_transform(ckpt)), args.batch_size,
                              False, args.workers, pin_memory=device.type == "cuda")
    result = engine.evaluate(model, loader, device, engine.amp_dtype("auto", device), return_outputs=True)
    if result["n"] == 0:
        raise UserError(f"no readable images in {split_name}")
    preds = result["probs"].argmax(1)
    cm = evaluate.confusion_matrix(result["targets"], preds, len(ckpt["class_names"]))
    acc = (preds == result["targets"]).float().mean().item()
    out = output_dir(args) / f"confusion_{args.split}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    evaluate.plot_confusion(cm, ckpt["class_names"], out,
                            title=f"Confusion matrix, {split_name}, {result['n']} images, accuracy {acc:.3f}")
    return out


# ----------------------------------------------------------------------------- curves
def short_labels(names: Sequence[str]) -> list[str]:
    """Run names cut down to the '-'-separated parts that differ between them (time stamps only if needed).

    'parta-f32x2-...-lr1e-03-20250101-120000' and '...-lr5e-03-...' -> 'lr1e-03', 'lr5e-03'.
    """
    if len(names) < 2:
        return list(names)
    parts = [re.findall(r"[^-]+?e-\d+|[^-]+", n) for n in names]
    if len({len(p) for p in parts}) != 1:
        return list(names)
    differ = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    no_time = [i for i in differ if not all(re.fullmatch(r"\d{6}|\d{8}", p[i]) for p in parts)]
    for keep in (no_time, differ):
        labels = ["-".join(p[i] for i in keep) for p in parts]
        if keep and len(set(labels)) == len(labels):
            return labels
    return list(names)


def cmd_curves(args) -> Path:
    histories, dirs = {}, []
    for run in args.run:
        path = Path(run)
        csv_path = path if path.is_file() else path / "metrics.csv"
        if not csv_path.is_file():
            raise UserError(f"--run: no metrics.csv in {run}")
        try:
            hist = engine.read_metrics_csv(csv_path)
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{csv_path}: not a metrics.csv written by training ({e})") from None
        if not hist or not {"epoch", "train_loss", "val_loss", "train_acc", "val_acc"} <= set(hist[0]):
            raise UserError(f"{csv_path}: no epochs with train/val loss and accuracy")
        dirs.append(csv_path.parent)
    labels = short_labels([d.name for d in dirs])
    for label, d in zip(labels, dirs):
        histories[label] = engine.read_metrics_csv(d / "metrics.csv")
    if args.out:
        out = Path(args.out) / ("curves.png" if len(dirs) == 1 else "curves_compare.png")
    else:
        out = dirs[0] / "curves.png" if len(dirs) == 1 else dirs[0].parent / "curves_compare.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    engine.plot_curves(histories, out)
    return out


# ----------------------------------------------------------------------------- W&B
def run_config(args: argparse.Namespace, ckpt: dict | None) -> dict:
    if ckpt is not None:
        return ckpt.get("config", {})
    for run in getattr(args, "run", None) or []:
        p = Path(run)
        f = (p.parent if p.is_file() else p) / "args.json"
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except (OSError, ValueError):
                pass
    return {}


def log_to_wandb(key: str, path: Path, config: dict, out_dir: Path) -> bool:
    """Log one figure to W&B if the run used W&B: offline unless an API key is configured; never prompts."""
    mode = config.get("wandb", "disabled")
    if mode == "disabled":
        print("W&B: the run was trained with --wandb disabled; not logging the figure")
        return False
    ns = argparse.Namespace(wandb="offline" if mode == "offline" else "auto",
                            wandb_project=config.get("wandb_project") or "inat12k",
                            wandb_entity=config.get("wandb_entity"))
    name = f"viz-{Path(str(config.get('run_name') or out_dir.name)).name}"
    logger = engine.WandbLogger(ns, out_dir, name, {"figure": key, **engine.json_safe(config)})
    logged = logger.run is not None
    try:
        logger.log_image(key, path)
    finally:
        logger.finish()
    if logged:
        print(f"W&B: logged '{key}' to {out_dir / 'wandb'}")
    return logged


# ----------------------------------------------------------------------------- CLI
COMMANDS = ("predictions", "filters", "feature_maps", "guided_backprop", "gradcam", "confusion", "curves")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Figures from a trained checkpoint (one PNG per command).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run 'python visualize.py COMMAND -h' for the flags of one command.")
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common")
    add_flag(g, "out", default=None, help="folder for the PNG (default: the checkpoint's folder)")
    add_flag(g, "dpi", type=int, default=110, help="resolution of the PNG (default: %(default)s)")
    add_bool(g, "wandb", False, "also log the figure to W&B, if the run used W&B (offline without an API key)")

    model_common = argparse.ArgumentParser(add_help=False)
    g = model_common.add_argument_group("checkpoint and data")
    add_flag(g, "ckpt", required=True, help="checkpoint file (best.pt or last.pt) or its run folder")
    add_flag(g, "data_dir", default=None, help="dataset root (default: the one the run trained on)")
    add_flag(g, "split", default="test", choices=("test", "val"),
             help="held-out images: test = the val/ or test/ folder; val = the run's validation split "
                  "(default: %(default)s)")
    add_flag(g, "seed", type=int, default=0, help="which held-out images are drawn (default: %(default)s)")
    add_flag(g, "device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")

    def images(p, n_default):
        p.add_argument("--image", nargs="+", metavar="PATH",
                       help="image file(s) to explain (default: --n held-out images)")
        add_flag(p, "n", type=int, default=n_default,
                 help="without --image: this many held-out images, drawn by --seed (default: %(default)s)")

    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("predictions", parents=[model_common, common], help="grid of held-out predictions",
                       description="Held-out images titled with true and predicted class and confidence; "
                                   "wrong predictions framed red, right ones green.")
    add_flag(p, "rows", type=int, default=10, help="grid rows (default: %(default)s)")
    add_flag(p, "cols", type=int, default=3, help="grid columns (default: %(default)s)")
    add_bool(p, "per_class", False, "one row per class with --cols images of it, so every class shows")

    p = sub.add_parser("filters", parents=[model_common, common], help="conv filters as a grid",
                       description="The first conv layer's filters in colour, or another conv layer's "
                                   "(input channels averaged).")
    add_flag(p, "layer", default=None,
             help="module name of a conv layer (or a block: its first conv), from model.named_modules() "
                  "(default: the first Conv2d)")
    add_flag(p, "max_filters", type=int, default=64,
             help="show at most this many filters; 0 = all (default: %(default)s)")

    p = sub.add_parser("feature_maps", parents=[model_common, common],
                       help="activations of each conv stage for one image",
                       description="The most active channels of every conv stage's output for one image.")
    add_flag(p, "image", default=None, help="image file (default: one held-out image drawn by --seed)")
    p.add_argument("--layers", nargs="+", metavar="NAME",
                   help="module names to show (default: the conv stages, e.g. features.0 .. features.4)")
    add_flag(p, "channels", type=int, default=8, help="channels shown per layer (default: %(default)s)")

    p = sub.add_parser("guided_backprop", parents=[model_common, common], help="guided backpropagation maps",
                       description="Guided backpropagation for the predicted class and for chosen neurons.")
    images(p, 4)
    p.add_argument("--neuron", nargs="+", metavar="LAYER:INDEX",
                   help="also excite these neurons: LAYER:INDEX, LAYER:FIRST-LAST, or INDEX of the last conv "
                        "stage (e.g. features.4:0-9)")
    add_flag(p, "reduce", default="max", choices=("max", "sum"),
             help="a neuron's score: its strongest unit (max) or its whole map (sum) (default: %(default)s)")

    p = sub.add_parser("gradcam", parents=[model_common, common], help="Grad-CAM heat maps",
                       description="Grad-CAM heat maps for the predicted class over the image.")
    images(p, 6)
    add_flag(p, "layer", default=None, help="module name whose 4-D output is used (default: the last conv stage)")

    p = sub.add_parser("confusion", parents=[model_common, common], help="confusion matrix on the held-out split",
                       description="Confusion matrix normalised per true class over the held-out split.")
    add_flag(p, "batch_size", type=int, default=128, help="batch size (default: %(default)s)")
    add_flag(p, "workers", type=int, default=min(4, os.cpu_count() or 1),
             help="data loading processes (default: %(default)s)")

    p = sub.add_parser("curves", parents=[common], help="loss and accuracy curves of one or more runs",
                       description="Loss and accuracy per epoch from metrics.csv; several runs overlaid.")
    p.add_argument("--run", nargs="+", required=True, metavar="RUN_DIR",
                   help="run folders (or their metrics.csv); default output: the run folder, or the first "
                        "run's parent folder for several runs")
    return parser


def main(args: argparse.Namespace) -> Path:
    if args.dpi < 20:
        raise UserError(f"--dpi must be >= 20, got {args.dpi}")
    ckpt = None
    if args.command == "curves":
        out = cmd_curves(args)
    else:
        device = engine.select_device(args.device)
        model, ckpt = evaluate.restore_model(args.ckpt, device)
        out = {"predictions": cmd_predictions, "filters": cmd_filters, "feature_maps": cmd_feature_maps,
               "guided_backprop": cmd_guided_backprop, "gradcam": cmd_gradcam,
               "confusion": cmd_confusion}[args.command](args, model, ckpt, device)
    print(f"wrote {out}")
    if args.wandb:
        log_to_wandb(args.command, out, run_config(args, ckpt), out.parent)
    return out


if __name__ == "__main__":
    engine.run_cli(main, get_args_parser())
