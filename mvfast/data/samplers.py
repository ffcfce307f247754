"""Data order and augmentation that a checkpoint can capture; validation shards that count each clip once.

A training run that is stopped and resumed must see the same clips, crops and flips in the same order as one
that ran through: :class:`SeededClips` makes each item's randomness a function of (seed, epoch, index), and
:class:`ResumableSampler` starts an epoch's permutation at any batch. Under torchrun each rank takes its
share of both (DistributedSampler), and :class:`Shard` splits a validation set without padding.
"""

from __future__ import annotations

import itertools
import signal

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


class SeededClips(Dataset):
    """A training dataset whose random clip, crop and flip of item i in epoch e depend on (seed, e, i) only:
    not on the DataLoader worker that loads it, nor on where a run was stopped and resumed."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) & (2**63 - 1))
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """DistributedSampler (a seeded permutation per epoch, this rank's share) that can start mid-epoch."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


class Shard(Sampler):
    """Every world-th index from rank on, in order, without DistributedSampler's padding (so that metrics
    gathered from all ranks count every clip once)."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def ignore_sigint(_worker_id):
    """A DataLoader worker_init_fn: the worker ignores Ctrl-C, which its main process handles."""
    # Ctrl-C reaches the whole process group; the main process saves a checkpoint at the next step boundary
    # and needs its workers alive until then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
