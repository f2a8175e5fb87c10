"""Part B's backbones and their feature cache: a frozen backbone's pooled features, computed once per split.

A `Backbone` is what a built Part B model is: the network with its new head and the input its weights
expect.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from inat_classifier.checkpoint import atomic_torch_save
from inat_classifier.cli import UserError
from inat_classifier.device_batches import EpochSampler, make_image_loader, open_cache
from inat_classifier.images import batch_to_device
from inat_classifier.presets import Preprocess
from inat_classifier.runs import RunSetup
from inat_classifier.storage import remove_stale_temps
from inat_classifier.tracking import progress, say, took
from inat_classifier.training import amp_dtype, autocast


# ----------------------------------------------------------------------------- a built backbone
@dataclass
class Backbone:
    """A pretrained classifier with a new head, and what its weights expect as input."""

    model: nn.Module
    spec: dict
    head_name: str
    image_size: int
    mean: tuple
    std: tuple
    weights_source: str

    def preprocess(self, image_size: int | None = None) -> Preprocess:
        """The weights' preprocessing, at their own input size unless --image_size says otherwise."""
        return Preprocess.for_size(image_size or self.image_size, self.mean, self.std)


# ----------------------------------------------------------------------------- its cached features
def feature_cache_key(args: argparse.Namespace, backbone: Backbone, preprocess: Preprocess, samples: list) -> str:
    """Hash of model, weights, preprocessing and the files (path, size, mtime)."""
    files = []
    for path, label in samples:
        st = os.stat(path)
        files.append((path, label, st.st_size, st.st_mtime_ns))
    weights = backbone.weights_source
    if weights.startswith("file:"):
        st = os.stat(weights[5:])
        weights += f":{st.st_size}:{st.st_mtime_ns}"
    blob = json.dumps([args.model, weights, preprocess.to_dict(), args.amp, files])
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
def extract_features(
    backbone: Backbone, loader, device: torch.device, dtype, total: int | None = None, split: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's inputs and the labels of every batch of loader (of `total` images), on the CPU."""
    backbone.model.eval()
    capture = HeadInput(backbone.model.get_submodule(backbone.head_name))
    feats, labels = [], []
    try:
        with progress(total=total, desc=f"features {split}".strip(), unit="img", leave=False) as bar:
            for batch in loader:
                moved = batch_to_device(batch, device)
                if moved is None:
                    continue
                x, y = moved
                with autocast(device, dtype):
                    backbone.model(x)
                feats.append(capture.value.float().flatten(1).cpu())
                labels.append(y.cpu())
                bar.update(len(y))
    finally:
        capture.remove()
    if not feats:  # every image unreadable: the caller says so
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def load_features(path: Path, n_samples: int, head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A saved split's (features, labels); ValueError when the file is damaged or does not fit the head."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        feats, labels = blob["features"], blob["labels"]
    except Exception as e:  # truncated, not a zip, a pickle payload, missing keys: all just damage here
        raise ValueError(f"unreadable ({type(e).__name__})") from None
    if not (
        isinstance(feats, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and feats.ndim == 2
        and feats.is_floating_point()
        and labels.shape == (feats.shape[0],)
        and 0 < len(labels) <= n_samples
    ):
        raise ValueError(f"features of shape {tuple(getattr(feats, 'shape', ()))} for {n_samples} images")
    width = getattr(head, "in_features", feats.shape[1])
    if feats.shape[1] != width:
        raise ValueError(f"{feats.shape[1]} features per image, the head takes {width}")
    return feats, labels


def cached_features(
    args: argparse.Namespace,
    backbone: Backbone,
    preprocess: Preprocess,
    samples: list,
    open_images: Callable,
    device: torch.device,
    cache_dir: Path,
    split: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of one split from the cache; on a miss, images are loaded (open_images()) and run once.

    A damaged or mismatched file is recomputed, with one line saying so.
    """
    key = feature_cache_key(args, backbone, preprocess, samples)
    path = cache_dir / f"{args.model.replace(':', '-')}-{split}-{key}.pt"  # timm:NAME -> timm-NAME
    if path.exists():
        try:
            feats, labels = load_features(path, len(samples), backbone.model.get_submodule(backbone.head_name))
            print(f"features: reusing {path}")
            return feats, labels
        except ValueError as e:
            print(f"features: {path} is damaged ({e}); recomputing it")
    loader = open_images()
    start = time.perf_counter()
    feats, labels = extract_features(backbone, loader, device, amp_dtype(args.amp, device), len(samples), split)
    if len(labels) == 0:
        raise UserError(f"none of the {len(samples)} {split} images could be read")
    spent = took(len(labels), start)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(cache_dir)  # of runs killed while saving
    atomic_torch_save({"features": feats, "labels": labels}, path)
    say(f"features: {split} {tuple(feats.shape)} computed {spent}, saved to {path}")
    return feats, labels


def head_on_features(backbone: Backbone) -> nn.Module:
    """The trainable part for cached features: the new head, after the dropout that precedes it."""
    parent_name, _, _ = backbone.head_name.rpartition(".")
    parent = backbone.model.get_submodule(parent_name) if parent_name else backbone.model
    drop = next((m for m in parent.children() if isinstance(m, nn.Dropout)), None) if parent_name else None
    head = backbone.model.get_submodule(backbone.head_name)
    return nn.Sequential(nn.Dropout(drop.p), head) if drop is not None else nn.Sequential(head)


def feature_loaders(
    setup: RunSetup, backbone: Backbone, preprocess: Preprocess, device: torch.device
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Loaders of cached backbone features for both splits (computed once, then reused)."""
    args = setup.args
    cache_dir = Path(args.feature_cache_dir or Path(args.out_dir) / "feature_cache")
    decoded: dict = {}

    def images(samples: list):
        """Decoded images are only needed on a feature-cache miss: open their cache lazily."""

        def make():
            if "cache" not in decoded:
                decoded["cache"] = open_cache(setup, preprocess)
            # Every process computes the whole split (the cache file must be complete), then
            # trains on its shard of it.
            return make_image_loader(setup, samples, preprocess, device, False, decoded["cache"], shard=False)

        return make

    splits = {}
    for split, samples in (("train", setup.train_samples), ("val", setup.val_samples)):
        splits[split] = torch.utils.data.TensorDataset(
            *cached_features(args, backbone, preprocess, samples, images(samples), device, cache_dir, split)
        )
    train_ds, val_ds = splits["train"], splits["val"]
    dist, batch = setup.dist, setup.rank_batch_size
    train = torch.utils.data.DataLoader(
        train_ds,
        batch_size=batch,
        drop_last=len(train_ds) > args.batch_size,
        sampler=EpochSampler(
            len(train_ds),
            args.seed,
            rank=dist.rank,
            world=dist.world,
            balance_by=train_ds.tensors[1].tolist() if args.sampler == "balanced" else None,
        ),
    )
    val = torch.utils.data.DataLoader(
        val_ds,
        batch_size=batch,
        sampler=EpochSampler(len(val_ds), args.seed, shuffle=False, rank=dist.rank, world=dist.world, pad=False),
    )
    return train, val
