"""Building the Trainer: optimizer, loss and precision, then schedule, clipping, EMA, mixing, compile and DDP."""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from inat_classifier.devices import Dist, tune_kernels, wrap_ddp
from inat_classifier.optim import build_ema, build_mix, build_optimizer, build_scheduler
from inat_classifier.precision import amp_dtype, grad_scaler
from inat_classifier.training_step import Trainer


def build_trainer(
    args: argparse.Namespace, model: nn.Module, param_groups: list[dict], device: torch.device
) -> Trainer:
    """Optimizer, loss and precision for `model` in channels-last as asked: what the LR finder steps with."""
    tune_kernels(device)
    if getattr(args, "channels_last", False):
        model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(args.amp, device)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    return Trainer(
        model, build_optimizer(param_groups, args, device), criterion, device, dtype, grad_scaler(device, dtype)
    )


def stepping_module(model: nn.Module, args: argparse.Namespace, dist: Dist, device: torch.device) -> nn.Module:
    """What the steps run through: `model` DDP-wrapped under torchrun, then compiled if --compile.

    Compiling the DDP module (not DDP over a compiled one) lets Dynamo split the graph at DDP's
    buckets, so all-reduces overlap the backward, as PyTorch's DDP + compile notes advise.
    Checkpoints keep the plain module's state.
    """
    wrapped = wrap_ddp(model, dist, device)
    return torch.compile(wrapped) if getattr(args, "compile", False) else wrapped


def complete_trainer(
    plain: Trainer, args: argparse.Namespace, steps_per_epoch: int, num_classes: int, dist: Dist
) -> Trainer:
    """plain plus schedule, clipping, EMA and mixing, its model compiled and DDP-wrapped as asked."""
    model = plain.model
    steps_per_epoch = math.ceil(steps_per_epoch / args.accum_steps)  # the schedule counts optimizer steps
    return Trainer(
        stepping_module(model, args, dist, plain.device),
        plain.optimizer,
        plain.criterion,
        plain.device,
        plain.dtype,
        plain.scaler,
        scheduler=build_scheduler(plain.optimizer, args, steps_per_epoch),
        grad_clip=args.grad_clip,
        ema=build_ema(model, getattr(args, "ema", 0.0)),
        mix=build_mix(args, num_classes),
        accum_steps=args.accum_steps,
    )
