"""The training loop: `train_one_epoch`, `evaluate` and `fit` (epochs, validation, checkpoints, resume, stop).

Scripts build their model and loaders, then call `fit`; every optimisation step goes through
`training.train_step`. No step waits for the host: loss and accuracy are summed on the device and
read every SYNC_EVERY steps.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from inat_classifier.checkpoint import (
    TrainState,
    atomic_torch_save,
    checkpoint_payload,
    load_weights,
    rng_state,
    set_rng_state,
)
from inat_classifier.class_balance import class_counts
from inat_classifier.cli import RESULT_FILE, UserError
from inat_classifier.dataset import check_trainable
from inat_classifier.device_batches import EpochSampler
from inat_classifier.devices import (
    agreed_stop,
    all_reduce_sum,
    distributed,
    finish_distributed,
    matched_batches,
    sum_dtype,
)
from inat_classifier.folder_lock import release_folder
from inat_classifier.freezing import set_train_mode
from inat_classifier.images import BAD_IMAGES, batch_to_device
from inat_classifier.optim import EmaWeights, load_schedule_progress
from inat_classifier.runs import RunSetup, epoch_line, write_metrics_csv, write_result
from inat_classifier.storage import remove_stale_temps
from inat_classifier.tracking import WandbLogger, plot_curves, progress, say
from inat_classifier.training import (
    Trainer,
    autocast,
    build_trainer,
    precision_name,
    run_lr_finder,
    train_step,
)

SYNC_EVERY = 20  # steps between host reads of the running loss (and agreement on stopping under torchrun)


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
            say(f"{signal.Signals(signum).name}: still saving last.pt; once more quits without saving", err=True)
            return
        self.signum = signum
        say(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pt ...", err=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signum is not None

    def agreed(self, shared_point: bool, device: torch.device) -> bool:
        """Whether to stop after this step: under torchrun all processes decide together at shared points
        (devices.agreed_stop), and one the signal did not reach stops too."""
        if not agreed_stop(bool(self), shared_point, device):
            return False
        self.signum = self.signum or signal.SIGTERM
        return True


class NonFiniteLoss(Exception):
    pass


def check_finite_weights(model: nn.Module, epoch: int, step: int) -> None:
    """Never save weights an overflowing update made NaN/inf as a 'good' checkpoint."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]  # BN statistics too
    if not torch.stack([torch.isfinite(t).all() for t in tensors]).all().item():
        raise NonFiniteLoss(f"weights became non-finite at epoch {epoch}, batch {step}")


class EpochMeter:
    """Loss and accuracy of one epoch: kept on the device each step, read by the host at sync points.

    A step writes its loss into a slot of a small device buffer and adds its correct count: four
    operations (argmax, compare, sum, add) plus a copy. The host reads the buffer at each sync,
    finds the first non-finite loss there and sums the losses weighted by the batch sizes it knows.
    """

    def __init__(self, device: torch.device, partial: dict) -> None:
        self.device = device
        self.sums = {"loss": 0.0, "correct": 0.0, "seen": 0, **partial}  # host side, as saved mid-epoch
        self.losses = torch.zeros(SYNC_EVERY, device=device)  # each step's mean loss since the last sync
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.sizes: list[int] = []  # each step's batch size since the last sync
        self.t0, self.images = time.perf_counter(), 0

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor, step: int) -> None:
        self.losses[len(self.sizes)] = loss
        self.correct += (out.argmax(1) == (y if y.ndim == 1 else y.argmax(1))).sum()
        self.sizes.append(y.shape[0])
        self.images += y.shape[0]

    def sync(self, epoch: int, step: int) -> None:
        """Move the device sums to the host; raise NonFiniteLoss on every process if any saw one."""
        losses, correct = self.losses[: len(self.sizes)].tolist(), self.correct.item()
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        failed = bad is not None
        if distributed():  # every process must stop together, or the others wait forever
            failed = all_reduce_sum([float(failed)], self.device)[0] > 0
        if failed:
            value, at = (losses[bad], step - len(losses) + 1 + bad) if bad is not None else ("nan", step)
            raise NonFiniteLoss(f"loss became {value} at epoch {epoch}, batch {at}")
        self.sums["loss"] += sum(v * n for v, n in zip(losses, self.sizes, strict=True))
        self.sums["correct"] += correct
        self.sums["seen"] += sum(self.sizes)
        self.correct.zero_()
        self.sizes = []

    def postfix(self) -> dict:
        seen = max(1, self.sums["seen"])
        return {
            "loss": f"{self.sums['loss'] / seen:.3f}",
            "acc": f"{self.sums['correct'] / seen:.3f}",
            "img_s": f"{self.images / (time.perf_counter() - self.t0):.0f}",
        }

    def totals(self) -> dict:
        """train_loss and train_acc over all processes."""
        loss, correct, seen = all_reduce_sum(
            [self.sums["loss"], self.sums["correct"], float(self.sums["seen"])], self.device
        )
        return {"train_loss": loss / max(1, seen), "train_acc": correct / max(1, seen)}


