"""The training loop: `train_one_epoch`, `evaluate` and `fit` (epochs, validation, checkpoints, resume, stop).

Scripts build their model and loaders, then call `fit`; every optimisation step goes through
`amp.train_step`. No step waits for the host: loss and accuracy are summed on the device and
read every SYNC_EVERY steps.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from amp import Training, amp_dtype, autocast, grad_scaler, precision_name, train_step
from checkpoint import (TrainState, atomic_torch_save, checkpoint_payload, load_weights, rng_state,
                        set_rng_state)
from cli import RESULT_FILE, UserError
from data import check_trainable
from devices import Dist, all_reduce_sum, distributed, finish_distributed, sum_dtype, tune_kernels, wrap_ddp
from freezing import set_train_mode
from images import BAD_IMAGES, batch_to_device
from optim import (EmaWeights, build_ema, build_mix, build_optimizer, build_scheduler, load_schedule_progress,
                   run_lr_finder)
from folder_lock import release_folder
from runs import RunSetup, write_metrics_csv, write_result
from sampler import EpochSampler
from storage import remove_stale_temps
from tracking import WandbLogger, plot_curves, progress, say

SYNC_EVERY = 20  # steps between host reads of the running loss (and agreement on stopping under torchrun)


def tell(message: str) -> None:
    """A line on stderr that never fails: stop and save all the same when stderr is gone (closed pipe)."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass


class StopRequested:
    """Turns Ctrl-C / SIGTERM into a flag the loop checks after each step.

    A second signal does not cut the save the first one asked for (it is only noted); a third
    quits at once, for a step that never ends.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self.previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def handle(self, signum, frame) -> None:
        self.count += 1
        if self.count >= 3:
            raise KeyboardInterrupt
        if self.signum is not None:  # e.g. a killed sweep runner's death signal, once per runner thread
            tell(f"{signal.Signals(signum).name}: still saving last.pt; once more quits without saving")
            return
        self.signum = signum
        tell(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pt ...")

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signum is not None


class NonFiniteLoss(Exception):
    pass


def check_finite_weights(model: nn.Module, epoch: int, step: int) -> None:
    """Never save weights an overflowing update made NaN/inf as a 'good' checkpoint."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]  # BN statistics too
    if not torch.stack([torch.isfinite(t).all() for t in tensors]).all().item():
        raise NonFiniteLoss(f"weights became non-finite at epoch {epoch}, batch {step}")


class EpochMeter:
    """Loss and accuracy of one epoch: summed on the device each step, read by the host at sync points."""

    def __init__(self, device: torch.device, partial: dict) -> None:
        self.device = device
        self.sums = {"loss": 0.0, "correct": 0.0, "seen": 0, **partial}  # host side, as saved mid-epoch
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite batch
        self.pending = 0  # images added since the last sync
        self.t0, self.images = time.perf_counter(), 0

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor, step: int) -> None:
        loss = loss.float()
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)
        self.loss += loss * y.shape[0]
        self.correct += (out.argmax(1) == (y if y.ndim == 1 else y.argmax(1))).sum()
        self.pending += y.shape[0]
        self.images += y.shape[0]

    def sync(self, epoch: int, step: int) -> None:
        """Move the device sums to the host; raise NonFiniteLoss on every process if any saw one."""
        loss, correct, bad = self.loss.item(), self.correct.item(), int(self.first_bad.item())
        failed = bad >= 0 or not math.isfinite(loss)
        if distributed():  # every process must stop together, or the others wait forever
            failed = all_reduce_sum([float(failed)], self.device)[0] > 0
        if failed:
            raise NonFiniteLoss(f"loss became {loss} at epoch {epoch}, batch {bad if bad >= 0 else step}")
        self.sums["loss"] += loss
        self.sums["correct"] += correct
        self.sums["seen"] += self.pending
        self.loss.zero_(), self.correct.zero_()
        self.pending = 0

    def postfix(self) -> dict:
        seen = max(1, self.sums["seen"])
        return {"loss": f"{self.sums['loss'] / seen:.3f}", "acc": f"{self.sums['correct'] / seen:.3f}",
                "img_s": f"{self.images / (time.perf_counter() - self.t0):.0f}"}

    def totals(self) -> dict:
        """train_loss and train_acc over all processes."""
        loss, correct, seen = all_reduce_sum([self.sums["loss"], self.sums["correct"], float(self.sums["seen"])],
                                             self.device)
        return {"train_loss": loss / max(1, seen), "train_acc": correct / max(1, seen)}


