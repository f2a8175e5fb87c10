"""Attribution maths on any CNN: layer lookup, captured activations, guided backpropagation and Grad-CAM.

Tensors in, tensors out: nothing here draws or reads files. Hooks are always removed and no
.grad is written; guided backprop works on a deep copy of the model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from inat_classifier.cli import UserError

# Activation modules the guided rule is applied to (each is ~identity for x > 0 and "off" for x < 0).
GUIDED_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


# ----------------------------------------------------------------------------- layers
def resolve_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        hint = ", ".join(convs[:8]) + (", ..." if len(convs) > 8 else "")
        raise UserError(f"no module named '{name}' in the model; conv layers: {hint or 'none'}")
    return modules[name]


def contains_conv(m: nn.Module) -> bool:
    return any(isinstance(c, nn.Conv2d) for c in m.modules())


def conv_layer(model: nn.Module, name: str | None = None) -> tuple[str, nn.Conv2d]:
    """The named Conv2d (a container names its first Conv2d), or the model's first Conv2d."""
    root = resolve_module(model, name) if name else model
    for sub, m in root.named_modules():
        if isinstance(m, nn.Conv2d):
            full = f"{name}.{sub}" if name and sub else (name or sub)
            return full, m
    raise UserError(f"'{name or 'the model'}' contains no Conv2d layer")


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
            names.extend(
                [f"{prefix}{n}.{c}" for c, cm in m.named_children() if contains_conv(cm)] if body else [prefix + n]
            )
        return names


@torch.no_grad()
def capture_outputs(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> tuple[dict, torch.Tensor]:
    """Outputs of the named modules for input x (last call wins), and the logits; hooks removed after."""
    outputs, hooks = {}, []
    try:
        for name in names:

            def hook(m, inp, out, name=name):
                outputs[name] = out.detach().float().cpu().clone() if torch.is_tensor(out) else None

            hooks.append(resolve_module(model, name).register_forward_hook(hook))
        model.eval()
        logits = model(x).float().cpu()
    finally:
        for h in hooks:
            h.remove()
    return outputs, logits


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
    for n, m, o in events[last_i + 1 :]:  # e.g. timm's bn2 (batch norm + activation) after conv_head
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


def guided_backprop(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | Sequence[int] | None = None,
    neuron: tuple[str, int] | None = None,
    reduce: str = "max",
    guided: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    captured: dict = {}
    hooks = _guided_hooks(work, guided, neuron[0] if neuron is not None else None, captured)
    try:
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = work(x)
            if neuron is not None:
                score = _neuron_score(captured.get("act"), *neuron, reduce)
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


def neuron_maps(
    model: nn.Module, x: torch.Tensor, specs: Sequence[str] | None, reduce: str = "max"
) -> list[tuple[tuple[str, int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per --neuron spec: (layer, index), its guided-backprop maps, its score per image ('max' or 'sum'
    of its activation map) and whether it fired per image.

    A neuron that never fires on an image (no unit on, e.g. a dead ReLU) passes no gradient back
    under the guided rule: its map is exactly zero, a grey panel that needs saying so.
    """
    neurons = [(layer or auto_cam_layer(model, x), index) for layer, index in parse_neurons(specs)]
    if not neurons:
        return []
    grads = [guided_backprop(model, x, neuron=n, reduce=reduce)[0] for n in neurons]  # checks each neuron
    outs, _ = capture_outputs(model, x, sorted({layer for layer, _ in neurons}))
    maps = []
    for (layer, index), g in zip(neurons, grads, strict=True):
        ch = outs[layer][:, index].flatten(1)
        maps.append(((layer, index), g, ch.amax(1) if reduce == "max" else ch.sum(1), g.flatten(1).any(1)))
    return maps


def _guided_hooks(work: nn.Module, guided: bool, layer: str | None, captured: dict) -> list:
    """On the working copy: in-place ops off, the guided rule on every activation module, and a
    hook keeping `layer`'s output in captured["act"] (later in-place ops get a clone)."""
    hooks = []
    try:
        for m in work.modules():
            if hasattr(m, "inplace"):
                m.inplace = False
            if guided and isinstance(m, GUIDED_ACTIVATIONS):
                hooks.append(m.register_forward_hook(_guided_hook))
        if layer is not None:

            def capture(m, inp, out):
                if torch.is_tensor(out):
                    captured["act"] = out
                    return out.clone()

            hooks.append(resolve_module(work, layer).register_forward_hook(capture))
    except BaseException:
        for h in hooks:
            h.remove()
        raise
    return hooks


def _neuron_score(act: torch.Tensor | None, layer: str, index: int, reduce: str) -> torch.Tensor:
    """One channel of a captured feature map as a scalar: its strongest unit (max) or its sum, over the batch."""
    if act is None or act.ndim != 4:
        raise UserError(f"--neuron layer '{layer}' gives no 4-D feature map")
    if not 0 <= index < act.shape[1]:
        raise UserError(f"--neuron index {index} is out of range: '{layer}' has {act.shape[1]} channels")
    ch = act[:, index]
    return (ch.flatten(1).amax(1) if reduce == "max" else ch.flatten(1).sum(1)).sum()


# ----------------------------------------------------------------------------- Grad-CAM
def grad_cam(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | Sequence[int] | None = None, layer: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, str]:
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
