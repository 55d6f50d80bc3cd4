"""The cache stage: the output of deterministic stages, computed once and read back memory-mapped.

``flow.read().decode_audio().downmix().resample(16_000).pad(64_000).cache("/tmp/cache")`` wraps
the stages before it in one :class:`Cached` stage. The first time a record is seen its stages
run and the output is written to a local file; later (next epochs, other workers, later runs)
the file is memory-mapped and the tensors are views of its pages, which the page cache shares
between all workers instead of each holding a copy. Random stages (crops, augmentation) go
after ``.cache()``, so they still draw fresh, seeded values every epoch.

An entry is keyed by the record itself (every field, bytes and tensors hashed), the identity of
the files the ``read`` stages read (local: size and modification time; remote: size, ETag or
modification time) and a description of the cached stages: their classes and parameters
(functions by their code, defaults and closures), plus the versions of flows, torch, numpy,
soundfile and soxr. Change any of them and the entry is not found: it is computed again.
A stage may define ``cache_params()`` to say which of its parameters matter. What the
description cannot see (a global a function reads that is not a plain constant, a file
read by your own stage) is covered by ``version``: change it to start afresh.

Output with the cache is identical to output without it (tensors are stored byte for byte), so
resuming stays exact. Files are written atomically, so concurrent workers and processes may
share one directory.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import io as _io
import logging
import math
import mmap
import os
import pickle
import shutil
import types
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from flows.errors import FlowsError
from flows.stages.base import Filter, Stage, stage_name
from flows.stages.read import ReadBytes
from flows.storage import io

logger = logging.getLogger(__name__)

FORMAT = 2  # 2: entries name flows.stages.cache._Ref (flows.cache before the package layout)
_MAGIC = b"FLOWSC1\n"
_ALIGN = 64
_PACKAGES = ("flows", "torch", "numpy", "soundfile", "soxr")


class Cached(Stage):
    """Runs ``stages`` once per record and keeps their output in ``directory`` (see the module
    docstring). Built by :meth:`Flow.cache <flows.flow.Flow.cache>`."""

    name = "cache"

    def __init__(self, stages: Sequence[Callable], directory: str | os.PathLike[str],
                 storage_options: dict | None = None, version: str = ""):
        if not stages:
            raise FlowsError("cache() caches the output of the stages before it: add them first")
        for stage in stages:
            if getattr(stage, "random", False) or isinstance(stage, Filter):
                kind = "random" if getattr(stage, "random", False) else "filter"
                raise FlowsError(f"cache() stores deterministic stages only; the {kind} stage "
                                 f"{stage_name(stage)!r} must come after .cache()")
        directory = os.fspath(directory)
        if "://" in directory:
            raise FlowsError(f"the cache must be a local directory (it is memory-mapped), not {directory}")
        self.stages = tuple(stages)
        self.storage_options = storage_options
        self.version = version
        reads = [s.field for s in self.stages if isinstance(s, ReadBytes)]
        self.fields = tuple(dict.fromkeys(reads or ["path"]))  # fields naming the files read
        self.description = describe((FORMAT, _versions(), version, list(self.stages)))
        self.digest = _hash(self.description.encode())
        self.root = os.path.join(os.path.abspath(os.path.expanduser(directory)), self.digest)

    def with_stages(self, stages: Sequence[Callable]) -> Cached:
        """The same cache (same entries) running other, equivalent stages (e.g. timed ones)."""
        other = copy.copy(self)
        other.stages = tuple(stages)
        return other

    def key(self, item: Any) -> str:
        """The entry name of ``item``: a hash of the record, its files' identity and the stages."""
        parts = [self.digest, describe(item)]
        if isinstance(item, Mapping):
            parts += [repr(_identity(item[f], self.storage_options)) for f in self.fields
                      if isinstance(item.get(f), str)]
        return _hash("\0".join(parts).encode())

    def path(self, key: str) -> str:
        return os.path.join(self.root, key[:2], key)

    def __call__(self, item: Any) -> Any:
        path = self.path(self.key(item))
        try:
            return load(path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, pickle.UnpicklingError) as error:
            logger.warning("cache entry %s is unreadable (%s): computing it again", path, error)
        out = item
        for stage in self.stages:
            try:
                out = stage(out)
            except Exception as error:
                if not hasattr(error, "flows_stage"):  # a lazy decode's error names the decode
                    error.flows_stage = stage_name(stage)  # type: ignore[attr-defined]  # named by Apply
                raise
        self._write(path, out)
        return out

    def _write(self, path: str, item: Any) -> None:
        header, tensors = _encode(item)  # raises FlowsError on values it cannot store
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            about = os.path.join(self.root, "stages.txt")
            if not os.path.exists(about):
                _write_atomic(about, [io.redact(self.description, self.storage_options).encode()])
            _write_atomic(path, _layout(header, tensors))
        except OSError as error:  # a full or read-only disk slows training down, never stops it
            logger.warning("could not write cache entry %s: %s", path, error)

    def clear(self) -> None:
        """Delete this cache's entries (those of these stages and parameters)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def __repr__(self) -> str:
        return f"Cached({[stage_name(s) for s in self.stages]}, {os.path.dirname(self.root)!r})"


# ---- entries: a small header, then each tensor's bytes, 64-byte aligned ---------------------


class _Ref:
    """Stands for the ``index``-th tensor of an entry in its pickled header."""

    def __init__(self, index: int):
        self.index = index


def _encode(item: Any) -> tuple[bytes, list[torch.Tensor]]:
    tensors: list[torch.Tensor] = []

    def strip(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().resolve_conj().resolve_neg().contiguous()
            tensors.append(tensor)
            return _Ref(len(tensors) - 1)
        if isinstance(value, dict):
            stripped = {k: strip(v) for k, v in value.items()}
            return stripped if type(value) is dict else type(value)(stripped)
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, tuple) and type(value) is tuple:
            return tuple(strip(v) for v in value)
        return value

    skeleton = strip(item)
    specs = [(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t in tensors]
    try:
        header = pickle.dumps((skeleton, specs), protocol=pickle.HIGHEST_PROTOCOL)
        _loads(header)
    except (pickle.PickleError, AttributeError, TypeError) as error:
        raise FlowsError(f"cannot cache this sample's output: {error} (the cache stores tensors, "
                         f"numbers, strings, bytes, None, dates, numpy values and containers of them)"
                         ) from None
    return header, tensors


def _layout(header: bytes, tensors: list[torch.Tensor]) -> list[Any]:
    """The pieces of an entry file, in order."""
    start = len(_MAGIC) + 8 + len(header)
    pieces: list[Any] = [_MAGIC, len(header).to_bytes(8, "little"), header]
    position = start
    for tensor in tensors:
        pad = -position % _ALIGN
        pieces.append(b"\0" * pad)
        if tensor.numel():
            pieces.append(tensor.reshape(-1).view(torch.uint8).numpy().data)
        position += pad + tensor.numel() * tensor.element_size()
    return pieces


def load(path: str) -> Any:
    """Read an entry: its tensors are copy-on-write views of the memory-mapped file."""
    with open(path, "rb") as f:
        head = f.read(len(_MAGIC) + 8)
        if head[: len(_MAGIC)] != _MAGIC:
            raise ValueError("not a flows cache entry")
        size = int.from_bytes(head[len(_MAGIC):], "little")
        skeleton, specs = _loads(f.read(size))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if specs else None
    position = len(head) + size
    tensors = []
    for dtype_name, shape in specs:
        dtype = getattr(torch, dtype_name)
        position += -position % _ALIGN
        count = math.prod(shape)
        if count == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if mapped is None or position + nbytes > len(mapped):
            raise ValueError("truncated cache entry")
        tensors.append(torch.frombuffer(mapped, dtype=dtype, count=count, offset=position).view(shape))
        position += nbytes
    return _fill(skeleton, tensors)


def _fill(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, _Ref):
        return tensors[value.index]
    if isinstance(value, dict):
        filled = {k: _fill(v, tensors) for k, v in value.items()}
        return filled if type(value) is dict else type(value)(filled)
    if isinstance(value, list):
        return [_fill(v, tensors) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(_fill(v, tensors) for v in value)
    return value


_ALLOWED = {
    ("flows.stages.cache", "_Ref"),
    ("builtins", "complex"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "range"),
    ("builtins", "slice"), ("builtins", "bytearray"), ("collections", "OrderedDict"),
    ("datetime", "date"), ("datetime", "datetime"), ("datetime", "time"), ("datetime", "timedelta"),
    ("datetime", "timezone"), ("decimal", "Decimal"),
    ("pathlib", "PurePosixPath"), ("pathlib", "PosixPath"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy._core.multiarray", "_reconstruct"),
}


class _Unpickler(pickle.Unpickler):
    """Loads headers only: plain values, and no class outside a short list of value types."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} values cannot be cached")


