"""Plans: cut an epoch's order into global batches (fixed size, class-stratified, or duration
buckets). Fixed batches are slices of the order, computed when they are reached; stratified and
bucketed plans are computed per epoch in vectorised numpy and keep only compact integer arrays
(at most 8 bytes per sample). Rank ``r`` of ``W`` takes ``batch[r::W]`` of every global batch, so
each rank gets the same number of batches and the union over ranks is the epoch, each sample once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flows.sampling.order import EpochOrder, compact, rng
from flows.sources.base import Source


class Batches:
    """One epoch's global batches: ``batches[b]`` is an array of source indices."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, b: int) -> np.ndarray:
        raise NotImplementedError

    def at_least(self, size: int) -> Batches:
        """These batches without the ones smaller than ``size``."""
        raise NotImplementedError


class Chunks(Batches):
    """Consecutive chunks of ``size`` of an order (an EpochOrder or an index array), cut when asked."""

    def __init__(self, order: EpochOrder | np.ndarray, size: int, drop_last: bool = False):
        self.order, self.size = order, size
        full, rest = divmod(len(order), size)
        self.count = full + (1 if rest and not drop_last else 0)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, b: int) -> np.ndarray:
        if not 0 <= b < self.count:
            raise IndexError(b)
        return np.asarray(self.order[b * self.size : (b + 1) * self.size])

    def at_least(self, size: int) -> Chunks:
        last = len(self.order) - (self.count - 1) * self.size if self.count else size
        if last < size:
            shorter = Chunks(self.order, self.size)
            shorter.count = self.count - 1
            return shorter
        return self


class Segments(Batches):
    """Batches as ``indices[starts[b]:ends[b]]``: compact arrays, no Python object per batch."""

    def __init__(self, indices: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.indices, self.starts, self.ends = indices, starts, ends

    @classmethod
    def of(cls, batches: Sequence[np.ndarray]) -> Segments:
        """From a list of index arrays (what a custom :class:`Plan` may return)."""
        lengths = np.asarray([len(b) for b in batches], dtype=np.int64)
        ends = np.cumsum(lengths)
        indices = np.concatenate(list(batches)) if len(batches) else np.zeros(0, np.int64)
        return cls(indices.astype(np.int64), ends - lengths, ends)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, b: int) -> np.ndarray:
        return self.indices[self.starts[b] : self.ends[b]].astype(np.int64)

    def at_least(self, size: int) -> Segments:
        keep = (self.ends - self.starts) >= size
        return self if keep.all() else Segments(self.indices, self.starts[keep], self.ends[keep])


def as_batches(batches: Batches | Sequence[np.ndarray]) -> Batches:
    """A plan's output as :class:`Batches` (a custom plan may return a list of index arrays)."""
    return batches if isinstance(batches, Batches) else Segments.of(batches)


class Plan:
    """Cuts an epoch's order into global batches: returns :class:`Batches` (or a list of
    index arrays)."""

    def __call__(self, order: EpochOrder, source: Source, seed: int, epoch: int) -> Batches:
        raise NotImplementedError


@dataclass(frozen=True)
class FixedBatches(Plan):
    """Consecutive chunks of ``size`` (the global batch size); a short last batch is kept
    unless ``drop_last``. Nothing is computed before a batch is reached."""

    size: int
    drop_last: bool = False

    def __call__(self, order, source, seed, epoch):
        return Chunks(order, self.size, self.drop_last)


@dataclass(frozen=True)
class StratifiedBatches(Plan):
    """Batches of ``size`` with about equal counts per class of ``label``: classes take turns
    (in a seeded order), each contributing its next sample in the epoch's order. Every sample is
    used once; when a class runs out the others fill its turns. Kept per epoch: one index array."""

    size: int
    label: str
    drop_last: bool = False

    def __call__(self, order, source, seed, epoch):
        indices = np.asarray(order)
        classes = source.codes(self.label)[indices]
        count = int(classes.max()) + 1 if len(classes) else 0
        sizes = np.bincount(classes, minlength=count)
        # round r holds the r-th sample of every class with more than r samples, classes taking
        # turns: before it come all the samples of rounds < r (`earlier`), then those of round r
        # from the classes whose turn comes first
        rounds = np.sort(sizes)
        earlier = np.concatenate([[0], np.cumsum(count - np.searchsorted(rounds, np.arange(rounds[-1]),
                                                                          side="right"))])
        members = np.argsort(classes.astype(np.int16) if count < 2**15 else classes, kind="stable")
        del classes  # the peak is here: 4 + 8 bytes per sample, then 4 for the plan
        firsts = np.cumsum(sizes) - sizes
        picked = np.empty(len(indices), dtype=np.int32 if len(source) < 2**31 else np.int64)
        before: np.ndarray = np.zeros(0, np.int64)  # sizes of the classes whose turn came, sorted
        for c in rng(seed, epoch, "stratify").permutation(count):
            r = np.arange(sizes[c])
            alive_before = len(before) - np.searchsorted(before, r, side="right")
            picked[earlier[r] + alive_before] = indices[members[firsts[c] : firsts[c] + sizes[c]]]
            before = np.insert(before, np.searchsorted(before, sizes[c]), sizes[c])
        return Chunks(picked, self.size, self.drop_last)


@dataclass(frozen=True)
class DurationBuckets(Plan):
    """Batches whose total duration stays under ``max_seconds`` (global, over all ranks).

    The order is cut into pools of ``pool`` samples; each pool is sorted by duration so batches
    hold similar lengths (little padding) and cut greedily, then the batches are shuffled.
    Kept per epoch: one index array and the batches' bounds."""

    max_seconds: float
    duration: str = "duration"
    pool: int = 512
    min_size: int = 1

    def __call__(self, order, source, seed, epoch):
        indices = np.asarray(order)
        n = len(indices)
        durations = np.asarray(source.column(self.duration), dtype=np.float64)[indices]
        pools = np.arange(n) // self.pool
        by_length = np.lexsort((durations, pools))
        indices, durations = indices[by_length], durations[by_length]
        total = np.concatenate([[0.0], np.cumsum(durations)])
        starts, ends = [], []
        cursor = np.arange(0, n, self.pool)  # every pool cuts its next batch at once
        while cursor.size:
            limit = np.minimum((cursor // self.pool + 1) * self.pool, n)
            end = np.searchsorted(total, total[cursor] + self.max_seconds, side="right") - 1
            end = np.clip(end, cursor + 1, limit)
            starts.append(cursor)
            ends.append(end)
            cursor = end[end < limit]
        first, last = (np.concatenate(starts), np.concatenate(ends)) if starts else (pools, pools)
        keep = np.argsort(first)
        keep = keep[(last[keep] - first[keep]) >= self.min_size]
        shuffled = keep[rng(seed, epoch, "buckets").permutation(len(keep))]
        return Segments(compact(indices, len(source)), first[shuffled], last[shuffled])
