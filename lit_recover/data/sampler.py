"""``ShardedBatchSampler`` (the Trainer's shuffling or length grouping, one disjoint shard per rank,
resumable) and the recipe's train/validation split."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

SPLIT_SEED = 42
"""The recipe's validation split seed: ``train_test_split(..., shuffle=True, seed=42)``, fixed in its code."""


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of an epoch's order: seeded with ``seed + epoch``, as accelerate's
    ``SeedableRandomSampler`` seeds the Trainer's ``RandomSampler``."""
    return torch.Generator().manual_seed(int(seed) + int(epoch))


def random_order(n: int, generator: torch.Generator) -> np.ndarray:
    """The Trainer's ``RandomSampler`` order: one ``torch.randperm``."""
    return torch.randperm(n, generator=generator).numpy()


def length_grouped_order(
    lengths: np.ndarray, group_size: int, generator: torch.Generator, mega_batch_mult: int | None = None
) -> np.ndarray:
    """The order of transformers' ``LengthGroupedSampler(group_size)`` (``get_length_grouped_indices``).

    A ``torch.randperm`` is cut into megabatches of ``mega_batch_mult * group_size`` indices
    (``mega_batch_mult``: 50, or fewer so that there are at least 4 megabatches, at least 1), each
    sorted by length, longest first (ties keep the permutation's order); then the longest sample of
    all trades places with the first sample of the first megabatch, so an out-of-memory shows at once.
    """
    n = len(lengths)
    if mega_batch_mult is None:
        mega_batch_mult = max(1, min(n // (group_size * 4), 50))
    mega = mega_batch_mult * group_size
    perm = random_order(n, generator)
    chunks = [c[np.argsort(-lengths[c], kind="stable")] for c in np.split(perm, range(mega, n, mega))]
    first_of_each = [int(lengths[c[0]]) for c in chunks]
    longest = int(np.argmax(first_of_each))  # the first megabatch holding the longest sample
    chunks[0][0], chunks[longest][0] = chunks[longest][0], chunks[0][0]
    return np.concatenate(chunks)


class ShardedBatchSampler(Sampler[list[int]]):
    """Micro-batches of indices for one rank, in the order the Hugging Face Trainer draws; resumable.

    Every epoch is one global order, cut into micro-batches and dealt out: step ``s`` gives rank
    ``r`` the batch ``s * world_size + r``. So the shards are disjoint, together cover the data, and
    every rank gets ``len(self)`` batches. All steps but the last hold ``batch_size`` samples per
    rank; the last one splits the remainder evenly over the ranks (when fewer samples than ranks
    remain, the first samples of the epoch are repeated so that no rank gets an empty batch).

    The global order of epoch ``e`` (``shuffle``) comes from a ``torch.Generator`` seeded with
    ``seed + e``:

    - plain: ``torch.randperm(n)``, the order of the Trainer's ``RandomSampler`` (which accelerate
      seeds with ``seed + epoch``);
    - ``group_by_length``: the order of transformers' ``LengthGroupedSampler`` over groups of
      ``batch_size * accumulation`` samples (micro-batch × gradient accumulation, as the Trainer
      passes it): megabatches of 50 groups sorted longest first, the longest sample first of all.

    On one rank that is the Trainer's sequence of micro-batches; on several, the same global order
    dealt out micro-batch by micro-batch, as accelerate's ``BatchSamplerShard`` does. Without
    ``shuffle`` (validation) the order is the data order, or longest first when grouping.

    Resuming: ``set_epoch(e)`` picks the epoch's order (the same on every rank for the same seed);
    ``set_start_batch(k)`` skips the first ``k`` batches of the current epoch without touching
    them, until the epoch changes. ``len()`` stays the full epoch length, which is what Lightning
    expects when it restores its own batch counter on resume.

    Args:
        lengths: the token count of every sample.
        batch_size: samples per micro-batch on one rank.
        shuffle: a new seeded order every epoch; off for validation.
        group_by_length: put samples of similar length in the same batch.
        seed: the base seed; epoch ``e``'s order depends on ``seed + e`` only.
        rank: this process's rank.
        world_size: the number of ranks.
        accumulation: micro-batches per optimizer step on one rank; with ``batch_size`` it sizes
            the length groups.
        mega_batch_mult: groups per megabatch when grouping; ``None``: the Trainer's rule (50, or
            fewer to make at least 4 megabatches).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        group_by_length: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        accumulation: int = 1,
        mega_batch_mult: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if accumulation < 1:
            raise ValueError(f"accumulation must be at least 1, got {accumulation}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.accumulation = accumulation
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0
        self._start: tuple[int, int] = (0, 0)  # (epoch, batches to skip in it)

    @property
    def sampler(self) -> ShardedBatchSampler:
        # Lightning calls set_epoch on ``dataloader.batch_sampler.sampler``; point it at us.
        return self

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order from the next iteration on; moving to another epoch ends a skip."""
        self.epoch = int(epoch)
        if self._start[0] != self.epoch:
            self._start = (self.epoch, 0)

    def set_start_batch(self, batches_consumed: int) -> None:
        """Skip the first ``batches_consumed`` batches of the current epoch (they were already trained on)."""
        if not 0 <= batches_consumed <= len(self):
            raise ValueError(f"cannot skip {batches_consumed} batches of an epoch of {len(self)}")
        self._start = (self.epoch, int(batches_consumed))

    @property
    def start_batch(self) -> int:
        """How many batches the next iteration of the current epoch skips."""
        epoch, skip = self._start
        return skip if epoch == self.epoch else 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / (self.batch_size * self.world_size))

    def order(self, epoch: int | None = None) -> np.ndarray:
        """The global order of an epoch's samples (before it is cut into batches and dealt out)."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.lengths)
        if not self.shuffle:
            return np.argsort(-self.lengths, kind="stable") if self.group_by_length else np.arange(n)
        generator = epoch_generator(self.seed, epoch)
        if self.group_by_length:
            return length_grouped_order(
                self.lengths, self.batch_size * self.accumulation, generator, self.mega_batch_mult
            )
        return random_order(n, generator)

    def plan(self, epoch: int | None = None) -> list[list[int]]:
        """All ranks' batches of an epoch, step-major: rank ``r`` gets ``plan[r::world_size]``."""
        n, world = len(self.lengths), self.world_size
        if n == 0:
            return []
        order = self.order(epoch)
        per_step = self.batch_size * world
        full = (len(self) - 1) * per_step
        batches = [order[i : i + self.batch_size] for i in range(0, full, self.batch_size)]
        rest = order[full:]
        if len(rest) < world:
            rest = np.concatenate([rest, order[: world - len(rest)]])
        batches.extend(np.array_split(rest, world))
        return [b.tolist() for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the plan is made at the first next(), after Lightning's set_epoch.
        yield from self.plan()[self.rank :: self.world_size][self.start_batch :]


def split_indices(n: int, val_set_size: int, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """``(train, val)`` positions out of ``range(n)``, as ``datasets.Dataset.train_test_split(
    test_size=val_set_size, shuffle=True, seed=seed)`` holds them out, in its order.

    Its generator: ``numpy.random.default_rng(seed).permutation(n)``; the first ``val_set_size``
    positions are the test split, the rest the train split, both in permutation order. With
    ``val_set_size == 0`` (no validation) the train split is ``range(n)`` in source order.
    """
    if val_set_size == 0:
        return list(range(n)), []
    perm = np.random.default_rng(seed).permutation(n)
    return perm[val_set_size:].tolist(), perm[:val_set_size].tolist()
