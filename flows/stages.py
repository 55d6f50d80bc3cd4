"""Per-sample stages: small picklable callables that turn one record into the next.

A stage is any callable ``item -> item``. Stages with ``random = True`` are called as
``stage(item, generator)`` with a generator derived from (seed, epoch, sample key, stage name),
so their draws are the same after a resume and for any number of workers.
"""

from __future__ import annotations

import io as _io
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

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


@dataclass(frozen=True)
class FileRef:
    """A file the read stage leaves for the decoder to open itself (see :class:`ReadBytes`)."""

    url: str
    storage_options: dict | None = None

    @property
    def local(self) -> bool:
        return is_local(self.url)


def is_local(url: str) -> bool:
    """Whether ``url`` is a path on this machine (plain or ``file://``)."""
    return "://" not in url or url.startswith("file://")


class ReadBytes(Stage):
    """Read ``item[field]`` (a path or any fsspec URL) into ``item["bytes"]``, retrying transient errors.

    ``reference`` lets a decoder that opens files itself skip the copy into Python bytes:
    ``"local"`` puts a :class:`FileRef` in ``item["bytes"]`` for readable local files (the
    decoder reads them without calling back into Python); ``"all"`` does so for remote URLs too
    (the decoder then reads only the part it needs, by range requests) unless ``cache_dir`` keeps
    a local copy. :meth:`Flow.decode_audio <flows.flow.Flow.decode_audio>` sets it."""

    name = "read"

    def __init__(self, field: str = "path", storage_options: dict | None = None, retries: int = 5,
                 cache_dir: str | None = None, reference: Literal["none", "local", "all"] = "none"):
        self.field, self.storage_options, self.retries, self.cache_dir = (
            field, storage_options, retries, cache_dir)
        self.reference = reference

    def referring(self, reference: Literal["none", "local", "all"]) -> ReadBytes:
        """This stage, with ``reference`` set."""
        return ReadBytes(self.field, self.storage_options, self.retries, self.cache_dir, reference)

    def __call__(self, item: dict) -> dict:
        url = io.cached_url(item[self.field], self.cache_dir)
        if self.reference != "none" and is_local(url):
            path = url.removeprefix("file://")
            if os.path.isfile(path) and os.access(path, os.R_OK):  # else read_bytes says what is wrong
                return {**item, "bytes": FileRef(path)}
        elif self.reference == "all" and "::" not in url:
            return {**item, "bytes": FileRef(url, self.storage_options)}
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