def _loads(data: bytes) -> Any:
    return _Unpickler(_io.BytesIO(data)).load()


def _write_atomic(target: str, pieces: list[Any]) -> None:
    tmp = f"{target}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            for piece in pieces:
                f.write(piece)
        os.replace(tmp, target)  # readers see the whole entry or none
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---- keys: stable descriptions of records, files and stages ------------------------------------


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[str, ...]:
    found = []
    for package in _PACKAGES:
        try:
            found.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{package}: not installed")
    return tuple(found)


def _identity(url: str, storage_options: dict | None) -> tuple[Any, ...]:
    """What changes when the file at ``url`` changes: local size and mtime, remote metadata."""
    local = io.local_path(url)
    if local is not None:
        try:
            stat = os.stat(local)
        except OSError:
            return ("missing",)  # the read stage will say what is wrong
        return (stat.st_size, stat.st_mtime_ns)
    fs, path = io.filesystem(url, storage_options)
    info = fs.info(path)
    keys = ("size", "ETag", "etag", "LastModified", "last_modified", "mtime", "created", "md5")
    return tuple(str(info.get(k)) for k in keys if info.get(k) is not None)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def describe(obj: Any, _path: frozenset[int] = frozenset()) -> str:
    """A description of ``obj`` that is the same in every process and run and changes when its
    content or parameters change: values by repr, bytes and tensors by hash, functions by their
    code, defaults, closures and the plain constants they read, objects by class and attributes."""
    if obj is None or isinstance(obj, (bool, int, float, complex, str)):
        return repr(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        return repr(data) if len(data) <= 64 else f"bytes[{len(data)}]:{_hash(data)}"
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().resolve_conj().resolve_neg().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        return f"tensor[{tensor.dtype},{tuple(tensor.shape)}]:{_hash(data)}"
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return f"ndarray[{obj.dtype},{obj.shape}]:{_hash(np.ascontiguousarray(obj).tobytes())}"
    if isinstance(obj, np.generic):
        return f"{obj.dtype}:{obj!r}"
    if isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)):
        return _qualname(obj) if not isinstance(obj, types.ModuleType) else f"module {obj.__name__}"
    if isinstance(obj, ReadBytes):  # retries, credentials and the download cache change no byte
        return f"{_qualname(type(obj))}(field={obj.field!r})"
    if callable(getattr(obj, "cache_params", None)):
        return f"{_qualname(type(obj))}({describe(obj.cache_params(), _path)})"
    if id(obj) in _path:
        return "<cycle>"
    path = _path | {id(obj)}
    sub = functools.partial(describe, _path=path)
    if isinstance(obj, (list, tuple, np.ndarray)):
        return f"{type(obj).__name__}[{', '.join(map(sub, obj))}]"
    if isinstance(obj, (set, frozenset)):
        return f"{type(obj).__name__}{{{', '.join(sorted(map(sub, obj)))}}}"
    if isinstance(obj, Mapping):
        pairs = sorted(f"{sub(k)}: {sub(v)}" for k, v in obj.items())
        return f"{type(obj).__name__}{{{', '.join(pairs)}}}"
    if isinstance(obj, types.FunctionType):
        return _describe_function(obj, path)
    if isinstance(obj, types.MethodType):
        return f"method {obj.__func__.__name__} of {sub(obj.__self__)}: {sub(obj.__func__)}"
    if isinstance(obj, functools.partial):
        return f"partial({sub(obj.func)}, {sub(obj.args)}, {sub(obj.keywords)})"
    if isinstance(obj, types.CodeType):
        consts = sub(tuple(obj.co_consts))
        return f"code {obj.co_name}:{_hash(obj.co_code)}:{consts}:{obj.co_names}"
    fields = dict(getattr(obj, "__dict__", {}))
    for slot in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, slot):
            fields[slot] = getattr(obj, slot)
    if fields or hasattr(obj, "__dict__"):
        return f"{_qualname(type(obj))}({sub(fields)})"
    text = repr(obj)
    return f"{_qualname(type(obj))}:{text}" if " at 0x" not in text else _qualname(type(obj))


def _describe_function(fn: types.FunctionType, path: frozenset[int]) -> str:
    sub = functools.partial(describe, _path=path)
    closure = [cell.cell_contents for cell in fn.__closure__ or ()]
    constants = {name: fn.__globals__[name] for name in fn.__code__.co_names
                 if isinstance(fn.__globals__.get(name), (bool, int, float, str, bytes, tuple))}
    return (f"function {_qualname(fn)}: {sub(fn.__code__)} defaults {sub(fn.__defaults__)} "
            f"{sub(fn.__kwdefaults__)} closure {sub(closure)} globals {sub(constants)}")