def stop_agreed(stop: StopRequested, step: int, checkpoint_due: bool, device: torch.device) -> bool:
    """Whether to stop after this step; under torchrun all processes decide together, at shared points."""
    if not distributed():
        return bool(stop)
    if not (step % SYNC_EVERY == 0 or checkpoint_due):
        return False
    stopping = all_reduce_sum([float(bool(stop))], device)[0] > 0
    if stopping:
        stop.signum = stop.signum or signal.SIGTERM  # a process the signal did not reach stops too
    return stopping


def readable_batches(loader: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) of each loader batch on the device, without the batches whose images were all unreadable.

    Under torchrun every process must take the same steps (the all-reduces pair them up), so
    there such a batch is replaced by the previous readable one (the next one, early in an epoch).
    """
    fill = distributed()
    last, owed = None, 0
    for batch in loader:
        moved = batch_to_device(batch, device)
        if moved is None:
            if fill and last is not None:
                yield last
            owed += fill and last is None
            continue
        for _ in range(owed + 1):
            yield moved
        last, owed = moved, 0
    if owed:  # the other processes would wait for these steps forever
        raise UserError("every image this process was given in the epoch is unreadable")


def train_one_epoch(training: Training, loader: Iterable, epoch: int, args: argparse.Namespace, state: TrainState,
                    stop: StopRequested, save_mid_epoch: Callable[[int, dict], None]) -> dict:
    """One pass over the training data; returns train_loss and train_acc ({} when stopped mid-epoch)."""
    set_train_mode(training.model)
    meter = EpochMeter(training.device, state.partial)
    step, k = state.batches_done, training.accum_steps
    total = step + len(loader)  # a resumed epoch's loader holds only the batches still to come
    bar = progress(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, total=len(loader))
    for x, y in readable_batches(bar, training.device):
        if training.mix is not None:
            x, y = training.mix(x, y)  # soft targets; accuracy counts the dominant class
        micro = min(k, total - step // k * k)  # micro-batches of this optimizer step (fewer at the end)
        update = step + 1 - step // k * k == micro
        loss, out = train_step(training, x, y, micro, update)
        step += 1
        meter.add(loss, out, y, step)
        # Saves and stops only between optimizer steps: a resume never loses accumulated gradients.
        every = args.save_every
        checkpoint_due = update and bool(every) and (step - micro) // every < step // every
        stopping = update and stop_agreed(stop, step, checkpoint_due, training.device)
        if step % SYNC_EVERY == 0 or stopping or checkpoint_due:
            meter.sync(epoch, step)
            bar.set_postfix(meter.postfix())
        if stopping or checkpoint_due:
            check_finite_weights(training.model, epoch, step)
            save_mid_epoch(step, dict(meter.sums))
            if stopping:
                bar.close()
                return {}
    meter.sync(epoch, step)
    check_finite_weights(training.model, epoch, step)
    bar.close()
    return meter.totals()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype | None = None,
             criterion: nn.Module | None = None) -> dict:
    """Loss and accuracy over a loader, each sample counted once over all processes."""
    model.eval()
    criterion = criterion or nn.CrossEntropyLoss()
    loss_sum = torch.zeros((), device=device, dtype=sum_dtype(device))
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for batch in loader:
        moved = batch_to_device(batch, device)
        if moved is None:
            continue
        x, y = moved
        with autocast(device, dtype):
            out = model(x)
        out = out.float()
        loss_sum += criterion(out, y).to(loss_sum.dtype) * y.shape[0]
        correct += (out.argmax(1) == y).sum()
        n += y.shape[0]
    total_loss, total_correct, n = all_reduce_sum([loss_sum.item(), float(correct.item()), float(n)], device)
    return {"loss": total_loss / max(1, n), "acc": total_correct / max(1, n), "n": int(n)}


def plain_training(args: argparse.Namespace, model: nn.Module, param_groups: list[dict],
                   device: torch.device) -> Training:
    """Optimizer, loss and precision for `model` in channels-last as asked: what the LR finder steps with."""
    tune_kernels(device)
    if getattr(args, "channels_last", False):
        model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(args.amp, device)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    return Training(model, build_optimizer(param_groups, args, device), criterion, device, dtype, grad_scaler(device, dtype))


def stepping_module(model: nn.Module, args: argparse.Namespace, dist: Dist, device: torch.device) -> nn.Module:
    """What the steps run through: `model` DDP-wrapped under torchrun, then compiled if --compile.

    Compiling the DDP module (not DDP over a compiled one) lets Dynamo split the graph at DDP's
    buckets, so all-reduces overlap the backward, as PyTorch's DDP + compile notes advise.
    Checkpoints keep the plain module's state.
    """
    wrapped = wrap_ddp(model, dist, device)
    return torch.compile(wrapped) if getattr(args, "compile", False) else wrapped


def full_training(plain: Training, args: argparse.Namespace, steps_per_epoch: int, num_classes: int,
                  dist: Dist) -> Training:
    """plain plus schedule, clipping, EMA and mixing, its model compiled and DDP-wrapped as asked."""
    model = plain.model
    steps_per_epoch = math.ceil(steps_per_epoch / args.accum_steps)  # the schedule counts optimizer steps
    return Training(stepping_module(model, args, dist, plain.device), plain.optimizer, plain.criterion, plain.device,
                    plain.dtype, plain.scaler, scheduler=build_scheduler(plain.optimizer, args, steps_per_epoch),
                    grad_clip=args.grad_clip, ema=build_ema(model, getattr(args, "ema", 0.0)),
                    mix=build_mix(args, num_classes), accum_steps=args.accum_steps)


class Checkpointer:
    """Writes a run's best.pt and last.pt (rank 0 only); the EMA's weights when there is one."""

    def __init__(self, run_dir: Path, meta: dict, model: nn.Module, save_model: nn.Module, training: Training,
                 train_loader: Iterable, enabled: bool) -> None:
        self.run_dir, self.meta, self.enabled = run_dir, meta, enabled
        self.model, self.save_model = model, save_model  # what trains; what the files hold (contains it)
        self.training, self.train_loader = training, train_loader

    def save_best(self, state: TrainState) -> None:
        if self.enabled:
            with EmaWeights(self.model, self.training.ema):  # the weights that were validated
                atomic_torch_save(checkpoint_payload(self.meta, self.save_model, state), self.run_dir / "best.pt")

    def save_last(self, state: TrainState, batches_done: int = 0, partial: dict | None = None) -> None:
        if not self.enabled:
            return
        t = self.training
        with EmaWeights(self.model, t.ema):
            payload = checkpoint_payload(self.meta, self.save_model, state)
        payload.update(optimizer=t.optimizer.state_dict(), scheduler=t.scheduler.state_dict(),
                       scaler=t.scaler.state_dict(), precision=precision_name(t.dtype), rng=rng_state(t.device),
                       batches_done=batches_done,
                       partial=partial or {})
        if getattr(self.train_loader, "generator", None) is not None:
            payload["loader_rng"] = self.train_loader.generator.get_state()
        if t.ema is not None:
            payload["ema"] = t.ema.state_dict()
            payload["train_state"] = {k: v.detach().clone() for k, v in self.save_model.state_dict().items()}
        atomic_torch_save(payload, self.run_dir / "last.pt")


def resume_training(ckpt: dict, training: Training, save_model: nn.Module, run_dir: Path) -> TrainState:
    """Weights, optimizer, schedule, loss scale, RNGs and EMA from last.pt: the run continues exactly."""
    load_weights(save_model, ckpt.get("train_state", ckpt["model_state"]), run_dir / "last.pt")
    training.optimizer.load_state_dict(ckpt["optimizer"])
    load_schedule_progress(training.scheduler, ckpt["scheduler"])
    if ckpt["scaler"] and training.scaler.is_enabled():  # a run that now starts fp16 starts a fresh scale
        training.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], training.device)
    if training.ema is not None and "ema" in ckpt:
        training.ema.load_state_dict(ckpt["ema"])
    state = TrainState(ckpt["epoch"], ckpt["metrics"], ckpt["best_val_acc"], ckpt["best_epoch"],
                       ckpt.get("batches_done", 0), ckpt.get("partial", {}))
    print(f"resuming {run_dir} after epoch {state.epoch}"
          + (f", batch {state.batches_done}" if state.batches_done else ""))
    return state


def seed_epoch(setup: RunSetup, train_loader: Iterable, epoch: int, state: TrainState) -> None:
    """Fix the epoch's batch order and random draws, so a resumed run repeats them exactly."""
    args, rank = setup.args, setup.dist.rank
    sampler = getattr(train_loader, "sampler", None)
    if isinstance(sampler, EpochSampler):
        sampler.set_epoch(epoch, state.batches_done * setup.rank_batch_size)
    generator = getattr(train_loader, "generator", None)
    if state.batches_done and setup.resume is not None:
        # Resumed mid-epoch: the saved RNG states continue the epoch where it stopped.
        if generator is not None and "loader_rng" in setup.resume:
            generator.set_state(setup.resume["loader_rng"])
    else:
        # Per-epoch seeds make a resumed run draw the same augmentations and dropout.
        torch.manual_seed(args.seed * 1000 + epoch + 7919 * rank)
        if generator is not None:
            generator.manual_seed(args.seed * 1000 + epoch + 7919 * rank)


