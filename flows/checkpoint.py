"""Atomic, verified training checkpoints on local disk or any fsspec URL (s3://, memory://, ...).

A checkpoint file ``ckpt-{step:010d}.pt`` is a small fixed-size header followed by the bytes that
``torch.save`` wrote::

    b"FLOWS-CKPT\\x00\\x01"  (12 bytes: magic + format version)
    payload length        (8 bytes, big-endian unsigned)
    sha256(payload)       (32 bytes)
    payload               (torch.save bytes)

A truncated file fails the length check and a flipped bit fails the hash (or the magic), so a
half-written or damaged checkpoint is never loaded. Loading always uses ``weights_only=True``: a
checkpoint may hold tensors, numbers, strings, lists, tuples and dicts (model, optimizer and
LR-scheduler state dicts included), never arbitrary pickled objects.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import os
import pickle
import random
import re
import struct
import tempfile
import uuid
import warnings
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from flows import io as flows_io
from flows.errors import FlowsError, RemoteError

__all__ = ["CheckpointManager", "CheckpointWarning", "capture_rng", "restore_rng"]

MAGIC = b"FLOWS-CKPT\x00\x01"
_HEADER = struct.Struct(f">{len(MAGIC)}sQ32s")  # magic, payload length, sha256 digest
_NAME = re.compile(r"^ckpt-(\d{10,})\.pt$")


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


def encode(state: dict[str, Any]) -> bytes:
    """Serialize ``state`` with ``torch.save`` and prepend the verifying header."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return _HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload


def decode(data: bytes, name: str, map_location: Any = None) -> dict[str, Any]:
    """Verify the header of checkpoint bytes and load them with ``weights_only=True``.

    Raises FlowsError naming ``name`` if the data is truncated, corrupt or not loadable.
    """
    if len(data) < _HEADER.size:
        raise FlowsError(
            f"checkpoint {name} is truncated: {len(data)} bytes, shorter than its header"
        )
    magic, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FlowsError(f"checkpoint {name} is not a flows checkpoint (bad magic {magic!r})")
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise FlowsError(
            f"checkpoint {name} is truncated or padded: payload is {len(payload)} bytes, "
            f"header says {length}"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise FlowsError(f"checkpoint {name} is corrupt: sha256 mismatch")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise FlowsError(f"checkpoint {name} refused by torch.load(weights_only=True): {e}") from e
    except Exception as e:
        raise FlowsError(f"checkpoint {name} cannot be loaded: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise FlowsError(f"checkpoint {name} holds a {type(state).__name__}, not a dict")
    return state


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

    # ---- naming

    def _path(self, step: int) -> str:
        return f"{self.root}/ckpt-{step:010d}.pt"

    def _url(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    # ---- public API

    def save(self, state: dict[str, Any], step: int) -> str:
        """Write ``state`` as checkpoint ``step`` atomically, prune old ones, return its URL."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        data = encode(state)
        path = self._path(step)
        if self.local:
            self._write_local(path, data)
        else:
            self._write_remote(path, data)
        self._prune(keep_path=path)
        return self._url(path)

    def list(self) -> list[str]:
        """URLs of the checkpoints in the directory, newest (highest step) first."""
        return [self._url(path) for _, path in self._entries()]

    def load(self, url: str, map_location: Any = None) -> dict[str, Any]:
        """Verify and load one checkpoint; raise FlowsError naming the file if it is corrupt."""
        try:  # s3:// through obstore by default, with flows.io's retries
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

    def _entries(self) -> builtins.list[tuple[int, str]]:
        """``(step, path)`` of every checkpoint file, highest step first."""
        if not self.local:
            self.fs.invalidate_cache(self.root)
        try:
            paths = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        entries = []
        for path in paths:
            match = _NAME.match(path.rstrip("/").rsplit("/", 1)[-1])
            if match:
                entries.append((int(match.group(1)), path.rstrip("/")))
        entries.sort(reverse=True)
        return entries

    def _prune(self, keep_path: str) -> None:
        """Delete all but the newest ``keep`` checkpoints, never the one just written."""
        entries = [path for _, path in self._entries()]
        for path in entries[self.keep :]:
            if path != keep_path:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)

    def _write_local(self, path: str, data: bytes) -> None:
        """Temp file in the same directory, fsync, os.replace, fsync the directory."""
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        prefix = f".{os.path.basename(path)}."
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
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
        tmp = f"{self.root}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}.tmp"
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm_file(tmp)
            raise


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
