"""--sampler balanced: an epoch is as many draws as photos, with replacement, every class equally likely;
the order is fixed by (seed, epoch), so mid-epoch resume and torchrun shards work as for the shuffled one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from conftest import make_dataset
from inat_classifier import dataset
from inat_classifier.decoded_cache import open_decoded_cache
from inat_classifier.device_batches import CachedRows, DeviceLoader, EpochSampler
from inat_classifier.presets import Preprocess

CPU = torch.device("cpu")

LABELS = [0] * 1000 + [1] * 100  # a 10:1 dataset, the small class last


def epoch_order(seed: int, epoch: int, labels=LABELS, **kw) -> list[int]:
    s = EpochSampler(len(labels), seed, balance_by=labels, **kw)
    s.set_epoch(epoch)
    return list(s)


def test_balanced_sampling_draws_the_classes_evenly_over_epochs_of_a_10_to_1_dataset():
    drawn = Counter()
    for epoch in range(1, 6):
        order = epoch_order(seed=42, epoch=epoch)
        assert len(order) == len(LABELS)  # the same epoch length as the shuffled sampler
        drawn.update(LABELS[i] for i in order)
    share = drawn[1] / sum(drawn.values())
    assert 0.46 < share < 0.54, drawn  # 1/2 in expectation (the shuffled order gives 1/11)
    # every photo of the small class comes up (each about 5 times an epoch), not a few of them over and over
    small = Counter(i for epoch in range(1, 6) for i in epoch_order(42, epoch) if i >= 1000)
    assert len(small) == 100 and max(small.values()) < 60


def test_shuffled_sampling_of_the_same_dataset_keeps_its_imbalance():
    s = EpochSampler(len(LABELS), 42)
    s.set_epoch(1)
    assert sorted(s) == list(range(len(LABELS)))  # every photo once: 100 of 1100 from the small class


def test_balanced_order_is_fixed_by_seed_and_epoch():
    assert epoch_order(1, 3) == epoch_order(1, 3)
    assert epoch_order(1, 3) != epoch_order(1, 4)
    assert epoch_order(1, 3) != epoch_order(2, 3)


def test_balanced_shards_interleave_the_one_process_order_and_skip_drops_its_first_draws():
    """Two torchrun ranks: disjoint positions of the same epoch order (padded to equal length), and a
    resumed epoch (skip) continues exactly where it stopped."""
    labels = LABELS[:95] + LABELS[-10:]  # 105 draws: odd, so one is padded
    order = epoch_order(7, 2, labels)
    shards = [epoch_order(7, 2, labels, rank=r, world=2) for r in range(2)]
    padded = order + order[:1]
    assert shards == [padded[0::2], padded[1::2]]
    s = EpochSampler(len(labels), 7, rank=1, world=2, balance_by=labels)
    s.set_epoch(2, skip=20)
    assert list(s) == shards[1][20:] and len(s) == len(shards[1]) - 20


def test_unreadable_photos_drop_out_and_the_rest_stay_balanced(tmp_path):
    """The loader re-shards without photos the cache could not decode (truncated JPEGs): the draws
    follow the classes of the photos that are left."""
    root = make_dataset(tmp_path / "ds", ["red"], n_train=40, n_val=0)
    make_dataset(root, ["blue"], n_train=4, n_val=0)
    samples = dataset.discover(root).train  # blue (label 0) 4, red (label 1) 40
    for path, _ in samples[4:14]:  # 10 red photos cut in half
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
    labels = [label for _, label in samples]
    cache = open_decoded_cache([p for p, _ in samples], 8, tmp_path / "cache")
    sampler = EpochSampler(len(samples), 5, balance_by=labels)
    loader = DeviceLoader(
        CachedRows(cache, range(len(samples))), labels, 8, Preprocess.for_size(8), CPU, False, sampler=sampler
    )
    assert loader.skipped > 0
    kept = loader.labels.tolist()
    assert loader.sampler.balance_by == kept
    drawn = Counter()
    for epoch in range(1, 21):
        loader.sampler.set_epoch(epoch)
        drawn.update(kept[i] for i in loader.sampler)
    assert 0.4 < drawn[0] / sum(drawn.values()) < 0.6, drawn
