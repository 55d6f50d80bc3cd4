"""Shared memory between the consumer and its forked worker processes: a worker writes the
arrays of a task's outputs into a slot of its :class:`Arena` and sends only their places
through its pipe; the consumer copies them out once. Arrays too large for a slot, or with no
arena (``spawn``/``forkserver`` workers), travel pickled through the pipe."""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SLOT_BYTES = 64 << 20  # shared memory per task (a batch); arrays beyond it go through the pipe


class Arena:
    """Anonymous shared memory (nothing in ``/dev/shm`` to leave behind) a forked worker writes
    its results' arrays to: slot ``j % slots`` for the ``j``-th task it receives. ``slots`` is
    the worker's tasks in flight plus the one the consumer is reading, so every slot is read
    before it is written again. Pages are allocated as they are first written: a slot costs the
    size of the largest batch written to it, not ``SLOT_BYTES``."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.memory = mmap.mmap(-1, slots * SLOT_BYTES)  # MAP_SHARED: seen by forked children
        self.tasks = 0  # counted in the worker


@dataclass
class Shared:
    """An array in an arena."""

    offset: int
    dtype: str
    shape: tuple[int, ...]


class Packed:
    """An array pickled through the pipe (no arena, or too large for a slot)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def packer(arena: Arena | None) -> Callable[[Any], Any]:
    """In a worker: every CPU tensor of a task's outputs to an array, in the task's arena slot
    while it fits."""
    base, used = ((arena.tasks % arena.slots) * SLOT_BYTES if arena is not None else 0), 0

    def pack(x: Any) -> Any:
        nonlocal used
        if not (isinstance(x, torch.Tensor) and x.device.type == "cpu" and not x.requires_grad):
            return _nested(x, pack)
        try:
            array = x.numpy()
        except TypeError:  # no numpy dtype (bfloat16): torch's own way
            return x
        if arena is None or used + array.nbytes > SLOT_BYTES:
            return Packed(array)
        offset = base + used
        np.ndarray(array.shape, array.dtype, arena.memory, offset)[...] = array
        used += -(-array.nbytes // 64) * 64  # keep the next array 64-byte aligned
        return Shared(offset, array.dtype.str, array.shape)

    return pack


def unpacker(arena: Arena | None) -> Callable[[Any], Any]:
    """In the consumer: the tensors back, copied out of the arena."""

    def unpack(x: Any) -> Any:
        if isinstance(x, Shared):
            assert arena is not None
            return torch.from_numpy(np.ndarray(x.shape, x.dtype, arena.memory, x.offset).copy())
        if isinstance(x, Packed):
            return torch.from_numpy(x.array)
        return _nested(x, unpack)

    return unpack


def _nested(x: Any, fn: Callable[[Any], Any]) -> Any:
    if type(x) is dict:
        return {k: fn(v) for k, v in x.items()}
    if type(x) in (list, tuple):
        return type(x)(fn(v) for v in x)
    return x
