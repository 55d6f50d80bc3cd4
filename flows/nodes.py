"""The nodes flows adds to ``torchdata.nodes``; each follows its ``reset(initial_state)`` /
``get_state()`` / ``next()`` contract with plain-dict state.

- :class:`Apply` runs the per-sample stages on an Envelope.
- :class:`Workers` runs Apply in a pool of threads or processes that lives across epochs.
- :class:`Gather` regroups this rank's slice of each global batch, drops skipped samples
  (counting them in its state) and collates.
- :class:`Mix` interleaves several flows with seeded weights.
- :class:`ToDevice` moves batches to the training device and runs batched transforms there.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

import numpy as np
import torch
from torchdata.nodes import BaseNode

from flows.errors import FlowsError, StageError
from flows.sampling import Envelope, rng
from flows.stages import Filter, stage_name

OnError = Literal["raise", "skip"]
_IN_FLIGHT = 8  # items read ahead per worker: evens out samples of unequal cost


@dataclass
class Dropped:
    """Stands in for a sample a stage failed on (``error``) or a filter rejected (``None``)."""

    stage: str
    sample: str
    error: str | None = None


def describe(item: Any, key: str) -> str:
    """How errors name a sample: its path or URL when it has one, else its key (e.g. a table row)."""
    if isinstance(item, dict) and isinstance(item.get("path"), str):
        return item["path"]
    return key


class Apply:
    """Runs ``stages`` on an Envelope's item. Failures become :class:`Dropped` markers, which
    cross worker boundaries as data; :class:`Gather` raises or counts them in order."""

    def __init__(self, stages: Sequence[Callable], seed: int = 0):
        self.stages, self.seed = list(stages), seed

    def __call__(self, envelope: Envelope) -> Envelope:
        item = envelope.item
        sample = describe(item, envelope.key)
        for stage in self.stages:
            name = stage_name(stage)
            try:
                if isinstance(stage, Filter):
                    if not stage.predicate(item):
                        envelope.item = Dropped(name, sample)
                        return envelope
                elif getattr(stage, "random", False):
                    item = stage(item, rng(self.seed, envelope.epoch, envelope.key, name))
                else:
                    item = stage(item)
            except Exception as error:  # noqa: BLE001 - reported by Gather, with the sample named
                name = getattr(error, "flows_stage", name)  # a stage inside .cache() names itself
                envelope.item = Dropped(name, sample, f"{type(error).__name__}: {error}")
                return envelope
        envelope.item = item
        return envelope


class Workers(BaseNode):
    """Maps ``fn`` over ``source`` in ``num_workers`` threads or processes, in order (inline for
    0), with up to ``8 * num_workers`` items in flight.

    The pool starts with the first epoch and lives until :meth:`close` (``Loader.close()``):
    epochs and restores reuse it, so starting an epoch costs no thread or process start-up.
    Items are read from ``source`` in the consumer's thread, each with the source's state
    after it; the Workers' state is ``{"source": <that state for the last item yielded>}``,
    the same for any number or kind of workers, and a restore never maps a consumed item again.
    """

    def __init__(self, source: BaseNode, fn: Callable, num_workers: int = 0,
                 method: Literal["thread", "process"] = "thread", mp_context: str | None = None):
        super().__init__()
        if method not in ("thread", "process"):
            raise FlowsError(f"method must be 'thread' or 'process', not {method!r}")
        self.source, self.fn, self.num_workers = source, fn, num_workers
        self.method, self.mp_context = method, mp_context
        self.window = _IN_FLIGHT * num_workers
        self._pool: _ThreadPool | _ProcessPool | None = None
        self._pending: deque[tuple[Any, dict, str]] = deque()  # (task, source state, key)
        self._exhausted = False
        self._state: dict = {}
        # a reset or close waits for a next() still running in the prefetcher's thread
        self._lock = threading.Lock()

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        with self._lock:
            self._drop_pending()
            self.source.reset(initial_state["source"] if initial_state else None)
            self._state, self._exhausted = self.source.state_dict(), False

    def next(self) -> Any:
        with self._lock:
            return self._next()

    def _next(self) -> Any:
        if not self.num_workers:
            out = self.fn(next(self.source))
            self._state = self.source.state_dict()
            return out
        self._fill()
        if not self._pending:
            raise StopIteration
        task, state, key = self._pending.popleft()
        if isinstance(task, BaseException):
            raise task
        self._fill()  # keep the workers busy while this item finishes
        assert self._pool is not None
        try:
            out = self._pool.result(task)
        except _WorkerDied as error:
            self._stop_pool()
            raise FlowsError(f"a worker process died while mapping sample {key!r} ({error})") from None
        self._state = state
        return out

    def get_state(self) -> dict:
        return {"source": self._state}

    def queues(self) -> tuple[int, int, int]:
        """(ready, in flight, capacity) of the items read ahead."""
        done = self._pool.done if self._pool is not None else (lambda task: True)
        ready = sum(1 for task, _, _ in self._pending if isinstance(task, BaseException) or done(task))
        return ready, len(self._pending), self.window

    def _fill(self) -> None:
        while not self._exhausted and len(self._pending) < self.window:
            try:
                item = next(self.source)
            except StopIteration:
                self._exhausted = True
                return
            except Exception as error:  # noqa: BLE001 - raised in order, after the items before it
                self._pending.append((error, self._state, ""))
                self._exhausted = True
                return
            if self._pool is None:
                self._pool = (_ThreadPool(self.fn, self.num_workers) if self.method == "thread"
                              else _ProcessPool(self.fn, self.num_workers, self.mp_context))
            self._pending.append((self._pool.submit(item), self.source.state_dict(),
                                  getattr(item, "key", "")))

    def _drop_pending(self) -> None:
        pending, self._pending = self._pending, deque()
        for task, _, _ in pending:
            if self._pool is not None and not isinstance(task, BaseException):
                try:
                    self._pool.drop(task)
                except _WorkerDied:
                    self._pool.shutdown()
                    self._pool = None
                    return

    def _shutdown(self) -> None:
        """Stop the pool (``Loader.close()`` calls this); a later epoch starts a new one."""
        with self._lock:
            self._stop_pool()

    def _stop_pool(self) -> None:
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class _WorkerDied(Exception):
    pass


class _ThreadPool:
    """Threads named ``flows-worker-P_N`` (pool P), each running torch ops on one intra-op
    thread (the workers are the parallelism; the consumer's thread keeps its own setting)."""

    _pools = itertools.count()

    def __init__(self, fn: Callable, workers: int):
        self.fn = fn
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix=f"flows-worker-{next(self._pools)}",
                                           initializer=torch.set_num_threads, initargs=(1,))

    def submit(self, item: Any) -> Future:
        return self.executor.submit(self.fn, item)

    def result(self, task: Future) -> Any:
        return task.result()

    def done(self, task: Future) -> bool:
        return task.done()

    def drop(self, task: Future) -> None:
        task.cancel()  # one already running finishes; its result is dropped

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class _ProcessPool:
    """Worker processes, each with its own pipe: item ``k`` goes to worker ``k mod n`` and its
    result comes back on the same pipe, so results arrive in order with no thread in between.
    Each worker gets ``fn`` once, at start-up, and uses one torch thread. The tensors it returns
    travel as numpy arrays: through a shared-memory :class:`_Arena` when the workers are forked
    (one copy out on arrival), else pickled through the pipe; never as torch's per-tensor
    shared-memory file descriptors, which cost milliseconds each."""

    def __init__(self, fn: Callable, workers: int, mp_context: str | None):
        context = multiprocessing.get_context(mp_context)
        forked = context.get_start_method() == "fork"
        self.pipes: list[Connection] = []
        self.processes: list[BaseProcess] = []
        self.arenas: list[_Arena | None] = []
        for _ in range(workers):
            ours, theirs = context.Pipe()
            arena = _Arena() if forked else None
            process = context.Process(target=_serve, args=(theirs, fn, arena),  # type: ignore[attr-defined]
                                      daemon=True, name="flows-worker")
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)
            self.arenas.append(arena)
        self.sent = 0

    def submit(self, item: Any) -> int:
        worker = self.sent % len(self.pipes)
        self.sent += 1
        try:
            self.pipes[worker].send(item)
        except OSError as error:
            raise _WorkerDied(f"exit code {self.processes[worker].exitcode}") from error
        return worker

    def result(self, worker: int) -> Any:
        try:
            out = self.pipes[worker].recv()
        except (EOFError, OSError):
            self.processes[worker].join(timeout=1)
            raise _WorkerDied(f"exit code {self.processes[worker].exitcode}") from None
        if isinstance(out, _Failed):
            raise out.error
        return _wire(out, _unpacker(self.arenas[worker]))

    def done(self, worker: int) -> bool:
        return False  # unknown without reading the pipe: counted as in flight

    def drop(self, worker: int) -> None:
        try:
            self.result(worker)  # wait for it and throw it away: the pipe stays in order
        except _WorkerDied:
            raise
        except Exception:  # noqa: BLE001,S110 - a dropped item's failure does not matter
            pass

    def shutdown(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join()
        for pipe in self.pipes:
            pipe.close()
        for arena in self.arenas:
            if arena is not None:
                arena.memory.close()


@dataclass
class _Failed:
    """An exception ``fn`` raised in a worker process, on its way back."""

    error: BaseException


def _serve(pipe: Connection, fn: Callable, arena: _Arena | None = None) -> None:
    """A worker process: map each item received on ``pipe`` until None, until the pipe closes,
    or until the consumer's process is gone (a forked worker holds copies of the consumer's pipe
    ends, so it may see no end of file when the consumer dies)."""
    torch.set_num_threads(1)  # the workers are the parallelism
    consumer = os.getppid()
    while True:
        try:
            while not pipe.poll(1.0):
                if os.getppid() != consumer:
                    return
            item = pipe.recv()
        except (EOFError, OSError):
            return
        if item is None:
            return
        try:
            out: Any = _wire(fn(item), _packer(arena))
        except Exception as error:  # noqa: BLE001 - re-raised in the consumer
            out = _Failed(error)
        if arena is not None:
            arena.items += 1
        try:
            pipe.send(out)
        except Exception as error:  # noqa: BLE001 - e.g. an output that cannot be pickled
            pipe.send(_Failed(FlowsError(f"a worker could not send its output back: {error}")))


SLOT_BYTES = 4 << 20  # shared memory per result; arrays beyond it go through the pipe
_SLOTS = _IN_FLIGHT + 1  # per worker: its items in flight and the one being read


class _Arena:
    """Anonymous shared memory a forked worker writes its results' arrays to: slot ``j % 9``
    for the ``j``-th item it receives. A worker has at most 8 items in flight plus the one the
    consumer is reading, so every slot is read before it is written again."""

    def __init__(self) -> None:
        self.memory = mmap.mmap(-1, _SLOTS * SLOT_BYTES)  # MAP_SHARED: seen by forked children
        self.items = 0  # counted in the worker


@dataclass
class _Shared:
    """An array in an arena."""

    offset: int
    dtype: str
    shape: tuple[int, ...]


class _Packed:
    """An array pickled through the pipe (no arena, or too large for a slot)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _packer(arena: _Arena | None) -> Callable[[Any], Any]:
    """In a worker: every CPU tensor of a result to an array, in the next arena slot while it fits."""
    base, used = ((arena.items % _SLOTS) * SLOT_BYTES if arena is not None else 0), 0

    def pack(x: Any) -> Any:
        nonlocal used
        if not (isinstance(x, torch.Tensor) and x.device.type == "cpu" and not x.requires_grad):
            return _nested(x, pack)
        try:
            array = x.numpy()
        except TypeError:  # no numpy dtype (bfloat16): torch's own way
            return x
        if arena is None or used + array.nbytes > SLOT_BYTES:
            return _Packed(array)
        offset = base + used
        np.ndarray(array.shape, array.dtype, arena.memory, offset)[...] = array
        used += -(-array.nbytes // 64) * 64  # keep the next array 64-byte aligned
        return _Shared(offset, array.dtype.str, array.shape)

    return pack


def _unpacker(arena: _Arena | None) -> Callable[[Any], Any]:
    """In the consumer: the tensors back, copied out of the arena."""

    def unpack(x: Any) -> Any:
        if isinstance(x, _Shared):
            assert arena is not None
            return torch.from_numpy(np.ndarray(x.shape, x.dtype, arena.memory, x.offset).copy())
        if isinstance(x, _Packed):
            return torch.from_numpy(x.array)
        return _nested(x, unpack)

    return unpack


def _nested(x: Any, fn: Callable[[Any], Any]) -> Any:
    if type(x) is dict:
        return {k: fn(v) for k, v in x.items()}
    if type(x) in (list, tuple):
        return type(x)(fn(v) for v in x)
    return x


def _wire(out: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` over a worker's output: an Envelope's item, or the output itself."""
    if isinstance(out, Envelope):
        out.item = fn(out.item)
        return out
    return fn(out)


class Gather(BaseNode):
    """Regroups Envelopes into this rank's batches (or single items when ``batched`` is False).

    Failed samples raise :class:`StageError` (``on_error="raise"``) or are skipped and counted
    (``on_error="skip"``); filtered samples are counted. The counts run over all epochs and are
    part of the state."""

    def __init__(self, source: BaseNode, collate: Callable | None = None, batched: bool = True,
                 on_error: OnError = "raise"):
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise FlowsError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.source, self.collate, self.batched, self.on_error = source, collate, batched, on_error
        self.skipped = 0
        self.filtered = 0

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        if initial_state is None:  # a new epoch: the counts go on
            self.source.reset(None)
        else:
            self.source.reset(initial_state["source"])
            self.skipped, self.filtered = initial_state["skipped"], initial_state["filtered"]

    def next(self) -> Any:
        items: list[Any] = []
        while True:
            envelope: Envelope = next(self.source)
            if isinstance(envelope.item, Dropped):
                self._drop(envelope.item)
            else:
                items.append(envelope.item)
            if items and (envelope.last or not self.batched):
                if not self.batched:
                    return items[0]
                return self.collate(items) if self.collate else items

    def _drop(self, dropped: Dropped) -> None:
        if dropped.error is None:
            self.filtered += 1
        elif self.on_error == "skip":
            self.skipped += 1
        else:
            raise StageError.at(dropped.stage, dropped.sample, dropped.error)

    def get_state(self) -> dict:
        return {"source": self.source.state_dict(), "skipped": self.skipped,
                "filtered": self.filtered}


class Mix(BaseNode):
    """Draws each next item from one of ``sources`` with probability ``weights``.

    The choice at step ``s`` of epoch ``e`` is a pure function of (seed, e, s), so every rank
    makes the same choices. ``stop="first"`` ends the epoch when a drawn source is exhausted;
    ``stop="all"`` restarts exhausted sources until each has finished once. Epoch ``e`` plays
    each source's epoch ``e`` and, for its ``r``-th restart, epoch ``e + r``: an epoch's content
    never depends on how far earlier epochs ran, or how often the Mix was reset."""

    def __init__(self, sources: Sequence[BaseNode], weights: Sequence[float], seed: int = 0,
                 stop: Literal["first", "all"] = "first"):
        super().__init__()
        if len(sources) != len(weights) or not sources:
            raise FlowsError("Mix needs one weight per flow, and at least one flow")
        if stop not in ("first", "all"):
            raise FlowsError(f"stop must be 'first' or 'all', not {stop!r}")
        self.sources, self.seed, self.stop = list(sources), seed, stop
        self.weights = np.asarray(weights, dtype=float) / float(np.sum(weights))
        self.epoch, self._started = 0, False
        self._lengths: dict[int, int] = {}

    def seek(self, epoch: int) -> None:
        """Make the next ``reset()`` without a state start ``epoch``."""
        self.epoch, self._started = epoch - 1, True

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        if initial_state is not None:
            self.epoch, self.step = initial_state["epoch"], initial_state["step"]
            self.done = list(initial_state["done"])
            self.restarts = list(initial_state.get("restarts", [0] * len(self.sources)))
            self.ended = initial_state.get("ended", False)
            for source, state in zip(self.sources, initial_state["sources"], strict=True):
                source.reset(state)
        else:
            self.epoch += 1 if self._started else 0
            self.step, self.ended = 0, False
            self.done, self.restarts = [False] * len(self.sources), [0] * len(self.sources)
            for source in self.sources:
                _seek(source, self.epoch)
                source.reset()
        self._started = True

    def next(self) -> Any:
        while not self.ended:
            pick = self._pick(self.epoch, self.step)
            self.step += 1
            try:
                return next(self.sources[pick])
            except StopIteration:
                self.done[pick] = True
                self.ended = self.stop == "first" or all(self.done)
                if not self.ended:
                    self.restarts[pick] += 1
                    _seek(self.sources[pick], self.epoch + self.restarts[pick])
                    self.sources[pick].reset()
        raise StopIteration  # every time, until the next reset

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "done": list(self.done),
                "restarts": list(self.restarts), "ended": self.ended,
                "sources": [s.state_dict() for s in self.sources]}

    def planned(self, epoch: int) -> int:
        """Items in ``epoch`` when every source delivers all it plans (no sample dropped)."""
        if epoch not in self._lengths:
            left = [_planned(source, epoch) for source in self.sources]
            done, restarts = [False] * len(left), [0] * len(left)
            step = count = 0
            while True:
                pick = self._pick(epoch, step)
                step += 1
                if left[pick]:
                    left[pick], count = left[pick] - 1, count + 1
                    continue
                done[pick] = True
                if self.stop == "first" or all(done):
                    break
                restarts[pick] += 1
                left[pick] = _planned(self.sources[pick], epoch + restarts[pick])
            self._lengths[epoch] = count
        return self._lengths[epoch]

    def _pick(self, epoch: int, step: int) -> int:
        return int(rng(self.seed, epoch, step).choice(len(self.sources), p=self.weights))


def _epoch_owner(node: Any) -> Any:
    """The node under ``node`` that numbers its epochs (a Sampler or a Mix)."""
    while not hasattr(node, "seek"):
        node = node.source
    return node


def _seek(node: BaseNode, epoch: int) -> None:
    """Make the next ``node.reset()`` without a state start ``epoch``."""
    _epoch_owner(node).seek(epoch)


def _planned(node: BaseNode, epoch: int) -> int:
    """Outputs of ``node`` in ``epoch`` when no sample is dropped."""
    return _epoch_owner(node).planned(epoch)


def to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


class ToDevice(BaseNode):
    """Moves each batch to ``device`` (non-blocking from pinned memory) and applies
    ``transform`` there, e.g. a batched resample or mel spectrogram on the GPU."""

    def __init__(self, source: BaseNode, device: str | torch.device,
                 transform: Callable[[Any], Any] | None = None):
        super().__init__()
        self.source, self.device, self.transform = source, torch.device(device), transform

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state["source"] if initial_state else None)

    def next(self) -> Any:
        batch = to_device(next(self.source), self.device)
        return self.transform(batch) if self.transform else batch

    def get_state(self) -> dict:
        return {"source": self.source.state_dict()}
