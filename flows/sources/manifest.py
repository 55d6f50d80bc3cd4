"""File listings as manifests: Arrow IPC files of ``path``, ``size`` and ``mtime``, on disk.

A listing is made once per job: rank 0 lists (with :func:`flows.storage.io.list_files_with_sizes`) and
writes the manifest to a cache directory (``$FLOWS_CACHE_DIR``, else ``~/.cache/flows``, under
``manifests/``, named by the listed URL and the listing time), or where the user says; the other
ranks receive its location, never the list, and every rank and worker memory-maps it, so a
listing of 10^8 files costs no Python object per file and its pages are shared by all the
processes of a machine. A manifest saved once (``flows manifest URL OUT``, or ``Flow.files(url,
manifest=OUT)``) is reused by later jobs without listing again.

``mtime`` is known for local files only (null for remote objects: the listing functions return
sizes, not dates).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import torch.distributed as dist

from flows.errors import FlowsError
from flows.ranks import broadcast_object, is_distributed
from flows.storage import io

SCHEMA = pa.schema([("path", pa.large_string()), ("size", pa.int64()), ("mtime", pa.float64())])
_BATCH = 1 << 20  # rows per record batch
_KEEP_SECONDS = 24 * 3600  # older manifests of the same listing are removed


def cache_dir() -> Path:
    """Where manifests go by default: ``$FLOWS_CACHE_DIR/manifests`` or ``~/.cache/flows/manifests``."""
    base = os.environ.get("FLOWS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "flows")
    return Path(base) / "manifests"


def write(url: str, out: str | os.PathLike[str], extensions: Sequence[str] | None = None,
          recursive: bool = True, storage_options: dict | None = None) -> int:
    """List ``url`` (as :func:`flows.storage.io.list_files`) into the manifest ``out`` (written
    atomically); the number of files."""
    listed = io.list_files_with_sizes(url, extensions, recursive, storage_options)
    local = io.local_path(url) is not None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    metadata = {"url": io.redact(url, storage_options), "listed_at": str(time.time())}
    paths = list(listed)
    with ipc.new_file(partial, SCHEMA.with_metadata(metadata)) as writer:
        for start in range(0, len(paths), _BATCH):
            chunk = paths[start : start + _BATCH]
            mtimes = [os.stat(p).st_mtime if local else None for p in chunk]
            writer.write_batch(pa.record_batch(
                [chunk, [listed[p] for p in chunk], mtimes], schema=SCHEMA))
    os.replace(partial, out)
    return len(paths)


def open_manifest(path: str | os.PathLike[str], storage_options: dict | None = None) -> pa.Table:
    """An Arrow IPC file (a manifest or any table) as a ``pyarrow.Table``: memory-mapped when
    local (no copy: pages are read when used and shared between processes), read otherwise."""
    path = str(path)
    local = io.local_path(path)
    try:
        if local is not None:
            return ipc.open_file(pa.memory_map(local)).read_all()
        with io.open_file(path, storage_options) as f:
            return ipc.open_file(pa.BufferReader(f.read())).read_all()
    except (OSError, pa.ArrowInvalid) as error:
        raise FlowsError(f"cannot read the Arrow file {io.redact(path, storage_options)}: {error}") from None


def shared(url: str, extensions: Sequence[str] | None, recursive: bool,
           storage_options: dict | None, manifest: str | os.PathLike[str] | None = None) -> str:
    """The location of this job's manifest of ``url``, on every rank: ``manifest`` if it exists
    (reused, not listed), else written by rank 0 (to ``manifest``, or to the cache directory),
    its location broadcast. A rank that cannot see the file (another machine) gets its bytes."""
    found: Any = None
    listed = False  # here, now: a listing of remote files has remembered their sizes already
    if not is_distributed() or dist.get_rank() == 0:
        try:
            found, listed = _existing_or_new(url, extensions, recursive, storage_options, manifest)
        except Exception as error:  # noqa: BLE001 - every rank must raise it, not hang
            found = error
    found = broadcast_object(found)
    if isinstance(found, Exception):
        raise found
    if is_distributed():
        _copy_where_missing(found)
    if "://" in url and not (listed and io.listing_remembers_sizes(url)):
        _remember_sizes(found)
    return found


def _existing_or_new(
    url: str, extensions: Sequence[str] | None, recursive: bool, storage_options: dict | None,
    manifest: str | os.PathLike[str] | None,
) -> tuple[str, bool]:
    """The manifest's location, and whether it was listed now (not reused)."""
    if manifest is not None and os.path.exists(manifest):
        return str(manifest), False
    if manifest is None:
        words = repr((io.redact(url, storage_options), sorted(extensions or ()), recursive))
        name = hashlib.blake2b(words.encode(), digest_size=8).hexdigest()
        manifest = cache_dir() / f"{name}-{time.time_ns()}.arrow"
        _remove_old(cache_dir().glob(f"{name}-*.arrow"))
    write(url, manifest, extensions, recursive, storage_options)
    return str(manifest), True


def _remove_old(paths: Any) -> None:
    """Delete manifests older than a day (a job still reading one keeps its memory map)."""
    for path in paths:
        try:
            if time.time() - path.stat().st_mtime > _KEEP_SECONDS:
                path.unlink()
        except OSError:
            pass  # removed by another job meanwhile


def _copy_where_missing(path: str) -> None:
    """Ranks on machines that do not share rank 0's disk receive the manifest's bytes."""
    present: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(present, os.path.exists(path))
    if all(present):
        return
    data = broadcast_object(Path(path).read_bytes() if dist.get_rank() == 0 else None)
    if not os.path.exists(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        partial = f"{path}.{os.getpid()}.partial"
        Path(partial).write_bytes(data)
        os.replace(partial, path)


def _remember_sizes(path: str) -> None:
    """Hand the first remote sizes of the manifest to :func:`flows.storage.io.read_bytes`: one GET each."""
    table = open_manifest(path).slice(0, io.MAX_KNOWN_SIZES)
    io.remember_sizes(dict(zip(table.column("path").to_pylist(), table.column("size").to_pylist(),
                               strict=True)))
