"""Atomic, verified training checkpoints on local disk or any fsspec URL (s3://, memory://, ...).

A checkpoint file ``ckpt-{step:010d}.pt`` is a small fixed-size header followed by the bytes that
``torch.save`` wrote::

    b"FLOWS-CKPT\\x00\\x02"  (12 bytes: magic + format version)
    step                  (8 bytes, big-endian unsigned: the step in the file's name)
    payload length        (8 bytes, big-endian unsigned)
    sha256(payload)       (32 bytes)
    payload               (torch.save bytes)

A truncated file fails the length check and a flipped bit fails the hash (or the magic), so a
half-written or damaged checkpoint is never loaded. Loading always uses ``weights_only=True``: a
checkpoint may hold tensors, numbers, strings, lists, tuples and dicts (model, optimizer and
LR-scheduler state dicts included), never arbitrary pickled objects. Format 1 (no step field,
written by older versions) still loads.

The manager lists, keeps and prunes only the files it wrote: a ``ckpt-N.pt`` whose header names
another step (a renamed copy) or that is no flows checkpoint at all (a stray file) is ignored
with one warning, never counted among the ``keep`` newest and never deleted. Temporary files
are named after their writer (``.ckpt-N.pt.HOST.PID.RANDOM.tmp``); those of writers that died
mid-write (same host, process gone; other hosts' after a day) are removed at the next save.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import hashlib
import io
import os
import pickle
import random
import re
import socket
import struct
import uuid
import warnings
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from flows.errors import FlowsError, RemoteError
from flows.storage import io as flows_io

__all__ = ["CheckpointManager", "CheckpointWarning", "capture_rng", "restore_rng"]

MAGIC_V1 = b"FLOWS-CKPT\x00\x01"
MAGIC = b"FLOWS-CKPT\x00\x02"
_HEADER_V1 = struct.Struct(f">{len(MAGIC)}sQ32s")  # magic, payload length, sha256 digest
_HEADER = struct.Struct(f">{len(MAGIC)}sQQ32s")  # magic, step, payload length, sha256 digest
_HEAD = len(MAGIC) + 8  # bytes that tell whose a file is: magic and step
_NAME = re.compile(r"^ckpt-(\d{10,})\.pt$")
# temporary files: ``.ckpt-N.pt.HOST.PID.RANDOM.tmp`` (older versions: ``.ckpt-N.pt.RANDOM.tmp``)
_TEMP = re.compile(r"^\.(?:ckpt-\d{10,}\.pt|probe)\.(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.)?"
                   r"[A-Za-z0-9_]+\.tmp$")
#: a temporary file of a writer on another host (whose liveness cannot be seen) this old is dead
STALE_TEMP = datetime.timedelta(days=1)


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is corrupt, truncated or cannot be loaded."""


# --------------------------------------------------------------------------- RNG state


