"""Training images/s of Part A and Part B steps, with the GPU's busy fraction: the SPEED lines.

    python tools/train_speed.py --data_dir DATA --sizes parta:64,parta:128,partb:224 --batch_size 256

Each line times one script's steps as its training loop takes them (its model, `training.build_trainer`,
augmented batches from the decoded cache through `DeviceLoader`), without validation: --steps steps
after --warmup untimed ones (cuDNN's autotuning). On CUDA, 20 more steps run under torch.profiler for
the fraction of the time the GPU's kernels ran and the kernels a step launched.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the package, the scripts
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py's timing helpers

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C or SIGTERM meanwhile is one line (startup.py)
    from inat_classifier import startup

    startup.stop_quietly()

import argparse
import itertools
import json
import os
import tempfile
import time

import torch

import data
from bench import default_partb_model, images_per_second, sync
from inat_classifier.cli import UserError, add_flag, run_cli
from inat_classifier.decoded_cache import open_decoded_cache
from inat_classifier.device_batches import CachedRows, DeviceLoader, EpochSampler
from inat_classifier.devices import Dist, select_device
from inat_classifier.images import photo_short_side
from inat_classifier.optim import param_groups_with_decay
from inat_classifier.presets import Preprocess
from inat_classifier.storage import atomic_write_text, json_object_where, refuse_foreign
from inat_classifier.training import build_trainer, precision_name, train_step
from models import build_backbone


def speed_model(which: str, image_size: int, num_classes: int, device: torch.device):
    """(model, training flags): Part A's ConvNet at its defaults, or a Part B backbone training whole."""
    import train_parta
    import train_partb

    if which == "parta":
        args = train_parta.get_args_parser().parse_args(["--image_size", str(image_size)])
        torch.manual_seed(0)
        return train_parta.build_model(args, num_classes).to(device), args
    name = default_partb_model()
    weights = "packaged" if name == "efficientnet_lite0" else "none"
    args = train_partb.get_args_parser().parse_args(
        ["--model", name, "--weights", weights, "--image_size", str(image_size), "--freeze", "none", "--augment"]
    )
    return build_backbone(name, weights, num_classes).model.to(device), args


def profile_steps(step, loader, device: torch.device, steps: int = 20) -> tuple[float | None, float | None]:
    """(busy fraction, kernels per step) of the GPU over `steps` steps, from torch.profiler: the time its
    kernels ran (copies and memsets left out) over the wall time. (None, None) off CUDA or when the
    profiler gives no device events."""
    if device.type != "cuda":
        return None, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(*next(batches))
        sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.events()
    kernels = [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == DeviceType.CUDA]
    if not kernels:  # older profilers attach the kernels to the operators that launched them
        kernels = [(k.name, k.duration) for e in events for k in getattr(e, "kernels", [])]
    kernels = [(name, us) for name, us in kernels if not name.startswith(("Memcpy", "Memset"))]
    if not kernels:
        return None, None
    return sum(us for _, us in kernels) / wall_us, len(kernels) / steps


