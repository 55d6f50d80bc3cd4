"""Order and batch plans, and the Sampler: the root node of every flow.

An epoch's order is a pure function of (seed, epoch): a global permutation for indexable
sources, or a block shuffle (blocks, then rows within a window of blocks) for Parquet row
groups. A *plan* cuts the order into global batches (fixed size, class-stratified, or duration
buckets). Rank ``r`` of ``W`` takes ``batch[r::W]`` of every global batch, so each rank gets the
same number of batches and the union over ranks is the epoch, each sample once.

The Sampler's state is (epoch, global batch, slot): restoring recomputes the plan (no I/O) and
jumps there, so restore time does not grow with the position; and because the cursor counts
global batches, a state saved on W ranks resumes on W' ranks with the same global batch size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torchdata.nodes import BaseNode

from flows.errors import EmptySourceError, FlowsError
from flows.sources import Source


def rng(*words: int | str) -> np.random.Generator:
    """A generator that is a pure function of its words (seed, epoch, sample key, ...)."""
    return np.random.default_rng([w if isinstance(w, int) else _hash(w) for w in words])


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Order:
    """How an epoch orders the source: sequential, or shuffled by ``seed`` (block-wise for row groups)."""

    seed: int | None = None
    window: int = 4  # row groups shuffled together when the source is block-structured

    def __call__(self, source: Source, epoch: int) -> np.ndarray:
        n = len(source)
        if self.seed is None:
            return np.arange(n)
        gen = rng(self.seed, epoch)
        blocks = source.blocks()
        if blocks is None:
            return gen.permutation(n)
        blocks = [blocks[b] for b in gen.permutation(len(blocks))]
        windows = [np.concatenate(blocks[i : i + self.window]) for i in range(0, len(blocks), self.window)]
        return np.concatenate([gen.permutation(w) for w in windows if len(w)])


class Plan:
    """Cuts an epoch's order into global batches (arrays of source indices)."""

    def __call__(self, order: np.ndarray, source: Source, seed: int, epoch: int) -> list[np.ndarray]:
        raise NotImplementedError


@dataclass(frozen=True)
class FixedBatches(Plan):
    """Consecutive chunks of ``size`` (the global batch size); a short last batch is kept
    unless ``drop_last``."""

    size: int
    drop_last: bool = False

    def __call__(self, order, source, seed, epoch):
        batches = [order[i : i + self.size] for i in range(0, len(order), self.size)]
        if batches and self.drop_last and len(batches[-1]) < self.size:
            batches.pop()
        return batches


@dataclass(frozen=True)
class StratifiedBatches(Plan):
    """Batches of ``size`` with about equal counts per class of ``label``: classes take turns,
    each contributing its next sample in the epoch's order. Every sample is used once; when a
    class runs out the others fill its turns."""

    size: int
    label: str
    drop_last: bool = False

    def __call__(self, order, source, seed, epoch):
        labels = source.column(self.label)[order]
        classes = sorted(set(labels.tolist()), key=str)
        queues = [list(order[labels == c]) for c in classes]
        turn = rng(seed, epoch, "stratify").permutation(len(queues)).tolist()
        picked: list[int] = []
        while any(queues):
            for q in turn:
                if queues[q]:
                    picked.append(queues[q].pop(0))
        return FixedBatches(self.size, self.drop_last)(np.asarray(picked), source, seed, epoch)


@dataclass(frozen=True)
class DurationBuckets(Plan):
    """Batches whose total duration stays under ``max_seconds`` (global, over all ranks).

    The order is cut into pools of ``pool`` samples; each pool is sorted by duration so batches
    hold similar lengths (little padding), then the batches are shuffled."""

    max_seconds: float
    duration: str = "duration"
    pool: int = 512
    min_size: int = 1

    def __call__(self, order, source, seed, epoch):
        durations = source.column(self.duration).astype(float)
        batches: list[np.ndarray] = []
        for start in range(0, len(order), self.pool):
            pool = order[start : start + self.pool]
            pool = pool[np.argsort(durations[pool], kind="stable")]
            current: list[int] = []
            total = 0.0
            for i in pool:
                if current and total + durations[i] > self.max_seconds:
                    batches.append(np.asarray(current))
                    current, total = [], 0.0
                current.append(int(i))
                total += durations[i]
            if current:
                batches.append(np.asarray(current))
        batches = [b for b in batches if len(b) >= self.min_size]
        return [batches[i] for i in rng(seed, epoch, "buckets").permutation(len(batches))]