def capture_rng() -> dict[str, Any]:
    """Snapshot python ``random``, numpy's global RNG, torch's CPU RNG and every CUDA RNG.

    The result holds only tensors and plain python values, so it survives
    ``torch.load(..., weights_only=True)``.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore the RNGs from a :func:`capture_rng` snapshot; missing parts are left untouched."""
    if "python" in state:
        py = state["python"]
        internal = tuple(int(x) for x in py["state"].tolist())
        random.setstate((py["version"], internal, py["gauss_next"]))
    if "numpy" in state:
        npy = state["numpy"]
        keys = npy["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


# --------------------------------------------------------------------------- file format


def encode(state: dict[str, Any], step: int) -> bytes:
    """Serialize ``state`` (checkpoint ``step``) with ``torch.save`` behind the verifying header."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return _HEADER.pack(MAGIC, step, len(payload), hashlib.sha256(payload).digest()) + payload


def decode(data: bytes, name: str, map_location: Any = None) -> dict[str, Any]:
    """Verify the header of checkpoint bytes and load them with ``weights_only=True``.

    Raises FlowsError naming ``name`` if the data is truncated, corrupt or not loadable.
    """
    header = _HEADER_V1 if data[: len(MAGIC_V1)] == MAGIC_V1 else _HEADER
    if len(data) < header.size:
        raise FlowsError(
            f"checkpoint {name} is truncated: {len(data)} bytes, shorter than its header"
        )
    magic, *fields = header.unpack_from(data)
    if magic != MAGIC and magic != MAGIC_V1:
        raise FlowsError(f"checkpoint {name} is not a flows checkpoint (bad magic {magic!r})")
    length, digest = fields[-2:]
    payload = data[header.size :]
    if len(payload) != length:
        raise FlowsError(
            f"checkpoint {name} is truncated or padded: payload is {len(payload)} bytes, "
            f"header says {length}"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise FlowsError(f"checkpoint {name} is corrupt: sha256 mismatch")
    named = _NAME.match(name.rstrip("/").rsplit("/", 1)[-1])
    if magic == MAGIC and named and int(named.group(1)) != fields[0]:
        raise FlowsError(f"checkpoint {name} holds step {fields[0]}: a copy renamed")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise FlowsError(f"checkpoint {name} refused by torch.load(weights_only=True): {e}") from e
    except Exception as e:
        raise FlowsError(f"checkpoint {name} cannot be loaded: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise FlowsError(f"checkpoint {name} holds a {type(state).__name__}, not a dict")
    return state


def written_here(head: bytes, step: int) -> bool:
    """Whether a file named for ``step`` that starts with ``head`` (its first 20 bytes or all of
    it) is one a manager wrote: a format-2 header naming ``step``, a format-1 header (no step to
    compare), or a file cut short inside the magic (damaged: listed, so resuming warns)."""
    if len(head) < len(MAGIC):
        return len(head) > 0 and (MAGIC.startswith(head) or MAGIC_V1.startswith(head))
    if head[: len(MAGIC)] == MAGIC_V1:
        return True
    if head[: len(MAGIC)] != MAGIC:
        return False
    stored = head[len(MAGIC) : len(MAGIC) + 8]
    return len(stored) < 8 or int.from_bytes(stored, "big") == step


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Writes ``ckpt-{step:010d}.pt`` atomically into ``directory``, keeping the newest ``keep``.

    ``directory`` is a local path or any fsspec URL; ``storage_options`` go to the filesystem.
    """

    def __init__(
        self, directory: str, keep: int = 3, storage_options: dict[str, Any] | None = None
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = directory
        self.keep = keep
        self.storage_options = dict(storage_options or {})
        self.fs, root = flows_io.filesystem(directory, self.storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root: str = os.path.normpath(root) if self.local else root.rstrip("/")
        self._written: dict[tuple[str, Any], bool] = {}  # (path, size) -> written by a manager

    # ---- naming

    def _path(self, step: int) -> str:
        return f"{self.root}/ckpt-{step:010d}.pt"

    def _url(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def _temp(self, name: str) -> str:
        """A temporary path for ``name`` named after its writer, so that a dead one's is known."""
        return f"{self.root}/.{name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"

    # ---- public API

    def check(self) -> None:
        """Make sure checkpoints can be written: create the directory, write and remove a probe
        file there. Raises FlowsError in one line saying what is wrong: a file in the way, no
        permission, no such bucket, an unreachable endpoint."""
        where = f"checkpoint directory {self.directory}"
        if self.local and os.path.exists(self.root) and not os.path.isdir(self.root):
            raise FlowsError(f"{where} is a file, not a directory")
        try:
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            probe = self._temp("probe")
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as e:  # whatever the filesystem raises, one line
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            first = reason.strip().splitlines()[0] if reason.strip() else type(e).__name__
            raise FlowsError(f"{where} cannot be written: {first}") from e

    def save(self, state: dict[str, Any], step: int) -> str:
        """Write ``state`` as checkpoint ``step`` atomically, prune old ones, return its URL."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        data = encode(state, step)
        path = self._path(step)
        if self.local:
            self._write_local(path, data)
        else:
            self._write_remote(path, data)
        self._written[(path, len(data))] = True
        self._prune(keep_path=path)
        return self._url(path)

    def list(self) -> list[str]:
        """URLs of the checkpoints in the directory, newest (highest step) first."""
        return [self._url(path) for _, path in self._entries(self._listing())]

    def load(self, url: str, map_location: Any = None) -> dict[str, Any]:
        """Verify and load one checkpoint; raise FlowsError naming the file if it is corrupt."""
        try:  # s3:// through obstore by default, with flows.storage.io's retries
            data = flows_io.read_bytes(url, self.storage_options)
        except FileNotFoundError as e:
            raise FlowsError(f"checkpoint {url} does not exist") from e
        except (OSError, RemoteError) as e:
            raise FlowsError(f"checkpoint {url} cannot be read: {type(e).__name__}: {e}") from e
        return decode(data, url, map_location)

    def latest_valid(self, map_location: Any = None) -> tuple[str, dict[str, Any]] | None:
        """The newest checkpoint that verifies and loads, as ``(url, state)``; None if none does.

        Every newer checkpoint that fails is skipped with a :class:`CheckpointWarning` naming it.
        """
        for url in self.list():
            try:
                return url, self.load(url, map_location)
            except FlowsError as e:
                warnings.warn(
                    f"skipping checkpoint {url}: {e}; falling back to an older one",
                    CheckpointWarning,
                    stacklevel=2,
                )
        return None

    # ---- internals

    def _listing(self) -> builtins.list[dict[str, Any]]:
        """What the directory holds (name, size, ...); empty if it does not exist yet."""
        if not self.local:
            self.fs.invalidate_cache(self.root)
        try:
            return builtins.list(self.fs.ls(self.root, detail=True))
        except FileNotFoundError:
            return []

    def _entries(self, listing: builtins.list[dict[str, Any]]) -> builtins.list[tuple[int, str]]:
        """``(step, path)`` of every checkpoint a manager wrote, highest step first."""
        entries = []
        for info in listing:
            path = info["name"].rstrip("/")
            match = _NAME.match(path.rsplit("/", 1)[-1])
            if match and self._was_written(path, int(match.group(1)), info.get("size")):
                entries.append((int(match.group(1)), path))
        entries.sort(reverse=True)
        return entries

    def _was_written(self, path: str, step: int, size: Any) -> bool:
        """Whether ``path`` is a checkpoint a manager wrote (its header read once); warns once
        about a stray file under a checkpoint's name."""
        key = (path, size)
        if key not in self._written:
            try:
                head = b"" if size == 0 else self.fs.cat_file(path, start=0, end=_HEAD)
            except FileNotFoundError:
                return False
            self._written[key] = written_here(head, step)
            if not self._written[key]:
                warnings.warn(f"ignoring {self._url(path)}: not a checkpoint flows wrote for step "
                              f"{step} (a stray or renamed file); it is never resumed, counted "
                              "among the kept nor deleted", CheckpointWarning, stacklevel=3)
        return self._written[key]

    def _prune(self, keep_path: str) -> None:
        """Delete all but the newest ``keep`` checkpoints, never the one just written, and the
        temporary files of writers that died mid-write."""
        listing = self._listing()
        entries = [path for _, path in self._entries(listing)]
        dead = [info["name"] for info in listing if self._dead_temp(info["name"].rstrip("/"))]
        for path in [*entries[self.keep :], *dead]:
            if path != keep_path:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)

    def _dead_temp(self, path: str) -> bool:
        """Whether ``path`` is a temporary file whose writer is gone: on this host, a process
        that no longer runs; elsewhere (or unnamed, from older versions), one older than
        :data:`STALE_TEMP`."""
        match = _TEMP.match(path.rsplit("/", 1)[-1])
        if match is None:
            return False
        if match["host"] == _HOST:
            return not _alive(int(match["pid"]))
        try:
            modified = self.fs.modified(path)
        except (OSError, NotImplementedError):
            return False
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=datetime.timezone.utc)
        return datetime.datetime.now(datetime.timezone.utc) - modified > STALE_TEMP

    def _write_local(self, path: str, data: bytes) -> None:
        """Temp file in the same directory, fsync, os.replace, fsync the directory."""
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = self._temp(os.path.basename(path))
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        _fsync_dir(directory)

    def _write_remote(self, path: str, data: bytes) -> None:
        """Upload to a temp key, then move it into place (each object PUT/copy is atomic)."""
        tmp = self._temp(path.rsplit("/", 1)[-1])
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm_file(tmp)
            raise


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
