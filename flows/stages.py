"""Per-sample stages: small picklable callables that turn one record into the next.

A stage is any callable ``item -> item``. Stages with ``random = True`` are called as
``stage(item, generator)`` with a generator derived from (seed, epoch, sample key, stage name),
so their draws are the same after a resume and for any number of workers.
"""

from __future__ import annotations

import io as _io
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from flows import io

_NPY_HEADER_LOCK = threading.Lock()


class Stage:
    """Base class of the built-in stages (a plain callable works as a stage too)."""

    name = "stage"
    random = False

    def __call__(self, item: Any) -> Any:
        raise NotImplementedError


def stage_name(stage: Callable) -> str:
    """The name a stage is reported under in errors and stats."""
    return getattr(stage, "name", None) or getattr(stage, "__name__", None) or type(stage).__name__


class Map(Stage):
    """Apply ``fn`` to the item, or to ``item[field]`` storing the result in ``item[to or field]``.

    Any callable works, a ``torchaudio`` transform or an ``nn.Module`` included."""

    def __init__(self, fn: Callable, field: str | None = None, to: str | None = None,
                 name: str | None = None):
        self.fn, self.field, self.to = fn, field, to
        self.name = name or stage_name(fn)

    def __call__(self, item: Any) -> Any:
        if self.field is None:
            return self.fn(item)
        out = dict(item)
        out[self.to or self.field] = self.fn(item[self.field])
        return out


class Filter(Stage):
    """Keep items for which ``predicate(item)`` is true; the others are counted as filtered."""

    def __init__(self, predicate: Callable[[Any], bool], name: str | None = None):
        self.predicate = predicate
        self.name = name or f"filter({stage_name(predicate)})"

    def __call__(self, item: Any) -> Any:
        return item


class ReadBytes(Stage):
    """Read ``item[field]`` (a path or any fsspec URL) into ``item["bytes"]``, retrying transient errors."""

    name = "read"

    def __init__(self, field: str = "path", storage_options: dict | None = None, retries: int = 5,
                 cache_dir: str | None = None):
        self.field, self.storage_options, self.retries, self.cache_dir = (
            field, storage_options, retries, cache_dir)

    def __call__(self, item: dict) -> dict:
        url = io.cached_url(item[self.field], self.cache_dir)
        return {**item, "bytes": io.read_bytes(url, self.storage_options, retries=self.retries)}


class DecodeTensor(Stage):
    """Decode ``.pt`` (``torch.load(weights_only=True)``) or ``.npy`` bytes into ``item["tensor"]``."""

    name = "decode_tensor"

    def __init__(self, field: str = "bytes", to: str = "tensor"):
        self.field, self.to = field, to

    def __call__(self, item: dict) -> dict:
        data = item[self.field]
        if data[:6] == b"\x93NUMPY":
            with _NPY_HEADER_LOCK:  # np.load parses the header with ast: not thread-safe on 3.11
                array = np.load(_io.BytesIO(data), allow_pickle=False)
            tensor = torch.from_numpy(array)
        else:
            tensor = torch.load(_io.BytesIO(data), weights_only=True, map_location="cpu")
        out = {k: v for k, v in item.items() if k != self.field}
        out[self.to] = tensor
        return out
