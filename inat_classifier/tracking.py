"""What a run reports: progress bars and lines, training curves, and W&B logging that needs no account."""

from __future__ import annotations

import argparse
import netrc
import os
import re
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from inat_classifier.cli import UserError, json_safe
from inat_classifier.figures import pyplot
from inat_classifier.storage import save_png


def progress(iterable: Iterable | None = None, **kwargs: Any) -> Iterable:
    """A tqdm bar on a terminal (or with TQDM_FORCE set) of rank 0; silent in logs, CI and other ranks."""
    from tqdm import tqdm

    quiet = (not sys.stderr.isatty() and os.environ.get("TQDM_FORCE") is None) or os.environ.get("RANK", "0") != "0"
    return tqdm(iterable, dynamic_ncols=True, disable=quiet, **kwargs)


def format_duration(seconds: float) -> str:
    """A wait as people read it: 0.4s, 42s, 6m42s, 1h05m."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def took(count: float, start: float, unit: str = "images") -> str:
    """'in 6m42s (18.8 images/s)': the time since start (time.perf_counter()) and the rate, for a wait's last line."""
    seconds = time.perf_counter() - start
    return f"in {format_duration(seconds)} ({count / max(seconds, 1e-9):.1f} {unit}/s)"


def say(message: str, err: bool = False) -> None:
    """One line on stdout (stderr with err) above the progress bars; it never fails when the stream is gone
    (a closed pipe), so a stop still saves."""
    from tqdm import tqdm

    stream = sys.stderr if err else sys.stdout
    try:
        tqdm.write(message, file=stream)
        stream.flush()
    except OSError:
        pass


def plot_curves(histories: dict[str, list[dict]], out: Path) -> None:
    """Loss and accuracy per epoch, train dashed and val solid, one colour per run."""
    plt = pyplot()

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for i, (label, hist) in enumerate(histories.items()):
        color = f"C{i % 10}"
        epochs = [h["epoch"] for h in hist]
        prefix = f"{label} " if len(histories) > 1 else ""
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            ax.plot(epochs, [h[f"train_{key}"] for h in hist], "--o", color=color, ms=3, label=f"{prefix}train")
            ax.plot(epochs, [h[f"val_{key}"] for h in hist], "-o", color=color, ms=3, label=f"{prefix}val")
    from matplotlib.ticker import MaxNLocator

    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        save_png(fig, out)
    finally:
        plt.close(fig)


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    candidates = [os.environ.get("NETRC"), Path.home() / ".netrc", Path.home() / "_netrc"]
    for path in filter(None, candidates):
        try:
            hosts = netrc.netrc(str(path)).hosts
        except (OSError, netrc.NetrcParseError):
            continue
        if any("wandb" in h for h in hosts):
            return True
    return False


INIT_TIMEOUT_S = 15.0  # W&B's own default waits 90 s (and more) for an unreachable server before giving up


def init_timeout() -> float:
    """Seconds wandb.init may wait for the server: $WANDB_INIT_TIMEOUT when set, else INIT_TIMEOUT_S."""
    try:
        return float(os.environ.get("WANDB_INIT_TIMEOUT") or INIT_TIMEOUT_S)
    except ValueError:
        raise UserError(
            f"WANDB_INIT_TIMEOUT must be a number of seconds, got '{os.environ['WANDB_INIT_TIMEOUT']}'"
        ) from None


def wandb_server() -> str:
    return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def online_settings(wandb: Any, mode: str) -> dict:
    """wandb.init's settings for online mode: a bounded wait, so no network costs seconds, not minutes."""
    if mode != "online":
        return {}
    # W&B's own error reporting flushes to the server when the process exits, waiting some 20 s more
    # for one that does not answer; it stays off unless WANDB_ERROR_REPORTING asks for it.
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    return {"settings": wandb.Settings(init_timeout=init_timeout())}


@contextmanager
def silenced_wandb(silent: bool) -> Iterator[None]:
    """W&B's own lines off for the run started inside (it reads WANDB_SILENT once, when the run starts),
    unless WANDB_SILENT says otherwise."""
    setting = silent and "WANDB_SILENT" not in os.environ
    if setting:
        os.environ["WANDB_SILENT"] = "true"
    try:
        yield
    finally:
        if setting:
            os.environ.pop("WANDB_SILENT", None)


