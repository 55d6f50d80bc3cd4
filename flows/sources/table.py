"""Table: the rows of a CSV, Parquet or Arrow IPC table. Parquet tables are read one row group at
a time (memory is bounded by a few row groups), Arrow tables are memory-mapped.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flows.errors import ColumnError, EmptySourceError
from flows.sources import manifest as manifest_module
from flows.sources.base import Source, blocks_of
from flows.sources.items import Columns, class_codes
from flows.storage import io

ARROW_EXTENSIONS = (".arrow", ".feather", ".ipc")


Where = Mapping[str, Any] | Callable[[pd.DataFrame], Any] | None


class Table(Source):
    """Rows of a CSV, Parquet or Arrow IPC file (local or any fsspec URL) as dicts.

    ``columns`` selects what is read, ``where`` keeps rows: a mapping ``{column: value or list of
    values}`` or a callable taking a DataFrame and returning a boolean mask. ``path_column`` and
    ``root`` turn a relative path column into a full URL in the record's ``path`` field.
    Parquet is streamed by row group: only the filter columns are read up front, and rows are
    read one row group at a time (a small LRU cache holds the groups in use). Arrow IPC files
    (``.arrow``, ``.feather``, ``.ipc``: e.g. a file manifest) are memory-mapped when local.
    """

    name = "table"

    def __init__(
        self,
        url: str,
        columns: Sequence[str] | None = None,
        where: Where = None,
        path_column: str | None = None,
        root: str | None = None,
        storage_options: dict | None = None,
        cached_row_groups: int = 4,
    ):
        self.url = url
        self.storage_options = storage_options
        self.path_column = path_column
        self.root = root
        self.cached_row_groups = cached_row_groups
        suffix = url.rstrip("/").lower()
        self.kind = ("parquet" if suffix.endswith((".parquet", ".pq")) else
                     "arrow" if suffix.endswith(ARROW_EXTENSIONS) else "csv")
        self._parquet: pq.ParquetFile | None = None
        self._reading = threading.Lock()  # see _read
        self._rows: np.ndarray | None = None  # rows kept by `where` (None: all)
        self._codes: dict[str, np.ndarray] = {}  # class codes read once (4 bytes per row)
        self._numbers: dict[str, np.ndarray] = {}  # numeric columns read once (durations)
        if self.kind == "parquet":
            schema = self._file().schema_arrow.names
        elif self.kind == "arrow":
            arrow = manifest_module.open_manifest(url, storage_options)
            schema = arrow.column_names
        else:
            with io.open_file(url, storage_options) as f:
                frame = pd.read_csv(f)
            schema = list(frame.columns)
        wanted = list(columns) if columns is not None else list(schema)
        if path_column is not None and path_column not in wanted:
            wanted.append(path_column)
        _check_columns(url, wanted + _where_columns(where), schema)
        self.columns = wanted
        if self.kind == "parquet":
            meta = self._file().metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self._rows = self._parquet_filter(where, wanted)
            self._read_group = functools.lru_cache(maxsize=cached_row_groups)(self._group)
        elif self.kind == "arrow":
            if where is not None:
                self._rows = np.flatnonzero(_arrow_mask(arrow, where, wanted))
            self._table = Columns(arrow.select(wanted))
        else:
            self._table = Columns(frame.loc[_mask(frame, where), wanted].reset_index(drop=True))
        if len(self) == 0:
            raise EmptySourceError(f"table {url} has no rows" + (" matching `where`" if where else ""))

    def __getstate__(self) -> dict:  # row-group readers and memory maps are reopened where used
        state = self.__dict__.copy()
        state.update(_parquet=None, _read_group=None, _codes={}, _numbers={}, _reading=None)
        if self.kind == "arrow":
            state["_table"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reading = threading.Lock()
        if self.kind == "parquet":
            self._read_group = functools.lru_cache(maxsize=self.cached_row_groups)(self._group)
        elif self.kind == "arrow":
            table = manifest_module.open_manifest(self.url, self.storage_options)
            self._table = Columns(table.select(self.columns))

    def _file(self) -> pq.ParquetFile:
        if self._parquet is None:
            # exact range reads, coalesced by pyarrow: reading a few columns of a row group
            # transfers just those column chunks
            handle = io.open_file(self.url, self.storage_options, cache_type="none")
            self._parquet = pq.ParquetFile(handle, pre_buffer=True)
        return self._parquet

    def _read(self, columns: list[str], group: int | None = None) -> pa.Table:
        """``columns`` of row group ``group`` (None: of the whole file). Reads take turns: the
        reader is shared by every loader of this flow, and pyarrow aborts on concurrent reads."""
        with self._reading:
            parquet = self._file()
            return parquet.read(columns=columns) if group is None else parquet.read_row_group(group, columns)

    def _group(self, group: int) -> Columns:
        return Columns(self._read(self.columns, group))

    def _parquet_filter(self, where: Where, columns: list[str]) -> np.ndarray | None:
        """Row numbers kept by ``where``, reading only its columns (all selected ones for a callable)."""
        if where is None:
            return None
        kept = []
        for g in range(len(self._starts) - 1):
            needed = _where_columns(where) or columns
            frame = self._read(needed, g).to_pandas()
            kept.append(self._starts[g] + np.flatnonzero(_mask(frame, where)))
        return np.concatenate(kept) if kept else np.zeros(0, np.int64)

    def __len__(self) -> int:
        if self._rows is not None:
            return len(self._rows)
        return int(self._starts[-1]) if self.kind == "parquet" else len(self._table)

    def _row(self, index: int) -> int:
        return int(index if self._rows is None else self._rows[index])

    def __getitem__(self, index: int) -> dict:
        row = self._row(index)
        if self.kind == "parquet":
            group = int(np.searchsorted(self._starts, row, side="right") - 1)
            record = self._read_group(group)[row - int(self._starts[group])]
        else:
            record = self._table[row]
        if self.path_column is not None:
            record["path"] = join_root(self.root, str(record[self.path_column]))
        return record

    def key(self, index: int) -> str:
        return f"row {self._row(index)} of {self.url}"

    def _kept(self, values: np.ndarray) -> np.ndarray:
        return values if self._rows is None else values[self._rows]

    def column(self, name: str) -> np.ndarray:
        """Numeric columns are read once and kept (as :meth:`codes`): plans ask every epoch."""
        _check_columns(self.url, [name], self.columns)
        if name in self._numbers:
            return self._numbers[name]
        if self.kind != "parquet":
            values = self._kept(self._table.column(name))
        else:
            values = self._kept(self._read([name]).column(name).to_numpy(zero_copy_only=False))
        if values.dtype.kind in "biuf":
            self._numbers[name] = values
        return values

    def codes(self, name: str) -> np.ndarray:
        """Read once, one row group at a time, and kept: a new epoch or a restore reads nothing."""
        _check_columns(self.url, [name], self.columns)
        if name not in self._codes:
            if self.kind != "parquet":
                self._codes[name] = self._kept(self._table.codes(name))
            else:
                groups = range(len(self._starts) - 1)
                self._codes[name] = self._kept(class_codes(
                    self._read([name], g).column(0).combine_chunks()
                    for g in groups))
        return self._codes[name]

    def blocks(self) -> np.ndarray | None:
        if self.kind != "parquet":
            return None
        return self._starts if self._rows is None else blocks_of(self._starts, self._rows)


def join_root(root: str | None, path: str) -> str:
    """``path`` below ``root``; a URL, an absolute path or no ``root`` keeps ``path`` as it is."""
    if root is None or "://" in path or path.startswith("/"):
        return path
    return root.rstrip("/") + "/" + path


def _where_columns(where: Where) -> list[str]:
    return list(where) if isinstance(where, Mapping) else []


def _check_columns(url: str, wanted: Sequence[str], existing: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in existing]
    if missing:
        raise ColumnError(f"table {url} has no column(s) {missing}; it has {list(existing)}")


def _arrow_mask(table: pa.Table, where: Where, columns: list[str]) -> np.ndarray:
    """``where`` on an Arrow table: a mapping in Arrow (no Python object per row), a callable on
    a DataFrame of the selected columns."""
    if callable(where):
        return _mask(table.select(columns).to_pandas(), where)
    mask = np.ones(table.num_rows, dtype=bool)
    for column, value in dict(where or {}).items():
        values = value if isinstance(value, (list, tuple, set)) else [value]
        mask &= pc.is_in(table.column(column), value_set=pa.array(list(values))).to_numpy(
            zero_copy_only=False)
    return mask


def _mask(frame: pd.DataFrame, where: Where) -> np.ndarray:
    if where is None:
        return np.ones(len(frame), dtype=bool)
    if callable(where):
        return np.asarray(where(frame), dtype=bool)
    mask = np.ones(len(frame), dtype=bool)
    for column, value in where.items():
        values = value if isinstance(value, (list, tuple, set)) else [value]
        mask &= frame[column].isin(list(values)).to_numpy()
    return mask