def record_epoch(setup: RunSetup, state: TrainState, row: dict, saver: Checkpointer, logger: WandbLogger) -> None:
    """Add the epoch to the history; rank 0 writes best.pt, last.pt, metrics.csv, curves and the log line."""
    bad = BAD_IMAGES.take_epoch_count()
    state.history.append(row)
    state.epoch = row["epoch"]
    improved = row["val_acc"] > state.best_val_acc
    if improved:
        state.best_val_acc, state.best_epoch = row["val_acc"], row["epoch"]
        saver.save_best(state)
    saver.save_last(state)
    if not setup.dist.main:
        return
    write_metrics_csv(setup.run_dir, state.history)
    plot_curves({setup.run_dir.name: state.history}, setup.run_dir / "curves.png")
    logger.log({**row, "skipped_images": bad}, step=row["epoch"])
    say(f"epoch {row['epoch']:>3}/{setup.args.epochs}  train_loss {row['train_loss']:.4f}  "
        f"train_acc {row['train_acc']:.4f}  val_loss {row['val_loss']:.4f}  "
        f"val_acc {row['val_acc']:.4f}  lr {row['lr']:.2e}  {row['epoch_time']:.1f}s"
        + (f"  ({bad} unreadable images skipped)" if bad else "") + ("  *" if improved else ""))


