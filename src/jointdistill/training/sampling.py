"""What a training step reads and in which order: the epoch's permutation, the unlabelled pool mixed into each
step, and the loader of one pass.

Reproducibility: for a given seed, the data order of epoch e is a permutation drawn from (seed, e), and item i's
augmentation is drawn from (seed, e, i) (see `PreparedDataset`), so a run resumed mid-epoch reads what an
uninterrupted one would have.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSampler(Sampler[int]):
    """A permutation fixed by (seed, epoch), sharded across ranks, optionally skipping batches already done.

    Training drops the last incomplete global batch so every rank runs the same number of steps. ``length``
    (default ``n``) is how many indices an epoch draws: more than ``n`` chains further permutations, so a
    smaller dataset can take as many steps per epoch as a larger one (`fit`'s ``epoch_samples``).

    ``pool``/``pool_batch``: the dataset's items ``n .. n + pool - 1`` are an unlabelled pool, and every step
    adds ``pool_batch`` of them (their own chained permutations) to its ``batch_size`` labelled items, so the
    labelled part of a step, and so the weight of the labels, is the same with or without the pool.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        shuffle: bool,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = True,
        length: int | None = None,
        pool: int = 0,
        pool_batch: int = 0,
    ):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.length = n if length is None else length
        self.pool, self.pool_batch = (pool, pool_batch) if pool and pool_batch else (0, 0)
        self.epoch, self.skip_batches = 0, 0

    @property
    def step_size(self) -> int:
        """Items per step and process: the loader's batch size."""
        return self.batch_size + self.pool_batch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def _chain(self, n: int, length: int, salt: int = 0) -> list[int]:
        order: list[int] = []
        for cycle in range(math.ceil(length / n) if n else 0):
            if self.shuffle:  # cycle 0 is the epoch's one permutation whenever length == n
                g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + cycle * 1_000_003 + salt)
                order += torch.randperm(n, generator=g).tolist()
            else:
                order += range(n)
        return order[:length]

    def _indices(self) -> list[int]:
        order = self._chain(self.n, self.length)
        if self.drop_last:
            per_step = self.batch_size * self.world
            order = order[: len(order) // per_step * per_step]
        if not self.pool:
            return order[self.rank :: self.world]
        # Step by step: this rank's share of the step's labelled items, then of its pool items.
        steps = len(order) // (self.batch_size * self.world)
        k, u = self.batch_size * self.world, self.pool_batch * self.world
        pool = [self.n + i for i in self._chain(self.pool, steps * u, salt=7)]
        mixed: list[int] = []
        for s in range(steps):
            mixed += order[s * k : (s + 1) * k][self.rank :: self.world]
            mixed += pool[s * u : (s + 1) * u][self.rank :: self.world]
        return mixed

    def batches_per_epoch(self) -> int:
        n = len(self._indices())
        return n // self.step_size if self.drop_last else math.ceil(n / self.step_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip_batches * self.step_size :])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.skip_batches * self.step_size)


def make_loader(
    ds: Dataset, sampler: EpochSampler, batch_size: int, workers: int, device: torch.device, drop_last: bool
) -> DataLoader:
    """A loader for one pass (made anew each epoch, so nothing in it depends on earlier epochs)."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        # The loader draws its workers' base seed from this generator, not from the global RNG, so the
        # global RNG stream (dropout) is the same whether a run started fresh or resumed mid-epoch.
        generator=torch.Generator().manual_seed(sampler.seed * 100_003 + sampler.epoch),
    )


def to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    """A batch's tensors on ``device`` (the images in channels_last where the model is)."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out
