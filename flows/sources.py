"""Sources: indexable collections of sample records (file listings, table rows, in-memory items).

A source knows its length and returns record ``i`` on demand, so the order of an epoch is a
pure function of (seed, epoch, position) and a restore jumps straight to its position.
Large sources keep no Python object per record: columns stay in Arrow or numpy (file listings
and Arrow tables memory-mapped from disk) and a record dict is built only when it is asked for.
Parquet tables are read one row group at a time: memory is bounded by a few row groups.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flows import io
from flows import manifest as manifest_module
from flows.errors import ColumnError, EmptySourceError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")

ARROW_EXTENSIONS = (".arrow", ".feather", ".ipc")

Where = Mapping[str, Any] | Callable[[pd.DataFrame], Any] | None
ColumnData: TypeAlias = "Mapping[str, Any] | pa.Table | pd.DataFrame"


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
        return _codes(self.table.column(name).chunks)


def _codes(chunks: Iterable[pa.Array]) -> np.ndarray:
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


class Files(Source):
    """Files under a directory, prefix or glob (local or any fsspec URL), sorted.

    Listed once per job into a manifest (see :mod:`flows.manifest`), which every rank and worker
    memory-maps: ``manifest`` names one to reuse (or to write, if it does not exist yet).
    Records are ``{"path": url, "key": path relative to the root}``.
    """

    name = "files"

    def __init__(
        self,
        url: str,
        extensions: Sequence[str] | None = AUDIO_EXTENSIONS,
        recursive: bool = True,
        storage_options: dict | None = None,
        manifest: str | os.PathLike[str] | None = None,
    ):
        self.url = url
        self.storage_options = storage_options
        self.manifest = manifest_module.shared(url, extensions, recursive, storage_options, manifest)
        self._paths = Columns(manifest_module.open_manifest(self.manifest))
        self._root = _glob_root(url)

    def __getstate__(self) -> dict:  # the manifest is memory-mapped again where it is used
        state = self.__dict__.copy()
        state["_paths"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._paths = Columns(manifest_module.open_manifest(self.manifest))

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict:
        path = self._paths.value(index, "path")
        return {"path": path, "key": _relative(path, self._root)}

    def key(self, index: int) -> str:
        return _relative(self._paths.value(index, "path"), self._root)

    def column(self, name: str) -> np.ndarray:
        if name == "key":
            return np.asarray([_relative(p, self._root) for p in self._paths.column("path")])
        if name == "path":
            return self._paths.column("path")
        return super().column(name)


def _glob_root(url: str) -> str:
    """The directory part of a URL or glob, absolute for local paths."""
    head = re.split(r"[*?\[]", url, maxsplit=1)[0]
    if head != url:
        head = head.rsplit("/", 1)[0]
    return head if "://" in head else os.path.abspath(head)


def _relative(path: str, root: str) -> str:
    strip = lambda s: s.split("://", 1)[-1]  # noqa: E731
    p, r = strip(path), strip(root).rstrip("/")
    return posixpath.relpath(p, r) if p.startswith(r + "/") else posixpath.basename(p)


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
        if self.kind == "parquet":
            schema = self._file().schema_arrow.names
        elif self.kind == "arrow":
            schema = manifest_module.open_manifest(url, storage_options).column_names
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
            table = manifest_module.open_manifest(url, storage_options)
            if where is not None:
                self._rows = np.flatnonzero(_arrow_mask(table, where, wanted))
            self._table = Columns(table.select(wanted))
        else:
            self._table = Columns(frame.loc[_mask(frame, where), wanted].reset_index(drop=True))
        if len(self) == 0:
            raise EmptySourceError(f"table {url} has no rows" + (" matching `where`" if where else ""))

    def __getstate__(self) -> dict:  # row-group readers and memory maps are reopened where used
        state = self.__dict__.copy()
        state.update(_parquet=None, _read_group=None, _codes={}, _reading=None)
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
            record["path"] = _join(self.root, str(record[self.path_column]))
        return record

    def key(self, index: int) -> str:
        return f"row {self._row(index)} of {self.url}"

    def _kept(self, values: np.ndarray) -> np.ndarray:
        return values if self._rows is None else values[self._rows]

    def column(self, name: str) -> np.ndarray:
        _check_columns(self.url, [name], self.columns)
        if self.kind != "parquet":
            return self._kept(self._table.column(name))
        return self._kept(self._read([name]).column(name).to_numpy(zero_copy_only=False))

    def codes(self, name: str) -> np.ndarray:
        """Read once, one row group at a time, and kept: a new epoch or a restore reads nothing."""
        _check_columns(self.url, [name], self.columns)
        if name not in self._codes:
            if self.kind != "parquet":
                self._codes[name] = self._kept(self._table.codes(name))
            else:
                groups = range(len(self._starts) - 1)
                self._codes[name] = self._kept(_codes(
                    self._read([name], g).column(0).combine_chunks()
                    for g in groups))
        return self._codes[name]

    def blocks(self) -> np.ndarray | None:
        if self.kind != "parquet":
            return None
        if self._rows is None:
            return self._starts
        return np.unique(np.searchsorted(self._rows, self._starts))


def _join(root: str | None, path: str) -> str:
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
        if inner is None:
            return None
        block_of = np.searchsorted(inner, self.indices, side="right")
        changes = np.flatnonzero(np.diff(block_of)) + 1
        return np.concatenate([[0], changes, [len(self.indices)]]).astype(np.int64)