def run_epochs(setup: RunSetup, training: Training, train_loader: Iterable, val_loader: Iterable, state: TrainState,
               saver: Checkpointer, logger: WandbLogger, on_epoch_start: Callable[[int], bool] | None) -> None:
    """Train and validate epoch by epoch until --epochs, --patience or a stop signal (KeyboardInterrupt)."""
    args = setup.args
    first = state.epoch + 1
    with StopRequested() as stop:
        for epoch in progress(range(state.epoch + 1, args.epochs + 1), desc="epochs", initial=state.epoch,
                              total=args.epochs):
            if on_epoch_start is not None and on_epoch_start(epoch) and setup.dist.world > 1:
                # DDP only syncs what was trainable when it wrapped: wrap (and compile) the new set
                training.model = stepping_module(saver.model, args, setup.dist, training.device)
            seed_epoch(setup, train_loader, epoch, state)
            t0 = time.perf_counter()
            train = train_one_epoch(training, train_loader, epoch, args, state, stop,
                                    lambda step, sums: saver.save_last(state, step, sums))
            if stop:
                raise KeyboardInterrupt
            if epoch == first and not distributed():  # truncated files pass the header check; now all were read
                check_trainable(setup.classes, setup.train_samples, BAD_IMAGES.seen, setup.root / "train")
            state.batches_done, state.partial = 0, {}
            with EmaWeights(saver.model, training.ema):
                val = evaluate(training.model, val_loader, training.device, training.dtype, training.criterion)
            record_epoch(setup, state, {"epoch": epoch, **train, "val_loss": val["loss"], "val_acc": val["acc"],
                                        "lr": training.optimizer.param_groups[0]["lr"],
                                        "epoch_time": time.perf_counter() - t0}, saver, logger)
            if args.patience and epoch - state.best_epoch >= args.patience:
                print(f"early stop: no better val_acc for {args.patience} epochs")
                break