def micro_batch_place(step: int, accum_steps: int, total: int) -> tuple[int, bool]:
    """For batch `step` (0-based) of an epoch of `total`: how many micro-batches its optimizer step has
    (accum_steps, fewer in the epoch's last step) and whether this batch is that step's last."""
    first = step // accum_steps * accum_steps
    micro = min(accum_steps, total - first)
    return micro, step + 1 - first == micro


def train_one_epoch(
    trainer: Trainer,
    loader: Iterable,
    epoch: int,
    args: argparse.Namespace,
    state: TrainState,
    stop: StopRequested,
    save_mid_epoch: Callable[[int, dict], None],
) -> dict:
    """One pass over the training data; returns train_loss, train_acc and the LR its last step used ({} if stopped)."""
    set_train_mode(trainer.model)
    meter = EpochMeter(trainer.device, state.partial)
    step, k = state.batches_done, trainer.accum_steps
    total = step + len(loader)  # a resumed epoch's loader holds only the batches still to come
    bar = progress(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, total=len(loader))
    for x, y in matched_batches(bar, trainer.device):
        if trainer.mix is not None:
            x, y = trainer.mix(x, y)  # soft targets; accuracy counts the dominant class
        micro, update = micro_batch_place(step, k, total)
        loss, out = train_step(trainer, x, y, micro, update)
        step += 1
        meter.add(loss, out, y, step)
        # Saves and stops only between optimizer steps: a resume never loses accumulated gradients.
        every = args.save_every
        checkpoint_due = update and bool(every) and (step - micro) // every < step // every
        stopping = update and stop.agreed(step % SYNC_EVERY == 0 or checkpoint_due, trainer.device)
        if step % SYNC_EVERY == 0 or stopping or checkpoint_due:
            meter.sync(epoch, step)
            bar.set_postfix(meter.postfix())
        if stopping or checkpoint_due:
            check_finite_weights(trainer.model, epoch, step)
            save_mid_epoch(step, dict(meter.sums))
            if stopping:
                bar.close()
                return {}
    meter.sync(epoch, step)
    check_finite_weights(trainer.model, epoch, step)
    bar.close()
    return {**meter.totals(), "lr": trainer.step_lr}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    dtype: torch.dtype | None = None,
    criterion: nn.Module | None = None,
) -> dict:
    """Loss and accuracy over a loader, each sample counted once over all processes."""
    model.eval()
    criterion = criterion or nn.CrossEntropyLoss()
    loss_sum = torch.zeros((), device=device, dtype=sum_dtype(device))
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for batch in progress(loader, desc="validating", leave=False):  # the epoch's line follows, with its time
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


