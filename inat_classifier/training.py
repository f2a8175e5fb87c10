"""Training: the Trainer, built in one call, its one step, its precision and the LR range test that steps it.

Training, the LR finder and tools/bench.py all step through `train_step`, in the spirit of timm's
NativeScaler: fp16 with a GradScaler (it rescues small gradients from underflow), bf16 and full
precision with a disabled one (a plain step). `amp_dtype` picks the precision: bf16 on CUDA GPUs
that have it, fp16 on older ones, full precision elsewhere.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from inat_classifier.class_balance import balanced_class_weights
from inat_classifier.cli import UserError
from inat_classifier.devices import Dist, tune_kernels, wrap_ddp
from inat_classifier.figures import pyplot
from inat_classifier.freezing import set_train_mode
from inat_classifier.images import batch_to_device
from inat_classifier.optim import build_ema, build_mix, build_optimizer, build_scheduler
from inat_classifier.storage import save_png


# ----------------------------------------------------------------------------- precision
def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision. auto: bf16 on CUDA GPUs that have it (Ampere and
    later, compute capability 8), fp16 with a GradScaler on older ones, full precision elsewhere."""
    if mode == "auto":  # bf16 needs no loss scaling: fewer kernels a step, no skipped steps
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
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
    return mode, f"note: this run trained in {saved}; it continues in {now} on {device.type}" + (
        f" ({reason})" if reason else ""
    )


# ----------------------------------------------------------------------------- the step
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
    module: nn.Module | None = None  # the plain model inside `model` (None: `model` itself)
    wrap: Callable[[nn.Module], nn.Module] | None = None  # how `model` was made from `module`
    stepped_lr: float | None = None  # the LR of the last optimizer step (the first parameter group's)

    @property
    def plain(self) -> nn.Module:
        return self.module if self.module is not None else self.model

    @property
    def step_lr(self) -> float:
        """The LR the last optimizer step used, the epoch's LR in metrics.csv (the LR after the step would
        show a cosine run's last epoch as trained at 0); before any step, the LR the next one will use."""
        return self.stepped_lr if self.stepped_lr is not None else self.optimizer.param_groups[0]["lr"]

    def rewrap(self) -> None:
        """Wrap the plain model anew after its trainable parameters changed: DDP syncs only what was
        trainable when it wrapped (and a compiled graph knows only that set)."""
        if self.wrap is not None:
            self.model = self.wrap(self.plain)


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
    trainer.stepped_lr = trainer.optimizer.param_groups[0]["lr"]  # before the schedule moves it on
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    if trainer.scheduler is not None:
        trainer.scheduler.step()
    if trainer.ema is not None:
        trainer.ema.update_parameters(trainer.model)


# ----------------------------------------------------------------------------- building the Trainer
def build_trainer(
    args: argparse.Namespace,
    model: nn.Module,
    param_groups: list[dict],
    device: torch.device,
    steps_per_epoch: int,
    num_classes: int,
    dist: Dist,
    class_counts: Sequence[int] | None = None,
) -> Trainer:
    """Everything a run steps with, in one call: optimizer, loss and precision; schedule, clipping, EMA and
    mixing; `model` in channels-last as asked, DDP-wrapped under torchrun and compiled with --compile.

    `class_counts` (the training split's photos per class) weighs the loss with --class_weights balanced.
    """
    tune_kernels(device)
    if getattr(args, "channels_last", False):
        model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(args.amp, device)
    optimizer = build_optimizer(param_groups, args, device)
    optimizer_steps = math.ceil(steps_per_epoch / args.accum_steps)  # what the schedule counts

    def wrap(plain: nn.Module) -> nn.Module:
        return stepping_module(plain, args, dist, device)

    return Trainer(
        wrap(model),
        optimizer,
        build_criterion(args, class_counts, device),
        device,
        dtype,
        grad_scaler(device, dtype),
        scheduler=build_scheduler(optimizer, args, optimizer_steps),
        grad_clip=args.grad_clip,
        ema=build_ema(model, getattr(args, "ema", 0.0)),
        mix=build_mix(args, num_classes),
        accum_steps=args.accum_steps,
        module=model,
        wrap=wrap,
    )


