"""The epoch sampler: a shuffled order fixed by (seed, epoch), sharded for torchrun, skippable for resume."""

from __future__ import annotations

import math

import torch


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled order fixed by (seed, epoch), so a resumed run sees the same batches.

    `skip` drops the first samples of the epoch (resume mid-epoch); `rank`/`world` shard the
    order for DistributedDataParallel.
    """

    def __init__(
        self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1, pad: bool = True
    ) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.world, self.pad = n, seed, shuffle, rank, world, pad
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        idx = self.order()
        if self.world > 1:
            if self.pad:  # every rank gets the same count, as DistributedSampler does
                idx += idx[: (-len(idx)) % self.world]
            idx = idx[self.rank :: self.world]
        return iter(idx[self.skip :])

    def __len__(self) -> int:
        if self.world == 1 or self.pad:
            return math.ceil(self.n / self.world) - self.skip
        return len(range(self.rank, self.n, self.world)) - self.skip
