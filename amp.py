"""The one mixed-precision training step: autocast forward, scaled backward, unscale + clip, step, update.

Training, the LR finder and bench.py all step through `train_step`, in the spirit of timm's
NativeScaler: fp16 with a GradScaler (it rescues small gradients from underflow), bf16 and full
precision with a disabled one (a plain step).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cli import UserError


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision."""
    if mode == "auto":
        return torch.float16 if device.type == "cuda" else None
    if mode == "fp16":
        if device.type == "cpu":
            raise UserError("--amp fp16 needs a GPU; use --amp bf16 or off on CPU")
        return torch.float16
    return torch.bfloat16 if mode == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to dtype on device; a no-op context for full precision (dtype None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (CUDA, MPS); a disabled scaler (a plain step) for bf16 and full precision.

    With the fused optimizers of optim.build_optimizer, the scaler's inf/NaN check and step skip
    stay on the device: no host read per step.
    """
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


PRECISION_NAMES = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
AMP_MODE_OF = {"fp32": "off", "fp16": "fp16", "bf16": "bf16"}


def precision_name(dtype: torch.dtype | None) -> str:
    """fp32, fp16 or bf16: what a checkpoint records as the precision its run trains in."""
    return PRECISION_NAMES[dtype]


def saved_precision(ckpt: dict) -> str:
    """The precision a last.pt's run trained in (read back from older files by their scaler and flags)."""
    if ckpt.get("precision") in AMP_MODE_OF:
        return ckpt["precision"]
    if ckpt.get("scaler"):  # only an enabled (fp16) scaler has state
        return "fp16"
    return {"bf16": "bf16", "fp16": "fp16"}.get(ckpt.get("config", {}).get("amp"), "fp32")


def resumed_amp(saved: str, typed: str | None, device: torch.device) -> tuple[str, str | None]:
    """The --amp mode a resumed run continues with, and a one-line note when its precision changes.

    A resume keeps the precision the run started in (`--amp auto` is not worked out again on the
    new machine), unless --amp is typed or the device cannot run it (fp16 on a CPU).
    """
    mode = typed or AMP_MODE_OF[saved]
    reason = "as --amp asks" if typed else ""
    if typed is None and saved == "fp16" and device.type == "cpu":
        mode, reason = "off", "fp16 needs a GPU"
    now = precision_name(amp_dtype(mode, device))
    if now == saved:
        return mode, None
    return mode, f"note: this run trained in {saved}; it continues in {now} on {device.type}" + \
        (f" ({reason})" if reason else "")


@dataclass
class Training:
    """What one optimisation step needs, in one object."""

    model: nn.Module  # what runs on the batch (possibly compiled and DDP-wrapped)
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = full precision
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # stepped after every batch
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    ema: nn.Module | None = None  # an optim.DeviceEma updated after every step
    mix: Callable | None = None  # MixUp/CutMix on the batch, or None
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation)
    pending: int = 0  # micro-batches whose gradients are summed but not yet applied


def train_step(t: Training, x: torch.Tensor, y: torch.Tensor, micro_batches: int = 1,
               update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of (x, y), one of `micro_batches` whose gradients add up (the loss is scaled
    by 1/micro_batches); with `update`, then the optimizer step. Returns the loss and the logits,
    detached (no host sync)."""
    # Under DDP, gradients are all-reduced only on the micro-batch that updates.
    if t.pending == 0:  # the first micro-batch of an optimizer step starts a new sum
        t.optimizer.zero_grad(set_to_none=True)
    sync = nullcontext() if update or not hasattr(t.model, "no_sync") else t.model.no_sync()
    with sync:
        with autocast(t.device, t.dtype):
            out = t.model(x)
            loss = t.criterion(out, y)
        t.scaler.scale(loss if micro_batches == 1 else loss / micro_batches).backward()
    t.pending += 1
    if update:
        apply_update(t)
        t.pending = 0
    return loss.detach(), out.detach()


def apply_update(t: Training) -> None:
    """The optimizer step on the gradients gathered so far: unscale + clip, step, scale update, schedule, EMA."""
    if t.grad_clip > 0:
        t.scaler.unscale_(t.optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(t.model.parameters(), t.grad_clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    if t.scheduler is not None:
        t.scheduler.step()
    if t.ema is not None:
        t.ema.update_parameters(t.model)