class SampleMeanCrossEntropy(nn.CrossEntropyLoss):
    """Class-weighted cross-entropy averaged over the batch's samples, not over their weights as
    nn.CrossEntropyLoss averages: balanced weights average 1 over the training split, so a batch's loss
    estimates the split's weighted mean, and batches split over torchrun processes or --accum_steps
    micro-batches still add up to the step of the whole batch."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            input, target, weight=self.weight, label_smoothing=self.label_smoothing, reduction="none"
        ).mean()


def build_criterion(args: argparse.Namespace, class_counts: Sequence[int] | None, device: torch.device) -> nn.Module:
    """The training loss: cross-entropy with --label_smoothing, weighted per class with --class_weights balanced
    (the weights made once, on the device)."""
    if getattr(args, "class_weights", "none") == "none":
        return nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    if class_counts is None:
        raise ValueError("--class_weights balanced needs the training split's class counts")
    weight = balanced_class_weights(class_counts).to(device)
    return SampleMeanCrossEntropy(weight=weight, label_smoothing=args.label_smoothing)


def stepping_module(model: nn.Module, args: argparse.Namespace, dist: Dist, device: torch.device) -> nn.Module:
    """What the steps run through: `model` DDP-wrapped under torchrun, then compiled if --compile.

    Compiling the DDP module (not DDP over a compiled one) lets Dynamo split the graph at DDP's
    buckets, so all-reduces overlap the backward, as PyTorch's DDP + compile notes advise.
    Checkpoints keep the plain module's state.
    """
    wrapped = wrap_ddp(model, dist, device)
    return torch.compile(wrapped) if getattr(args, "compile", False) else wrapped


# ----------------------------------------------------------------------------- the LR range test
def lr_range_test(
    trainer: Trainer, loader: Iterable, start: float = 1e-7, end: float = 10.0, steps: int = 200
) -> tuple[list, list, float]:
    """Exponentially increase the LR step by step, recording the smoothed loss; restores everything.

    Each step is the training step itself (AMP, loss scaling), without schedule, EMA or clipping.
    Returns (lrs, losses, suggestion); see suggest_lr.
    """
    if len(loader) == 0:
        raise UserError("--lr_find: the training loader is empty (lower --batch_size)")
    model, optimizer = trainer.plain, trainer.optimizer
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    # The plain model, alone in each process (under torchrun each stops where its own loss diverges),
    # and no clipping, which would hide the divergence the test looks for.
    probe = copy.copy(trainer)
    probe.model, probe.scheduler, probe.ema, probe.grad_clip = model, None, None, 0.0
    base = [g["lr"] for g in optimizer.param_groups]  # keep the groups' LR ratios
    gamma = (end / start) ** (1 / max(1, steps - 1))
    lrs, losses, smooth, best = [], [], None, math.inf
    set_train_mode(model)
    batches = iter(loader)
    try:
        for i in range(steps):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            moved = batch_to_device(batch, trainer.device)
            if moved is None:
                continue
            lr = start * gamma**i
            for g, b in zip(optimizer.param_groups, base, strict=True):
                g["lr"] = lr * b / base[0]
            loss, _ = train_step(probe, *moved)
            smooth = 0.98 * (smooth or 0.0) + 0.02 * loss.item()
            corrected = smooth / (1 - 0.98 ** (len(losses) + 1))  # debiased running mean
            lrs.append(lr)
            losses.append(corrected)
            best = min(best, corrected)
            if not math.isfinite(corrected) or corrected > 4 * best:
                break  # diverged: the rest of the range tells nothing
    finally:
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
    return lrs, losses, suggest_lr(lrs, losses)


def suggest_lr(lrs: list[float], losses: list[float]) -> float:
    """A tenth of the LR at the lowest smoothed loss: the classic, robust rule of thumb."""
    if not lrs:
        return float("nan")
    return lrs[losses.index(min(losses))] / 10


def run_lr_finder(trainer: Trainer, loader: Iterable, run_dir: Path, main: bool) -> float:
    """The LR range test with its plot (lr_find.png) and suggestion, printed by rank 0."""
    lrs, losses, suggestion = lr_range_test(trainer, loader)
    if main:
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        ax.plot(lrs, losses)
        ax.axvline(suggestion, color="C3", ls="--", label=f"suggestion {suggestion:.1e}")
        ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title="LR range test")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        try:
            save_png(fig, run_dir / "lr_find.png")
        finally:
            plt.close(fig)
        print(f"LR finder: suggested --lr {suggestion:.1e} (plot: {run_dir / 'lr_find.png'}); model restored")
    return suggestion
