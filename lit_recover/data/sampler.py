"""``ShardedBatchSampler`` (seeded shuffling or length grouping, one disjoint shard per rank, resumable)
and the train/validation split."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class ShardedBatchSampler(Sampler[list[int]]):
    """Micro-batches of indices for one rank: seeded shuffling or length grouping, resumable.

    Every epoch is planned globally, then dealt out: step ``s`` gives rank ``r`` the batch
    ``s * world_size + r``. So the shards are disjoint, together cover the data, and every rank
    gets ``len(self)`` batches. All steps but the last hold ``batch_size`` samples per rank; the last
    one splits the remainder evenly over the ranks (when fewer samples than ranks remain, the
    first samples of the epoch are repeated so that no rank gets an empty batch).

    With ``group_by_length`` (and ``shuffle``), the shuffled indices are cut into megabatches of
    ``megabatch_steps`` steps, each sorted by length (longest first) before being cut into
    batches, so a micro-batch holds similar lengths; the steps are then shuffled, except that the
    step holding the longest sample goes first (an out-of-memory shows up at once). Without
    ``shuffle`` (validation) the order is the data order, or longest first when grouping.

    Resuming: ``set_epoch(e)`` picks the epoch's plan (the same on every rank for the same seed);
    ``set_start_batch(k)`` skips the first ``k`` batches of the current epoch without touching
    them, until the epoch changes. ``len()`` stays the full epoch length, which is what Lightning
    expects when it restores its own batch counter on resume.

    Args:
        lengths: the token count of every sample.
        batch_size: samples per micro-batch on one rank.
        shuffle: a new seeded order every epoch; off for validation.
        group_by_length: put samples of similar length in the same batch.
        seed: the base seed; the epoch's order depends on ``(seed, epoch)`` only.
        rank: this process's rank.
        world_size: the number of ranks.
        megabatch_steps: steps per megabatch when grouping; ``None`` means 50 (HF's multiplier), or
            the whole epoch when it is shorter. Smaller megabatches mix lengths more between
            epochs and group them less well.
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
        megabatch_steps: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.megabatch_steps = megabatch_steps
        self.epoch = 0
        self._start: tuple[int, int] = (0, 0)  # (epoch, batches to skip in it)

    @property
    def sampler(self) -> ShardedBatchSampler:
        # Lightning calls set_epoch on ``dataloader.batch_sampler.sampler``; point it at us.
        return self

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s plan from the next iteration on; moving to another epoch ends a skip."""
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

    def plan(self, epoch: int | None = None) -> list[list[int]]:
        """All ranks' batches of an epoch, step-major: rank ``r`` gets ``plan[r::world_size]``."""
        epoch = self.epoch if epoch is None else epoch
        n, world = len(self.lengths), self.world_size
        if n == 0:
            return []
        per_step = self.batch_size * world
        steps = len(self)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            if self.shuffle:
                mega_steps = self.megabatch_steps or min(50, steps)
                mega = per_step * mega_steps
                order = np.concatenate(
                    [c[np.argsort(-self.lengths[c], kind="stable")] for c in np.split(order, range(mega, n, mega))]
                )
            else:
                order = np.argsort(-self.lengths, kind="stable")
        full = (steps - 1) * per_step
        batches = [order[i : i + self.batch_size] for i in range(0, full, self.batch_size)]
        rest = order[full:]
        if len(rest) < world:
            rest = np.concatenate([rest, order[: world - len(rest)]])
        batches.extend(np.array_split(rest, world))
        if self.group_by_length and self.shuffle and steps > 1:
            step_max = [max(self.lengths[b].max() for b in batches[s * world : (s + 1) * world]) for s in range(steps)]
            first = int(np.argmax(step_max))
            rest_steps = [s for s in rng.permutation(steps).tolist() if s != first]
            batches = [b for s in [first, *rest_steps] for b in batches[s * world : (s + 1) * world]]
        return [b.tolist() for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the plan is made at the first next(), after Lightning's set_epoch.
        yield from self.plan()[self.rank :: self.world_size][self.start_batch :]


def split_indices(n: int, val_set_size: int, seed: int) -> tuple[list[int], list[int]]:
    """``(train, val)`` positions out of ``range(n)``: ``val_set_size`` held out at random by ``seed``, both sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[val_set_size:].tolist()), sorted(perm[:val_set_size].tolist())
