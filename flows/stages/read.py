"""ReadBytes: read each record's file (any fsspec URL) into bytes, or, for a decoder that can
read the file itself, only refer to it (:class:`FileRef`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from flows.stages.base import Stage
from flows.storage import io


@dataclass(frozen=True)
class FileRef:
    """A file the read stage leaves for the decoder to open itself (see :class:`ReadBytes`)."""

    url: str
    storage_options: dict | None = None

    @property
    def local(self) -> bool:
        return io.local_path(self.url) is not None


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
        path = io.local_path(url)
        if self.reference != "none" and path is not None:
            if os.path.isfile(path) and os.access(path, os.R_OK):  # else read_bytes says what is wrong
                return {**item, "bytes": FileRef(path)}
        elif self.reference == "all" and "::" not in url:
            return {**item, "bytes": FileRef(url, self.storage_options)}
        return {**item, "bytes": io.read_bytes(url, self.storage_options, retries=self.retries)}
