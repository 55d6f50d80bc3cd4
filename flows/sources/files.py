"""Files: the files under a local directory, fsspec URL or glob, sorted, listed once per job into
a memory-mapped manifest (:mod:`flows.sources.manifest`): no Python object per file.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Sequence

import numpy as np

from flows.sources import manifest as manifest_module
from flows.sources.base import Source
from flows.sources.items import Columns

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


class Files(Source):
    """Files under a directory, prefix or glob (local or any fsspec URL), sorted.

    Listed once per job into a manifest (see :mod:`flows.sources.manifest`), which every rank and worker
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