class WandbLogger:
    """W&B that never prompts and needs no account: auto picks online only when a key exists."""

    @classmethod
    def off(cls) -> WandbLogger:
        logger = cls.__new__(cls)
        logger.run = None
        return logger

    def __init__(self, args: argparse.Namespace, run_dir: Path, name: str, config: dict) -> None:
        self.run = None
        mode = args.wandb
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            if mode == "auto":
                print("W&B: wandb is not installed; logging only to metrics.csv")
                return
            raise UserError(
                f"--wandb {mode} needs the wandb package (pip install wandb), or use --wandb disabled"
            ) from None
        keyless = False  # offline only for want of a key: W&B's own ~25 lines say nothing the user asked for
        if mode == "auto":
            env_mode = os.environ.get("WANDB_MODE")
            if env_mode in ("online", "offline", "disabled", "dryrun", "run"):
                mode = {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)
            elif wandb_api_key_configured():
                mode = "online"
            else:
                mode, keyless = "offline", True
        if mode == "disabled":
            return
        self.wandb = wandb
        kwargs = dict(project=args.wandb_project, entity=args.wandb_entity, name=name, config=config, dir=str(run_dir))
        try:
            with silenced_wandb(keyless):
                self.run = wandb.init(mode=mode, **kwargs, **online_settings(wandb, mode))
        except Exception as e:  # no key, no network: never lose the run over logging
            if mode != "online":
                raise UserError(f"W&B could not start in {mode} mode: {str(e).splitlines()[0][:200]}") from None
            print(
                f"W&B: {wandb_server()} did not start the run ({str(e).splitlines()[0][:80]}; waited at "
                f"most {init_timeout():g} s); logging offline to {run_dir / 'wandb'} instead"
            )
            self.run = wandb.init(mode="offline", **kwargs)
        if keyless:
            files = getattr(self.run, "dir", None)  # the run's offline-run-*/files
            logs = Path(files).parent if files else run_dir / "wandb"
            print(f"W&B: no API key, logging offline; upload later with: wandb sync {shlex.quote(str(logs))}")

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path) -> None:
        if self.run is not None and path.exists():
            self.run.log({key: self.wandb.Image(str(path))})

    def close(self, best_val_acc: float, curves: Path) -> None:
        """The end of a finished run: best val_acc as the summary, the curves as an image."""
        if best_val_acc >= 0 and self.run is not None:
            self.run.summary["best_val_acc"] = best_val_acc
        self.log_image("curves", curves)
        self.finish()

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


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


def log_to_wandb(what: str, config: dict, out_dir: Path, images: dict[str, Path], summary: dict) -> bool:
    """Log figures and summary figures to W&B as a run of its own, if the trained run used W&B:
    offline unless an API key is configured; never prompts. `what` names it ("viz", "eval")."""
    mode = config.get("wandb", "disabled")
    if mode == "disabled":
        print(f"W&B: the run was trained with --wandb disabled; not logging its {what} run")
        return False
    ns = argparse.Namespace(
        wandb="offline" if mode == "offline" else "auto",
        wandb_project=config.get("wandb_project") or "inat12k",
        wandb_entity=config.get("wandb_entity"),
    )
    name = f"{what}-{Path(str(config.get('run_name') or out_dir.name)).name}"
    logger = WandbLogger(ns, out_dir, name, {"logged": what, **json_safe(config)})
    logged = logger.run is not None
    try:
        for key, path in images.items():
            logger.log_image(key, path)
        if logged and summary:
            logger.run.summary.update(summary)
    finally:
        logger.finish()
    if logged:
        print(f"W&B: logged {', '.join([*images, *summary])} to {out_dir / 'wandb'}")
    return logged


def log_figure(key: str, path: Path, config: dict, out_dir: Path) -> bool:
    """visualize.py --wandb: one figure."""
    return log_to_wandb("viz", config, out_dir, {key: path}, {})
