"""The order of an epoch, a pure function of (seed, epoch), computed on demand: the source index at
position ``p`` comes from a keyed bijection of ``range(n)`` (a Feistel network with cycle-walking,
as Grain's ``index_shuffle``), so no permutation is ever stored, and any slice of positions is
evaluated in vectorised numpy. Block-structured sources (Parquet row groups) get a block shuffle
the same way: a bijection over the blocks, then one over the rows of each window of blocks.
Also the seeded generators every random choice in flows draws from (:func:`rng`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flows.errors import FlowsError
from flows.sources.base import Source

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
        single = len(self.size) == 1  # one group: its parameters broadcast
        g = (np.zeros(1 if single else len(x), dtype=np.int64) if single or group is None
             else group.ravel())
        x = self._feistel(x, g)
        out = np.flatnonzero(x >= self.size[g])
        while out.size:  # cycle-walk the values that fell outside range(n)
            sub = g if single else g[out]
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


def compact(indices: np.ndarray, n: int) -> np.ndarray:
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
        whole = np.concatenate([compact(part, self.n) for part in parts] or [np.zeros(0, np.int32)])
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


def splits(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded random partition of ``range(n)`` into parts with the given fractions."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise FlowsError(f"split fractions {list(fractions)} do not add up to 1")
    perm = rng(seed, "split").permutation(n)
    bounds = np.round(np.cumsum([0.0, *fractions]) * n).astype(int)
    return [np.sort(perm[bounds[i] : bounds[i + 1]]) for i in range(len(fractions))]