@dataclass
class Envelope:
    """One sample on its way through a flow: the record plus where it sits in the epoch."""

    item: Any
    key: str
    epoch: int
    batch: int  # global batch index in the epoch
    slot: int  # position in this rank's slice of that batch
    size: int  # length of this rank's slice

    @property
    def last(self) -> bool:
        return self.slot == self.size - 1


class Sampler(BaseNode[Envelope]):
    """Root node: yields this rank's samples of each epoch in plan order, as Envelopes.

    Each ``reset()`` without a state after the first starts the next epoch.
    """

    def __init__(
        self,
        source: Source,
        order: Order = Order(),
        plan: Plan | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise FlowsError(f"rank {rank} is not in a world of size {world_size}")
        self.source, self.order, self.rank, self.world_size = source, order, rank, world_size
        self.plan = plan or FixedBatches(world_size)
        self.epoch = 0
        self._started = False
        self._batches: list[np.ndarray] = []
        self._planned_epoch = -1

    def _plan(self, epoch: int) -> list[np.ndarray]:
        if self._planned_epoch != epoch:
            self._batches, self._planned_epoch = self._planned(epoch), epoch
            if not self._batches:
                raise EmptySourceError(
                    f"the {self.source.name} source has {len(self.source)} samples: too few for "
                    f"one batch on each of {self.world_size} ranks"
                )
        return self._batches

    def __len__(self) -> int:
        """Batches per epoch for each rank."""
        return len(self._plan(self.epoch))

    def planned(self, epoch: int) -> int:
        """Batches of ``epoch`` for each rank."""
        return len(self._batches) if epoch == self._planned_epoch else len(self._planned(epoch))

    def _planned(self, epoch: int) -> list[np.ndarray]:
        batches = self.plan(self.order(self.source, epoch), self.source, self.order.seed or 0, epoch)
        # every rank gets one slice of every global batch: drop the ones too small to share
        return [b for b in batches if len(b) >= self.world_size]

    def seek(self, epoch: int) -> None:
        """Make the next ``reset()`` without a state start ``epoch`` (a Mix restarting its flows)."""
        self.epoch, self._started = epoch - 1, True

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        if initial_state is not None:
            self.epoch = initial_state["epoch"]
            self._batch, self._slot = initial_state["batch"], initial_state["slot"]
            if self._slot and initial_state["world_size"] != self.world_size:
                raise FlowsError(
                    f"cannot resume mid-batch on {self.world_size} ranks a state saved on "
                    f"{initial_state['world_size']}: save loader state between batches"
                )
        else:
            if self._started:
                self.epoch += 1
            self._batch, self._slot = 0, 0
        self._started = True
        self._plan(self.epoch)

    def next(self) -> Envelope:
        batches = self._plan(self.epoch)
        if self._batch >= len(batches):
            raise StopIteration
        mine = batches[self._batch][self.rank :: self.world_size]
        index = int(mine[self._slot])
        envelope = Envelope(
            item=self.source[index],
            key=self.source.key(index),
            epoch=self.epoch,
            batch=self._batch,
            slot=self._slot,
            size=len(mine),
        )
        self._slot += 1
        if self._slot == len(mine):
            self._batch, self._slot = self._batch + 1, 0
        return envelope

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "batch": self._batch, "slot": self._slot,
                "world_size": self.world_size}


def splits(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded random partition of ``range(n)`` into parts with the given fractions."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise FlowsError(f"split fractions {list(fractions)} do not add up to 1")
    perm = rng(seed, "split").permutation(n)
    bounds = np.round(np.cumsum([0.0, *fractions]) * n).astype(int)
    return [np.sort(perm[bounds[i] : bounds[i + 1]]) for i in range(len(fractions))]
