"""A run's batches: rows from the decoded cache or, with --cache off, decoded every epoch; one pipeline for both."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import numpy as np
import torch

from inat_classifier import dataset as data
from inat_classifier.decoded_cache import DecodedCache, choose_cache_dir, open_decoded_cache
from inat_classifier.device_batches import CachedRows, DecodedRows, DeviceLoader
from inat_classifier.devices import Dist
from inat_classifier.presets import Preprocess
from inat_classifier.runs import RunSetup
from inat_classifier.sampler import EpochSampler

# The decoded cache of a run and where each (path, label) sample sits in it.
CachedImages = tuple[DecodedCache, dict]


def stored_preprocess(setup: RunSetup, preprocess: Preprocess) -> Preprocess:
    """preprocess with the side every photo of the run is stored at (recorded in its checkpoints)."""
    args = setup.args
    paths = [p for p, _ in setup.train_samples + setup.val_samples]
    largest = max(setup.photo_sides[p] for p in paths) if args.augment else 0
    return preprocess.with_stored_side(args.augment, args.crop_scale, largest)


def open_cache(setup: RunSetup, preprocess: Preprocess) -> CachedImages | None:
    """The decoded-image cache over all of train/ (both sides of any split), or None with --cache off."""
    args = setup.args
    if args.cache == "off":
        return None
    cache_dir, note = choose_cache_dir(args.cache)
    if cache_dir is None:
        if setup.dist.main:
            print(note, file=sys.stderr)
        return None
    samples = sorted(set(setup.train_samples) | set(setup.val_samples))
    paths = [p for p, _ in samples]
    cache = open_decoded_cache(paths, preprocess.decode_side, cache_dir, args.workers)
    # Files whose header reads but whose pixels do not (truncated JPEGs) are known only now.
    unreadable = {paths[i] for i in np.flatnonzero(~cache.valid)}
    data.check_trainable(setup.classes, setup.train_samples, unreadable, setup.root / "train")
    return cache, {s: i for i, s in enumerate(samples)}


def make_image_loader(
    setup: RunSetup,
    samples: list,
    preprocess: Preprocess,
    device: torch.device,
    train: bool,
    cached: CachedImages | None,
    shard: bool = True,
) -> Iterable:
    """Batches of one split: rows from the decoded cache, or decoded by --workers processes without one.

    shard=False gives every process all the samples (e.g. to compute a complete feature cache).
    """
    args, dist = setup.args, (setup.dist if shard else Dist())
    augment = train and args.augment
    batch = setup.rank_batch_size if shard else args.batch_size
    drop_last = train and len(samples) > args.batch_size
    # Training shards are padded to equal length (as DistributedSampler); validation shards are
    # not, so every validation image is counted exactly once over all processes.
    sampler = EpochSampler(len(samples), args.seed, shuffle=train, rank=dist.rank, world=dist.world, pad=train)
    if cached is not None:
        cache, pos = cached
        source = CachedRows(cache, [pos[s] for s in samples])
    else:
        source = DecodedRows([path for path, _ in samples], preprocess.decode_side, args.workers)
    return DeviceLoader(
        source,
        [label for _, label in samples],
        batch,
        preprocess,
        device,
        augment=augment,
        crop_scale=args.crop_scale,
        sampler=sampler,
        seed=args.seed,
        drop_last=drop_last,
        channels_last=getattr(args, "channels_last", False),
    )


def image_loaders(setup: RunSetup, preprocess: Preprocess, device: torch.device) -> tuple[Iterable, Iterable]:
    """Train and val loaders (train shuffled, and augmented with --augment)."""
    cached = open_cache(setup, preprocess)
    return (
        make_image_loader(setup, setup.train_samples, preprocess, device, True, cached),
        make_image_loader(setup, setup.val_samples, preprocess, device, False, cached),
    )