def fit(setup: RunSetup, model: nn.Module, train_loader: Iterable, val_loader: Iterable, param_groups: list[dict],
        meta: dict, device: torch.device, save_model: nn.Module | None = None,
        on_epoch_start: Callable[[int], bool] | None = None) -> TrainState:
    """Train with AMP, validate, checkpoint and log every epoch; resumable and interruptible.

    `model` is what runs on each batch; `save_model` (default `model`) is what the checkpoints
    hold, e.g. the full network when only its head trains on cached features. `meta`
    (checkpoint.checkpoint_meta) goes into every checkpoint. `on_epoch_start(epoch)` returns True
    when it changed which parameters train. Under torchrun, rank 0 alone writes files and W&B.
    """
    args, run_dir, main = setup.args, setup.run_dir, setup.dist.main
    save_model = save_model or model
    plain = plain_training(args, model, param_groups, device)
    if getattr(args, "lr_find", False):
        run_lr_finder(plain, train_loader, run_dir, main)
        finish_distributed()
        return TrainState()
    training = full_training(plain, args, len(train_loader), len(meta["class_names"]), setup.dist)
    state = resume_training(setup.resume, training, save_model, run_dir) if setup.resume else TrainState()
    if state.epoch >= args.epochs:
        print(f"nothing to train: {run_dir} has trained all its {state.epoch} epochs; "
              f"add --epochs N to train it further")
        finish_distributed()
        return state
    if main:
        (run_dir / RESULT_FILE).unlink(missing_ok=True)  # complete again only when these epochs are done
        remove_stale_temps(run_dir)  # of a save cut by kill -9
    logger = WandbLogger(args, run_dir, run_dir.name, meta["config"]) if main else WandbLogger.off()
    saver = Checkpointer(run_dir, meta, model, save_model, training, train_loader, enabled=main)
    try:
        run_epochs(setup, training, train_loader, val_loader, state, saver, logger, on_epoch_start)
    except KeyboardInterrupt:
        logger.finish()
        if not (run_dir / "last.pt").exists():
            raise  # nothing saved yet: cli.run_cli says how to start the run again
        if main:
            tell(f"interrupted: progress is in {run_dir / 'last.pt'}; continue with --resume {run_dir}")
        sys.exit(130)
    except NonFiniteLoss as e:
        logger.finish()
        last_good = run_dir / "last.pt"
        message = (f"{e}; stopped instead of training on garbage. Last good checkpoint: "
                   f"{last_good if last_good.exists() else 'none yet'} (try a lower --lr or --grad_clip)")
        if distributed():  # every process stopped at the same batch; rank 0 says why, in one line
            if main:
                print(f"error: {message}", file=sys.stderr, flush=True)
            finish_distributed()  # after the print: torchrun stops the others once one has exited
            sys.exit(2)
        raise UserError(message) from None
    except Exception:  # never leave a W&B run open on an unexpected error
        logger.finish()
        raise
    logger.close(state.best_val_acc, run_dir / "curves.png")
    if main:
        write_result(run_dir, state.epoch, state.best_val_acc, state.best_epoch)
    finish_distributed()
    return state


def report(setup: RunSetup, state: TrainState) -> None:
    """The closing lines of a training script (rank 0 only); its run folder is free for the next process."""
    release_folder(setup.run_dir)
    if setup.dist.main and not getattr(setup.args, "lr_find", False):
        print(f"run folder: {setup.run_dir}")
        print(f"best val_acc: {state.best_val_acc:.4f} (epoch {state.best_epoch})")
