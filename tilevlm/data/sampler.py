"""A resumable data order: the sample at stream position k is a pure function of (seed, k).

Position k falls in epoch `k // n` at offset `k % n`; each epoch is a fresh permutation drawn from
a generator seeded with (seed, epoch). Batches are consecutive slices of that endless stream, so a
run that stops after consuming `position` samples resumes with exactly the batches it would have
seen next.

With several processes, `batch_size` is per rank: the stream is cut into global batches of
`batch_size * world_size` and rank r takes positions r, r + W, ... of each, so `position` counts
global samples and a run can resume with a different number of processes (exactly, when the
global batch size is kept).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of `range(n)` used in `epoch`."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless batches of `batch_size` indices into a dataset of `n` samples, from `start`."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if n <= 0:
            raise ValueError("the training dataset is empty")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.start, self.shuffle = start, shuffle
        self.rank, self.world_size = rank, world_size

    def _order(self, epoch: int) -> list[int]:
        return epoch_order(self.n, self.seed, epoch) if self.shuffle else list(range(self.n))

    def __iter__(self) -> Iterator[list[int]]:
        position, epoch, order = self.start, -1, []
        while True:
            batch = []
            for _ in range(self.batch_size * self.world_size):
                if position // self.n != epoch:
                    epoch = position // self.n
                    order = self._order(epoch)
                batch.append(order[position % self.n])
                position += 1
            yield batch[self.rank::self.world_size]
