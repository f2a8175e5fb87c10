"""The one training step: autocast forward, scaled backward, then unscale + clip, step, scale update, schedule, EMA.

Training, the LR finder and tools/bench.py all step through `train_step`, in the spirit of timm's
NativeScaler: fp16 with a GradScaler (it rescues small gradients from underflow), bf16 and full
precision with a disabled one (a plain step).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from inat_classifier.precision import autocast


@dataclass
class Trainer:
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


def train_step(
    trainer: Trainer, x: torch.Tensor, y: torch.Tensor, micro_batches: int = 1, update: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of (x, y), one of `micro_batches` whose gradients add up (the loss is scaled
    by 1/micro_batches); with `update`, then the optimizer step. Returns the loss and the logits,
    detached (no host sync)."""
    # Under DDP, gradients are all-reduced only on the micro-batch that updates.
    if trainer.pending == 0:  # the first micro-batch of an optimizer step starts a new sum
        trainer.optimizer.zero_grad(set_to_none=True)
    sync = nullcontext() if update or not hasattr(trainer.model, "no_sync") else trainer.model.no_sync()
    with sync:
        with autocast(trainer.device, trainer.dtype):
            out = trainer.model(x)
            loss = trainer.criterion(out, y)
        trainer.scaler.scale(loss if micro_batches == 1 else loss / micro_batches).backward()
    trainer.pending += 1
    if update:
        apply_update(trainer)
        trainer.pending = 0
    return loss.detach(), out.detach()


def apply_update(trainer: Trainer) -> None:
    """The optimizer step on the gradients gathered so far: unscale + clip, step, scale update, schedule, EMA."""
    if trainer.grad_clip > 0:
        trainer.scaler.unscale_(trainer.optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.grad_clip)
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    if trainer.scheduler is not None:
        trainer.scheduler.step()
    if trainer.ema is not None:
        trainer.ema.update_parameters(trainer.model)