class Checkpointer:
    """Writes a run's best.pt and last.pt (rank 0 only); the EMA's weights when there is one."""

    def __init__(
        self,
        run_dir: Path,
        meta: dict,
        model: nn.Module,
        save_model: nn.Module,
        trainer: Trainer,
        train_loader: Iterable,
        enabled: bool,
    ) -> None:
        self.run_dir, self.meta, self.enabled = run_dir, meta, enabled
        self.model, self.save_model = model, save_model  # what trains; what the files hold (contains it)
        self.trainer, self.train_loader = trainer, train_loader

    def save_best(self, state: TrainState) -> None:
        if self.enabled:
            with EmaWeights(self.model, self.trainer.ema):  # the weights that were validated
                atomic_torch_save(checkpoint_payload(self.meta, self.save_model, state), self.run_dir / "best.pt")

    def save_last(self, state: TrainState, batches_done: int = 0, partial: dict | None = None) -> None:
        if not self.enabled:
            return
        trainer = self.trainer
        with EmaWeights(self.model, trainer.ema):
            payload = checkpoint_payload(self.meta, self.save_model, state)
        payload.update(
            optimizer=trainer.optimizer.state_dict(),
            scheduler=trainer.scheduler.state_dict(),
            scaler=trainer.scaler.state_dict(),
            precision=precision_name(trainer.dtype),
            rng=rng_state(trainer.device),
            batches_done=batches_done,
            partial=partial or {},
        )
        if getattr(self.train_loader, "generator", None) is not None:
            payload["loader_rng"] = self.train_loader.generator.get_state()
        if trainer.ema is not None:
            payload["ema"] = trainer.ema.state_dict()
            payload["train_state"] = {k: v.detach().clone() for k, v in self.save_model.state_dict().items()}
        atomic_torch_save(payload, self.run_dir / "last.pt")


