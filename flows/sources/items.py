"""In-memory sources: :class:`Items` (any sequence of records) and :class:`Columns` (equal-length
columns kept in Arrow or numpy, a record dict built only when it is asked for).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from flows.errors import EmptySourceError
from flows.sources.base import Source

ColumnData: TypeAlias = "Mapping[str, Any] | pa.Table | pd.DataFrame"


class Columns(Source):
    """Records built on demand from columns: a mapping of equal-length sequences or arrays, a
    ``pyarrow.Table`` (memory-mapped ones stay on disk) or a DataFrame. Only the columns are
    kept (as Arrow arrays); each record is a dict of plain Python values, made when asked for.
    A ``key`` column names the records (errors, per-sample randomness); else the row number."""

    name = "items"

    def __init__(self, data: ColumnData):
        if isinstance(data, pd.DataFrame):
            table = pa.Table.from_pandas(data, preserve_index=False)
        elif isinstance(data, pa.Table):
            table = data
        else:
            table = pa.table({k: np.asarray(v) if isinstance(v, range) else v for k, v in data.items()})
        self.table = table
        self._batches = table.to_batches()
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[pa.RecordBatch, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        b = int(np.searchsorted(self._starts, index, side="right") - 1)
        return self._batches[b], index - int(self._starts[b])

    def __getitem__(self, index: int) -> dict:
        batch, row = self._locate(index)
        return {name: batch.column(i)[row].as_py() for i, name in enumerate(batch.schema.names)}

    def value(self, index: int, name: str) -> Any:
        """One field of record ``index``."""
        batch, row = self._locate(index)
        return batch.column(name)[row].as_py()

    def key(self, index: int) -> str:
        return str(self.value(index, "key")) if "key" in self.table.column_names else str(index)

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy()

    def codes(self, name: str) -> np.ndarray:
        return class_codes(self.table.column(name).chunks)


def class_codes(chunks: Iterable[pa.Array]) -> np.ndarray:
    """Integer class codes of the values in ``chunks``, in order of first appearance, computed in
    Arrow: one Python object per distinct value, none per row."""
    known: dict[Any, int] = {}
    parts = [np.zeros(0, np.int32)]
    for chunk in chunks:
        values = pc.unique(chunk)
        local = pc.index_in(chunk, value_set=values).to_numpy(zero_copy_only=False)
        mapping = np.array([known.setdefault(v, len(known)) for v in values.to_pylist()], np.int32)
        parts.append(mapping[local])
    return np.concatenate(parts)


class Items(Source):
    """An in-memory sequence. Dict items keep a ``key`` field as their identifier when present."""

    name = "items"

    def __init__(self, items: Sequence[Any]):
        self.items = list(items)
        if not self.items:
            raise EmptySourceError("Flow.items got an empty sequence")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]

    def key(self, index: int) -> str:
        item = self.items[index]
        if isinstance(item, Mapping) and "key" in item:
            return str(item["key"])
        return str(index)
