"""Optimisation recipe: parameter groups, optimizer, LR schedule, MixUp/CutMix, weight EMA, and the LR finder."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from inat_classifier.cli import UserError


def param_groups_with_decay(
    named_params: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float, name: str
) -> list[dict]:
    """Split parameters so biases and norm weights (1-d) get no weight decay."""
    decay, no_decay = [], []
    for _, p in named_params:
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": name})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": name + "_no_decay"})
    return groups


def build_optimizer(groups: list[dict], args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """--optimizer over the parameter groups (each group keeps its own lr and weight decay).

    Fused kernels where torch has them for the device: one kernel per step, and with an fp16
    GradScaler the step skip on inf/NaN happens on the device, not through a host read of found_inf.
    """
    if args.optimizer == "sgd":
        cls, options = torch.optim.SGD, {"momentum": args.momentum, "nesterov": True}
    else:
        cls, options = (torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam), {}
    try:
        return cls(groups, lr=args.lr, fused=True, **options)
    except RuntimeError:  # no fused kernel for this device or dtype: torch's default implementation
        return cls(groups, lr=args.lr, **options)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of each group's base LR at a given optimizer step."""
    if warmup > 0 and step < warmup:
        return 0.01 + 0.99 * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":  # x0.1 at 1/3 and 2/3 of training
        return 0.1 ** int(3 * progress if progress < 1 else 2)
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """--scheduler with --warmup_epochs, stepped after every batch."""
    total = max(1, args.epochs * steps_per_epoch)
    if args.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=max(0.05, min(0.5, args.warmup_epochs / max(1, args.epochs))),
            cycle_momentum=args.optimizer == "sgd",
        )
    warmup = int(args.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, args.scheduler))


def load_schedule_progress(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    """A saved schedule's progress (its step count), keeping this run's shape (its total steps).

    So `--resume RUN --epochs N` with more epochs stretches the curve over the new total; OneCycleLR
    would otherwise keep the old total from its state and refuse to step past it.
    """
    shape = {k: getattr(scheduler, k) for k in ("total_steps", "_schedule_phases") if hasattr(scheduler, k)}
    scheduler.load_state_dict(state)
    scheduler.__dict__.update(shape)


def build_mix(args: argparse.Namespace, num_classes: int) -> Callable | None:
    """torchvision's MixUp / CutMix on whole batches (soft targets), or None."""
    if not (args.mixup > 0 or args.cutmix > 0):
        return None
    from torchvision.transforms import v2

    mixes = ([v2.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup > 0 else []) + (
        [v2.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix > 0 else []
    )
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def build_ema(model: nn.Module, decay: float) -> nn.Module | None:
    """An EMA of the weights (and buffers) on the model's device, or None when decay is 0."""
    if decay <= 0:
        return None
    if not decay < 1:
        raise UserError(f"--ema must be in (0, 1), got {decay}")
    return DeviceEma(model, decay)


class DeviceEma(AveragedModel):
    """torch's AveragedModel (its copy of the module, `n_averaged` and state dict) with an update of three
    operations that never waits for the host.

    AveragedModel.update_parameters reads `n_averaged` on the host twice per call and copies it to
    the device per dtype group. Here the host keeps its own count of updates (read from the device
    once, when a checkpoint is loaded), so the warm-up weight is a plain number: one fused lerp of
    the floating-point tensors, one fused copy of the integer buffers, one increment of the count.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        first = next(iter(model.parameters()), None)
        super().__init__(model, device=first.device if first is not None else None, use_buffers=True)
        self.decay = decay
        self.updates = 0  # == n_averaged, on the host

    def weight(self) -> float:
        """The share of the model in this update. Warm-up (as timm does): early on the average follows the
        model closely, so short runs are not validated on weights still dominated by the random
        initialisation. Weight 1 at the first update: a copy."""
        n = self.updates
        return 1.0 if n == 0 else 1 - min((1 + n) / (10 + n), self.decay)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [*model.parameters(), *model.buffers()]  # no detach: no_grad, and a view op each
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        counts = [(a, c) for a, c in zip(averaged, current, strict=True) if not a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], self.weight())
        if counts:  # integer buffers (batch-norm step counts) follow the model
            torch._foreach_copy_([a for a, _ in counts], [c for _, c in counts])
        self.n_averaged.add_(1)
        self.updates += 1

    def load_state_dict(self, state_dict, *args, **kwargs):
        result = super().load_state_dict(state_dict, *args, **kwargs)
        self.updates = int(self.n_averaged.item())  # once, at resume
        return result


class EmaWeights:
    """Within the block, the model holds the EMA's weights (for validation and checkpoints)."""

    def __init__(self, model: nn.Module, ema: nn.Module | None) -> None:
        self.model, self.ema, self.backup = model, ema, None

    def __enter__(self):
        if self.ema is not None:
            self.backup = [t.detach().clone() for t in self.tensors(self.model)]
            for dst, src in zip(self.tensors(self.model), self.tensors(self.ema.module), strict=True):
                dst.data.copy_(src.data)
        return self

    def __exit__(self, *exc) -> None:
        if self.backup is not None:
            for dst, src in zip(self.tensors(self.model), self.backup, strict=True):
                dst.data.copy_(src)

    @staticmethod
    def tensors(m: nn.Module) -> list[torch.Tensor]:
        return list(m.parameters()) + [b for b in m.buffers() if b.dtype.is_floating_point]
