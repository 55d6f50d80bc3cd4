"""Sources: indexable collections of sample records (file listings, table rows, in-memory items).

A source knows its length and returns record ``i`` on demand, so the order of an epoch is a
pure function of (seed, epoch, position) and a restore jumps straight to its position.
Parquet tables are read one row group at a time: memory is bounded by a few row groups.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from flows import io
from flows.errors import ColumnError, EmptySourceError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")

Where = Mapping[str, Any] | Callable[[pd.DataFrame], Any] | None


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

    def blocks(self) -> list[np.ndarray] | None:
        """Index ranges that are cheap to read together (Parquet row groups); None if any order is."""
        return None


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
    """Files under a directory, prefix or glob (local or any fsspec URL), listed once, sorted.

    Records are ``{"path": url, "key": path relative to the root}``.
    """

    name = "files"

    def __init__(
        self,
        url: str,
        extensions: Sequence[str] | None = AUDIO_EXTENSIONS,
        recursive: bool = True,
        storage_options: dict | None = None,
        paths: Sequence[str] | None = None,
    ):
        self.url = url
        self.storage_options = storage_options
        self.paths = list(paths) if paths is not None else _list_once(
            url, extensions, recursive, storage_options
        )
        root = _glob_root(url)
        self._keys = [_relative(p, root) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"path": self.paths[index], "key": self._keys[index]}

    def key(self, index: int) -> str:
        return self._keys[index]

    def column(self, name: str) -> np.ndarray:
        if name in ("path", "key"):
            return np.asarray(self.paths if name == "path" else self._keys)
        return super().column(name)


def _list_once(url: str, extensions: Sequence[str] | None, recursive: bool,
               storage_options: dict | None) -> list[str]:
    """List on rank 0 only and broadcast to the other ranks: no listing storm on object stores.
    (Workers never list: the sampler runs in the main process.) The sizes travel with the URLs,
    so every rank reads each remote file with a single GET (see :func:`flows.io.remember_sizes`)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return io.list_files(url, extensions, recursive=recursive, storage_options=storage_options)
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = io.list_files_with_sizes(url, extensions, recursive, storage_options)
        except Exception as error:  # noqa: BLE001 - every rank must raise it, not hang
            box[0] = error
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    if "://" in url:
        io.remember_sizes(box[0])
    return list(box[0])


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
    """Rows of a CSV or Parquet file (local or any fsspec URL) as dicts.

    ``columns`` selects what is read, ``where`` keeps rows: a mapping ``{column: value or list of
    values}`` or a callable taking a DataFrame and returning a boolean mask. ``path_column`` and
    ``root`` turn a relative path column into a full URL in the record's ``path`` field.
    Parquet is streamed by row group: only the filter columns are read up front, and rows are
    read one row group at a time (a small LRU cache holds the groups in use).
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
        self.is_parquet = url.rstrip("/").lower().endswith((".parquet", ".pq"))
        self._parquet: pq.ParquetFile | None = None
        if self.is_parquet:
            schema = self._file().schema_arrow.names
        else:
            with io.open_file(url, storage_options) as f:
                self._frame = pd.read_csv(f)
            schema = list(self._frame.columns)
        wanted = list(columns) if columns is not None else list(schema)
        if path_column is not None and path_column not in wanted:
            wanted.append(path_column)
        _check_columns(url, wanted + _where_columns(where), schema)
        self.columns = wanted
        if self.is_parquet:
            meta = self._file().metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self._rows = self._parquet_filter(where, wanted)
            self._read_group = functools.lru_cache(maxsize=cached_row_groups)(self._group)
        else:
            mask = _mask(self._frame, where)
            self._frame = self._frame.loc[mask, wanted].reset_index(drop=True)
            self._records = self._frame.to_dict("records")
        if len(self) == 0:
            raise EmptySourceError(f"table {url} has no rows" + (" matching `where`" if where else ""))

    def __getstate__(self) -> dict:  # row-group readers are reopened where they are used
        state = self.__dict__.copy()
        state.update(_parquet=None, _read_group=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.is_parquet:
            self._read_group = functools.lru_cache(maxsize=self.cached_row_groups)(self._group)

    def _file(self) -> pq.ParquetFile:
        if self._parquet is None:
            # exact range reads, coalesced by pyarrow: reading a few columns of a row group
            # transfers just those column chunks
            handle = io.open_file(self.url, self.storage_options, cache_type="none")
            self._parquet = pq.ParquetFile(handle, pre_buffer=True)
        return self._parquet

    def _group(self, group: int) -> list[dict]:
        return self._file().read_row_group(group, columns=self.columns).to_pylist()

    def _parquet_filter(self, where: Where, columns: list[str]) -> np.ndarray | None:
        """Row numbers kept by ``where``, reading only its columns (all selected ones for a callable)."""
        if where is None:
            return None
        kept = []
        for g in range(len(self._starts) - 1):
            needed = _where_columns(where) or columns
            frame = self._file().read_row_group(g, columns=needed).to_pandas()
            kept.append(self._starts[g] + np.flatnonzero(_mask(frame, where)))
        return np.concatenate(kept) if kept else np.zeros(0, np.int64)

    def __len__(self) -> int:
        if not self.is_parquet:
            return len(self._records)
        return int(self._starts[-1]) if self._rows is None else len(self._rows)

    def _row(self, index: int) -> int:
        return int(index if self._rows is None else self._rows[index])

    def __getitem__(self, index: int) -> dict:
        if self.is_parquet:
            row = self._row(index)
            group = int(np.searchsorted(self._starts, row, side="right") - 1)
            record = dict(self._read_group(group)[row - int(self._starts[group])])
        else:
            record = dict(self._records[index])
        if self.path_column is not None:
            record["path"] = _join(self.root, str(record[self.path_column]))
        return record

    def key(self, index: int) -> str:
        return f"row {self._row(index) if self.is_parquet else index} of {self.url}"

    def column(self, name: str) -> np.ndarray:
        _check_columns(self.url, [name], self.columns)
        if not self.is_parquet:
            return self._frame[name].to_numpy()
        values = self._file().read(columns=[name]).column(name).to_numpy(zero_copy_only=False)
        return values if self._rows is None else values[self._rows]

    def blocks(self) -> list[np.ndarray] | None:
        if not self.is_parquet:
            return None
        rows = np.arange(int(self._starts[-1])) if self._rows is None else self._rows
        group_of = np.searchsorted(self._starts, rows, side="right") - 1
        positions = np.arange(len(rows))
        return [positions[group_of == g] for g in range(len(self._starts) - 1)]


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

    def blocks(self) -> list[np.ndarray] | None:
        inner = self.source.blocks()
        if inner is None:
            return None
        block_of = np.empty(len(self.source), dtype=np.int64)
        for b, members in enumerate(inner):
            block_of[members] = b
        mine = block_of[self.indices]
        positions = np.arange(len(self.indices))
        return [positions[mine == b] for b in range(len(inner))]