def resume_training(ckpt: dict, trainer: Trainer, save_model: nn.Module, run_dir: Path) -> TrainState:
    """Weights, optimizer, schedule, loss scale, RNGs and EMA from last.pt: the run continues exactly."""
    load_weights(save_model, ckpt.get("train_state", ckpt["model_state"]), run_dir / "last.pt")
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    load_schedule_progress(trainer.scheduler, ckpt["scheduler"])
    if ckpt["scaler"] and trainer.scaler.is_enabled():  # a run that now starts fp16 starts a fresh scale
        trainer.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], trainer.device)
    if trainer.ema is not None and "ema" in ckpt:
        trainer.ema.load_state_dict(ckpt["ema"])
    state = TrainState(
        ckpt["epoch"],
        ckpt["metrics"],
        ckpt["best_val_acc"],
        ckpt["best_epoch"],
        ckpt.get("batches_done", 0),
        ckpt.get("partial", {}),
    )
    print(
        f"resuming {run_dir} after epoch {state.epoch}"
        + (f", batch {state.batches_done}" if state.batches_done else "")
    )
    return state


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct seed for every run seed, epoch and torchrun rank: epochs step by 1, run seeds by 1000
    (room for 1000 epochs), ranks by the prime 7919, so no two of them collide in practice."""
    return seed * 1000 + epoch + 7919 * rank


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
        torch.manual_seed(epoch_seed(args.seed, epoch, rank))
        if generator is not None:
            generator.manual_seed(epoch_seed(args.seed, epoch, rank))


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
    say(
        epoch_line(row, setup.args.epochs)
        + (f"  ({bad} unreadable images skipped)" if bad else "")
        + ("  *" if improved else "")
    )


def run_epochs(
    setup: RunSetup,
    trainer: Trainer,
    train_loader: Iterable,
    val_loader: Iterable,
    state: TrainState,
    saver: Checkpointer,
    logger: WandbLogger,
    on_epoch_start: Callable[[int], bool] | None,
) -> None:
    """Train and validate epoch by epoch until --epochs, --patience or a stop signal (KeyboardInterrupt)."""
    args = setup.args
    first = state.epoch + 1
    with StopRequested() as stop:
        for epoch in progress(
            range(state.epoch + 1, args.epochs + 1), desc="epochs", initial=state.epoch, total=args.epochs
        ):
            if on_epoch_start is not None and on_epoch_start(epoch) and setup.dist.world > 1:
                trainer.rewrap()  # DDP only syncs what was trainable when it wrapped
            seed_epoch(setup, train_loader, epoch, state)
            t0 = time.perf_counter()
            train = train_one_epoch(
                trainer, train_loader, epoch, args, state, stop, lambda step, sums: saver.save_last(state, step, sums)
            )
            if stop:
                raise KeyboardInterrupt
            if epoch == first and not distributed():  # truncated files pass the header check; now all were read
                check_trainable(setup.classes, setup.train_samples, BAD_IMAGES.seen, setup.root / "train")
            state.batches_done, state.partial = 0, {}
            with EmaWeights(saver.model, trainer.ema):
                val = evaluate(trainer.model, val_loader, trainer.device, trainer.dtype, trainer.criterion)
            record_epoch(
                setup,
                state,
                {
                    "epoch": epoch,
                    **train,
                    "val_loss": val["loss"],
                    "val_acc": val["acc"],
                    "epoch_time": time.perf_counter() - t0,
                },
                saver,
                logger,
            )
            if args.patience and epoch - state.best_epoch >= args.patience:
                print(f"early stop: no better val_acc for {args.patience} epochs")
                break


def fit(
    setup: RunSetup,
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    param_groups: list[dict],
    meta: dict,
    device: torch.device,
    save_model: nn.Module | None = None,
    on_epoch_start: Callable[[int], bool] | None = None,
) -> TrainState:
    """Train with AMP, validate, checkpoint and log every epoch; resumable and interruptible.

    `model` is what runs on each batch; `save_model` (default `model`) is what the checkpoints
    hold, e.g. the full network when only its head trains on cached features. `meta`
    (checkpoint.checkpoint_meta) goes into every checkpoint. `on_epoch_start(epoch)` returns True
    when it changed which parameters train. Under torchrun, rank 0 alone writes files and W&B.
    """
    args, run_dir, main = setup.args, setup.run_dir, setup.dist.main
    save_model = save_model or model
    num_classes = len(meta["class_names"])
    counts = class_counts((label for _, label in setup.train_samples), num_classes)
    trainer = build_trainer(args, model, param_groups, device, len(train_loader), num_classes, setup.dist, counts)
    if getattr(args, "lr_find", False):
        run_lr_finder(trainer, train_loader, run_dir, main)
        finish_distributed()
        return TrainState()
    state = resume_training(setup.resume, trainer, save_model, run_dir) if setup.resume else TrainState()
    if state.epoch >= args.epochs:
        print(
            f"nothing to train: {run_dir} has trained all its {state.epoch} epochs; add --epochs N to train it further"
        )
        finish_distributed()
        return state
    if main:
        (run_dir / RESULT_FILE).unlink(missing_ok=True)  # complete again only when these epochs are done
        remove_stale_temps(run_dir)  # of a save cut by kill -9
    logger = WandbLogger(args, run_dir, run_dir.name, meta["config"]) if main else WandbLogger.off()
    saver = Checkpointer(run_dir, meta, model, save_model, trainer, train_loader, enabled=main)
    try:
        run_epochs(setup, trainer, train_loader, val_loader, state, saver, logger, on_epoch_start)
    except KeyboardInterrupt:
        logger.finish()
        if not (run_dir / "last.pt").exists():
            raise  # nothing saved yet: cli.run_cli says how to start the run again
        if main:
            say(f"interrupted: progress is in {run_dir / 'last.pt'}; continue with --resume {run_dir}", err=True)
        sys.exit(130)
    except NonFiniteLoss as e:
        logger.finish()
        last_good = run_dir / "last.pt"
        message = (
            f"{e}; stopped instead of training on garbage. Last good checkpoint: "
            f"{last_good if last_good.exists() else 'none yet'} (try a lower --lr or --grad_clip)"
        )
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
