"""Source: an indexable collection of sample records (file listings: :mod:`.files`, table rows:
:mod:`.table`, in-memory items: :mod:`.items`), and Subset, a selection of one.

A source knows its length and returns record ``i`` on demand, so the order of an epoch is a
pure function of (seed, epoch, position) and a restore jumps straight to its position.
Large sources keep no Python object per record: columns stay in Arrow or numpy (file listings
and Arrow tables memory-mapped from disk) and a record dict is built only when it is asked for.
Parquet tables are read one row group at a time: memory is bounded by a few row groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from flows.errors import EmptySourceError


class Source:
    """An indexable collection of records. Subclasses implement ``__len__`` and ``__getitem__``."""

    name = "source"

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Any:
        raise NotImplementedError

    def key(self, index: int) -> str:
        """A stable identifier of record ``index``: seeds its randomness and names it in errors."""
        return str(index)

    def column(self, name: str) -> np.ndarray:
        """Values of one field for every record (labels, durations), read without the payload."""
        return np.asarray([self[i][name] for i in range(len(self))])

    def codes(self, name: str) -> np.ndarray:
        """One field as small non-negative integer class codes (int32; equal values, equal
        codes): what stratified plans use, 4 bytes per record."""
        return pd.factorize(self.column(name), use_na_sentinel=False)[0].astype(np.int32)

    def blocks(self) -> np.ndarray | None:
        """Runs of positions that are cheap to read together (Parquet row groups), as their
        starts followed by ``len(self)``; None if any order is."""
        return None


class Subset(Source):
    """A view of another source restricted to some indices (splits, folds, metadata filters)."""

    def __init__(self, source: Source, indices: Sequence[int] | np.ndarray):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name = source.name
        if len(self.indices) == 0:
            raise EmptySourceError(f"no {source.name} records are left after filtering")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.source[int(self.indices[index])]

    def key(self, index: int) -> str:
        return self.source.key(int(self.indices[index]))

    def column(self, name: str) -> np.ndarray:
        return self.source.column(name)[self.indices]

    def codes(self, name: str) -> np.ndarray:
        return self.source.codes(name)[self.indices]

    def blocks(self) -> np.ndarray | None:
        """Runs of consecutive positions whose records share a block of the inner source."""
        inner = self.source.blocks()
        return None if inner is None else blocks_of(inner, self.indices)


def blocks_of(starts: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The blocks of a selection ``indices`` of positions divided into blocks at ``starts`` (as
    :meth:`Source.blocks`): runs of consecutive selected positions in the same block."""
    block_of = np.searchsorted(starts, indices, side="right")
    changes = np.flatnonzero(np.diff(block_of)) + 1
    return np.concatenate([[0], changes, [len(indices)]]).astype(np.int64)
