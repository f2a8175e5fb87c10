"""No training step waits for the host: no `.item()` and no device-to-host copy in training.train_step.

The step is built by the engine's own builders (fused optimizer, GradScaler, clipping, EMA,
accumulation, MixUp) and run under a TorchDispatchMode that records every scalar read and every
copy off the device. On CPU the same step runs with the same settings (fp16 with an enabled
scaler included), so an `.item()` that comes back fails here on every machine; on CUDA the step
also runs under `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import contextlib
import traceback

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import train_parta
from inat_classifier.devices import Dist
from inat_classifier.training import build_trainer, grad_scaler, train_step

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SCALAR_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
}


class HostReads(TorchDispatchMode):
    """Records ops that make the host wait for `device`: scalar reads, data-dependent shapes, copies off it."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device, self.seen = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        on_device = any(t.device.type == self.device.type for t in tensors)
        copy_off = (
            func is torch.ops.aten._to_copy.default
            and tensors
            and tensors[0].device != torch.device("cpu")
            and kwargs.get("device") == torch.device("cpu")
        ) or (
            func is torch.ops.aten.copy_.default
            and len(tensors) == 2
            and tensors[0].device.type == "cpu"
            and tensors[1].device.type != "cpu"
        )
        if (func in SCALAR_READS and on_device) or copy_off:
            where = [f for f in traceback.extract_stack()[:-1] if "python_dispatch" not in f.filename][-3:]
            self.seen.append(
                f"{func}: " + " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.line}" for f in reversed(where))
            )
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync(device: torch.device):
    """Fails the test when the block reads a device value on the host."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")  # a real sync raises inside the step
    try:
        with HostReads(device) as reads:
            yield
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert not reads.seen, "host syncs in a training step:\n" + "\n".join(reads.seen)


def small_net() -> nn.Module:
    """Conv, batch norm (float and integer buffers) and a linear head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def built_training(device: torch.device, *flags: str):
    """A Trainer exactly as train_parta.py builds it from its flags, around small_net."""
    args = train_parta.get_args_parser().parse_args(["--warmup_epochs", "1", *flags])
    model = small_net().to(device)
    groups = [{"params": list(model.parameters()), "lr": args.lr, "weight_decay": 0.0}]
    return build_trainer(args, model, groups, device, steps_per_epoch=8, num_classes=4, dist=Dist())


def batch(device: torch.device, n: int = 8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=g).to(device), (torch.arange(n) % 4).to(device)


CASES = {
    "fp16_scaler_clip": ["--amp", "off", "--grad_clip", "1.0"],  # fp16 and its scaler set below (CPU refuses the flag)
    "bf16": ["--amp", "bf16"],
    "ema": ["--amp", "off", "--ema", "0.99"],
    "accumulation": ["--amp", "off", "--accum_steps", "2"],
    "mixup": ["--amp", "off", "--mixup", "0.2", "--cutmix", "1.0"],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_a_training_step_never_waits_for_the_host(case, device):
    device = torch.device(device)
    t = built_training(device, *CASES[case])
    if case == "fp16_scaler_clip":
        t.dtype, t.scaler = torch.float16, grad_scaler(device, torch.float16)
        assert t.scaler.is_enabled()
    x, y = batch(device)
    micro = t.accum_steps
    for _ in range(2):  # the second round: optimizer state, EMA counter and scale all exist
        for i in range(micro):
            xb, yb = (x, y) if t.mix is None or device.type != "cpu" else t.mix(x, y)
            with no_host_sync(device):
                if t.mix is not None and device.type != "cpu":
                    xb, yb = t.mix(x, y)  # on CPU the mix draws its factor on the host, by design
                loss, _ = train_step(t, xb, yb, micro, update=i == micro - 1)
    assert torch.isfinite(loss).item()
    if case == "ema":
        assert t.ema.n_averaged.device == x.device and int(t.ema.n_averaged) == 2


def test_the_checker_sees_an_item_call():
    """The detector itself: a plain AdamW on CPU (single-tensor path) reads each step count with .item()."""
    model = small_net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    x, y = batch(torch.device("cpu"))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(AssertionError, match="_local_scalar_dense"):
        with no_host_sync(torch.device("cpu")):
            opt.step()
