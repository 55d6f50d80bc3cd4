"""Order and batch plans, and the Sampler: the root node of every flow.

An epoch's order is a pure function of (seed, epoch), computed on demand: the source index at
position ``p`` comes from a keyed bijection of ``range(n)`` (a Feistel network with cycle-walking,
as Grain's ``index_shuffle``), so no permutation is ever stored, and any slice of positions is
evaluated in vectorised numpy. Block-structured sources (Parquet row groups) get a block shuffle
the same way: a bijection over the blocks, then one over the rows of each window of blocks.

A *plan* cuts the order into global batches (fixed size, class-stratified, or duration buckets).
Fixed batches are slices of the order, computed when they are reached; stratified and bucketed
plans are computed per epoch in vectorised numpy and keep only compact integer arrays (at most
8 bytes per sample). Rank ``r`` of ``W`` takes ``batch[r::W]`` of every global batch, so each
rank gets the same number of batches and the union over ranks is the epoch, each sample once.

The Sampler's state is (epoch, global batch, slot): restoring recomputes the plan (no sample is
read) and jumps there, so restore time does not grow with the position; and because the cursor
counts global batches, a state saved on W ranks resumes on W' ranks with the same global batch size.
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

_CHUNK = 1 << 22  # positions evaluated at once when a whole epoch's order is needed
_ROUNDS = 4
_LARGE_WINDOW = 4096  # mean window size above which a whole epoch is evaluated window by window


def rng(*words: int | str) -> np.random.Generator:
    """A generator that is a pure function of its words (seed, epoch, sample key, ...)."""
    return np.random.default_rng([w if isinstance(w, int) else _hash(w) for w in words])


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def key(*words: int | str) -> int:
    """A 64-bit key that is a pure function of its words (seed, epoch, purpose)."""
    return _hash("/".join(map(str, words)))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic): a strong 64-bit mixer."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def permute(positions: np.ndarray, n: int, seed_key: int) -> np.ndarray:
    """Element ``positions`` of the keyed pseudo-random permutation of ``range(n)``: a bijection
    of ``range(n)`` for each key, O(1) memory and time per element, vectorised."""
    return Bijections([n], [seed_key])(np.asarray(positions))


class Bijections:
    """Keyed pseudo-random bijections of ``range(n[g])``, one per group ``g``, evaluated per position.

    A Feistel network on ``bits`` bits (the two halves ``bits // 2`` and ``bits - bits // 2``
    wide, swapping widths every round, 4 rounds of splitmix64) permutes ``range(2**bits)`` with
    ``n <= 2**bits < 2n``; cycle-walking (applying it again until the value falls in
    ``range(n)``) restricts it to ``range(n)``: under 2 evaluations per position on average."""

    def __init__(self, n: Sequence[int] | np.ndarray, keys: Sequence[int] | np.ndarray):
        self.size = np.asarray(n, dtype=np.uint64)
        bits = np.maximum(np.ceil(np.log2(np.maximum(self.size, 1).astype(np.float64))), 2)
        self.right = (bits // 2).astype(np.uint64)
        self.left = bits.astype(np.uint64) - self.right
        keys64 = np.asarray(keys, dtype=np.uint64)
        self.rounds = [_mix(keys64 + np.uint64(((r + 1) * 0x9E3779B97F4A7C15) % 2**64))
                       for r in range(_ROUNDS)]

    def __call__(self, positions: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
        """The images of ``positions`` (each in ``range(n[group])``; ``group`` defaults to 0)."""
        x = positions.astype(np.uint64).ravel()
        g = np.zeros(len(x), dtype=np.int64) if group is None else group.ravel()
        if len(self.size) == 1:
            g = np.zeros(1, dtype=np.int64)  # one group: its parameters broadcast
        x = self._feistel(x, g)
        out = np.flatnonzero(x >= self.size[g if len(g) == len(x) else g[:1]])
        while out.size:  # cycle-walk the values that fell outside range(n)
            sub = g[out] if len(g) == len(x) else g
            x[out] = self._feistel(x[out], sub)
            out = out[x[out] >= self.size[sub]]
        return x.astype(np.int64)

    def _feistel(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        left_bits, right_bits = self.left[g], self.right[g]
        left, right = x >> right_bits, x & ((np.uint64(1) << right_bits) - np.uint64(1))
        for round_keys in self.rounds:
            f = _mix(right ^ round_keys[g])
            f &= (np.uint64(1) << left_bits) - np.uint64(1)
            f ^= left
            left, right = right, f
            left_bits, right_bits = right_bits, left_bits
        left <<= right_bits
        left |= right
        return left


def _compact(indices: np.ndarray, n: int) -> np.ndarray:
    """Source indices in the smallest integer type that holds them (4 bytes below 2**31)."""
    return indices.astype(np.int32 if n < 2**31 else np.int64, copy=False)


class EpochOrder:
    """One epoch's order: ``order[positions]`` gives the source indices at those positions
    (a slice or an array), computed on demand; ``np.asarray(order)`` evaluates the whole epoch
    (4 bytes per sample below 2**31 samples).

    State is O(1), or O(blocks) for a block shuffle: nothing per sample is stored."""

    def __init__(self, n: int, seed: int | None, epoch: int, blocks: np.ndarray | None = None,
                 window: int = 4):
        self.n, self.seed = n, seed
        self._key = key(seed, epoch, "order") if seed is not None else 0
        self._blocks: np.ndarray | None = None
        if seed is not None and blocks is not None:
            count = len(blocks) - 1
            self._blocks = blocks
            self._block_order = permute(np.arange(count), count, key(seed, epoch, "blocks"))
            sizes = np.diff(blocks)[self._block_order]
            self._shuffled_starts = np.concatenate([[0], np.cumsum(sizes)])
            self._windows = self._shuffled_starts[np.r_[0:count:window, count]]
            windows = np.arange(len(self._windows) - 1, dtype=np.uint64)
            self._window_keys = _mix(np.uint64(self._key) ^ _mix(windows + np.uint64(1)))
            self._inside = Bijections(np.diff(self._windows), self._window_keys)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, positions: slice | np.ndarray) -> np.ndarray:
        p = np.arange(*positions.indices(self.n)) if isinstance(positions, slice) else np.asarray(positions)
        if self.seed is None:
            return p.astype(np.int64)
        if self._blocks is None:
            return permute(p, self.n, self._key)
        # the block shuffle: windows of shuffled blocks, rows shuffled within each window
        w = np.searchsorted(self._windows, p, side="right") - 1
        start = self._windows[w]
        return self._rows(start + self._inside(p - start, w))

    def _rows(self, q: np.ndarray) -> np.ndarray:
        """Source indices at positions ``q`` of the concatenation of the shuffled blocks."""
        assert self._blocks is not None
        b = np.searchsorted(self._shuffled_starts, q, side="right") - 1
        return self._blocks[self._block_order[b]] + (q - self._shuffled_starts[b])

    def _window(self, w: int) -> np.ndarray:
        """The whole of window ``w``, its parameters shared by all its positions."""
        start, stop = int(self._windows[w]), int(self._windows[w + 1])
        return self._rows(start + Bijections([stop - start], self._window_keys[w : w + 1])(
            np.arange(stop - start)))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        windows = len(self._windows) - 1 if self._blocks is not None else 0
        if windows and self.n >= _LARGE_WINDOW * windows:  # window by window: no per-position keys
            parts = [self._window(w) for w in range(windows)]
        else:
            parts = [self[start : start + _CHUNK] for start in range(0, self.n, _CHUNK)]
        whole = np.concatenate([_compact(part, self.n) for part in parts] or [np.zeros(0, np.int32)])
        return whole if dtype is None else whole.astype(dtype)


@dataclass(frozen=True)
class Order:
    """How an epoch orders the source: sequential, or shuffled by ``seed`` (block-wise for
    row groups: ``window`` shuffled blocks at a time)."""

    seed: int | None = None
    window: int = 4

    def __call__(self, source: Source, epoch: int) -> EpochOrder:
        blocks = source.blocks() if self.seed is not None else None
        return EpochOrder(len(source), self.seed, epoch, blocks, self.window)


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
        return Segments(_compact(indices, len(source)), first[shuffled], last[shuffled])


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
        self._batches: Batches = Segments.of([])
        self._planned_epoch = -1
        self._mine: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))  # this rank's current slice

    def _plan(self, epoch: int) -> Batches:
        if self._planned_epoch != epoch:
            self._batches, self._planned_epoch = self._planned(epoch), epoch
            self._mine = (-1, np.zeros(0, np.int64))
            if not len(self._batches):
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

    def _planned(self, epoch: int) -> Batches:
        batches = self.plan(self.order(self.source, epoch), self.source, self.order.seed or 0, epoch)
        if not isinstance(batches, Batches):
            batches = Segments.of(batches)
        # every rank gets one slice of every global batch: drop the ones too small to share
        return batches.at_least(self.world_size)

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
        if self._mine[0] != self._batch:
            self._mine = (self._batch, batches[self._batch][self.rank :: self.world_size])
        mine = self._mine[1]
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