def training_speed(
    args: argparse.Namespace,
    which: str,
    image_size: int,
    samples: list,
    num_classes: int,
    device: torch.device,
    cache_dir: Path,
) -> dict:
    """One SPEED line: images/s of `which`'s training steps at image_size px, printed and returned."""
    model, flags = speed_model(which, image_size, num_classes, device)
    paths = [p for p, _ in samples]
    pre = Preprocess.for_size(image_size).with_stored_side(True, flags.crop_scale, max(map(photo_short_side, paths)))
    loader = DeviceLoader(
        CachedRows(open_decoded_cache(paths, pre.decode_side, cache_dir, args.workers), list(range(len(samples)))),
        [label for _, label in samples],
        args.batch_size,
        pre,
        device,
        augment=True,
        crop_scale=flags.crop_scale,
        sampler=EpochSampler(len(samples), seed=0),
        drop_last=True,
        channels_last=flags.channels_last,
    )
    groups = param_groups_with_decay(model.named_parameters(), flags.lr, flags.weight_decay, "model")
    trainer = build_trainer(flags, model, groups, device, len(loader), num_classes, Dist())
    model.train()

    def step(x, y):
        train_step(trainer, x, y)

    rate = images_per_second(loader, args.steps, device, step, warmup=args.warmup)
    try:
        busy, kernels = profile_steps(step, loader, device)
    except Exception as e:  # the SPEED line stands without the profiler's figures
        print(f"note: torch.profiler gave no GPU figures ({type(e).__name__}: {e})")
        busy, kernels = None, None
    model_name = flags.model if which == "partb" else "ConvNet"
    gpu = (
        f"GPU busy {busy:.0%} of the time, {kernels:.0f} kernels a step"
        if busy is not None
        else "GPU busy fraction: n/a" + (" off CUDA" if device.type != "cuda" else "")
    )
    print(
        f"SPEED {which}_{image_size}px {rate:.0f} images/s ({model_name}, batch {args.batch_size}, "
        f"{args.steps} steps, {precision_name(trainer.dtype)}; {gpu})",
        flush=True,
    )
    return {
        "images_s": rate,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "image_size": image_size,
        "busy": busy,
        "kernels_per_step": kernels,
        "model": model_name,
        "precision": precision_name(trainer.dtype),
    }


def parse_sizes(text: str) -> list[tuple[str, int]]:
    """'parta:64,partb:224' -> [('parta', 64), ('partb', 224)]; a one-line error otherwise."""
    sizes = []
    for item in text.split(","):
        which, _, size = item.partition(":")
        if which not in ("parta", "partb") or not size.isdigit() or int(size) < 1:
            raise UserError(f"--sizes: '{item}' is not script:pixels (e.g. parta:64 or partb:224)")
        sizes.append((which, int(size)))
    return sizes


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    add_flag(parser, "data_dir", default=data.DEFAULT_DATA_DIR, help="dataset root with train/ (default: %(default)s)")
    add_flag(
        parser,
        "sizes",
        default="parta:64,parta:128,partb:224",
        help="script:pixels, comma-separated, one SPEED line each (default: %(default)s)",
    )
    add_flag(parser, "batch_size", type=int, default=256, help="batch size (default: %(default)s)")
    add_flag(parser, "steps", type=int, default=200, help="timed steps per SPEED line (default: %(default)s)")
    add_flag(parser, "warmup", type=int, default=20, help="untimed steps before them (default: %(default)s)")
    add_flag(
        parser,
        "workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes that build the decoded cache (default: %(default)s)",
    )
    add_flag(parser, "device", default="auto", help="auto, cpu, cuda, mps (default: %(default)s)")
    add_flag(parser, "cache", default=None, help="decoded-image cache folder (default: a temporary folder)")
    add_flag(parser, "json", default=None, help="write every line's figures to this JSON file")
    return parser


# An existing --json file is replaced only when it is this tool's: one measurement (images_s) per line.
is_speed_json = json_object_where(lambda d: all(isinstance(v, dict) and "images_s" in v for v in d.values()))


def main(args: argparse.Namespace) -> dict:
    if args.json:
        refuse_foreign(Path(args.json), is_speed_json, "a train_speed.py result", "--json")
    sizes = parse_sizes(args.sizes)
    for name, least in (("batch_size", 1), ("steps", 1), ("warmup", 1), ("workers", 0)):
        if getattr(args, name) < least:
            raise UserError(f"--{name} must be >= {least}, got {getattr(args, name)}")
    device = select_device(args.device)
    ds = data.discover(args.data_dir)
    samples = sorted(ds.train)
    if args.batch_size > len(samples):
        raise UserError(f"--batch_size {args.batch_size} is more than the {len(samples)} training images")
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which, size in sizes:
            result[f"{which}:{size}"] = training_speed(
                args, which, size, samples, len(ds.classes), device, Path(args.cache or tmp)
            )
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
