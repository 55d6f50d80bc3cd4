"""The nodes flows adds to ``torchdata.nodes``; each follows its ``reset(initial_state)`` /
``get_state()`` / ``next()`` contract with plain-dict state.

- :class:`Apply` runs one task: the per-sample stages on each of its Envelopes, skip/filter,
  and the collation of a batch.
- :class:`Workers` cuts the sampler's Envelopes into tasks (this rank's slice of one global batch,
  or a few samples of an unbatched flow) and runs them in a pool of threads or processes that
  lives across epochs.
- :class:`Gather` raises or counts the samples a task dropped (its state holds the counts) and
  hands the batches on: O(1) work per batch in the consumer.
- :class:`Mix` interleaves several flows with seeded weights.
- :class:`ToDevice` moves batches to the training device and runs batched transforms there.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import mmap
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
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
_IN_FLIGHT = 2  # tasks read ahead per worker: the one it runs and the next one
CHUNK = 4  # samples per task in an unbatched flow

# ``cancelled(i)``, called by a task before its ``i``-th sample: whether to abandon the task
Cancelled = Callable[[int], bool]


def never_cancelled(index: int) -> bool:
    """The :data:`Cancelled` of a task run inline: it always runs to its end."""
    return False


@dataclass
class Dropped:
    """Stands in for a sample a stage failed on (``error``) or a filter rejected (``None``)."""

    stage: str
    sample: str
    error: str | None = None


@dataclass
class Done:
    """One output of a task: ``out`` (a collated batch, or one sample of an unbatched chunk),
    valid when ``kept`` samples went into it (0: every sample was dropped); the samples
    ``dropped`` before it, in order; and the stage timings when stats are on."""

    out: Any
    kept: int
    dropped: list[Dropped] = field(default_factory=list)
    timings: Any = None

    @property
    def samples(self) -> int:
        return self.kept + len(self.dropped)


class TaskCancelled(Exception):
    """A task abandoned between two samples because its result is no longer wanted."""


def describe(item: Any, key: str) -> str:
    """How errors name a sample: its path or URL when it has one, else its key (e.g. a table row)."""
    if isinstance(item, dict) and isinstance(item.get("path"), str):
        return item["path"]
    return key


class Apply:
    """Runs one task: ``stages`` on each Envelope's item, then (``batched``) ``collate`` on the
    kept items. Failures and filtered samples become :class:`Dropped` markers, which cross
    worker boundaries as data; :class:`Gather` raises or counts them in order. With
    ``on_error="raise"`` the task stops at its first failure (nothing after it is delivered)."""

    def __init__(self, stages: Sequence[Callable], seed: int = 0, collate: Callable | None = None,
                 batched: bool = True, on_error: OnError = "raise"):
        self.stages, self.seed, self.collate = list(stages), seed, collate
        self.batched, self.on_error = batched, on_error

    def __call__(self, envelopes: Sequence[Envelope], cancelled: Cancelled = never_cancelled) -> list[Done]:
        """A batched task's one output, or one output per sample of an unbatched chunk (up to
        the first failure when raising)."""
        outs: list[Done] = []
        kept: list[Any] = []
        dropped: list[Dropped] = []
        failed = False
        for i, envelope in enumerate(envelopes):
            if cancelled(i):
                raise TaskCancelled
            item = self.sample(envelope)
            if isinstance(item, Dropped):
                dropped.append(item)
                failed = item.error is not None and self.on_error == "raise"
            elif self.batched:
                kept.append(item)
            if not self.batched:
                outs.append(Done(None, 0, [item]) if isinstance(item, Dropped) else Done(item, 1))
            if failed:
                break
        if not self.batched:
            return outs
        if not kept or failed:
            return [Done(None, 0, dropped)]
        return [Done(self.collate(kept) if self.collate else kept, len(kept), dropped)]

    def sample(self, envelope: Envelope) -> Any:
        """The stages on one sample: its item, or a :class:`Dropped` marker."""
        item = envelope.item
        for stage in self.stages:
            name = stage_name(stage)
            try:
                if isinstance(stage, Filter):
                    if not stage.predicate(item):
                        return Dropped(name, describe(envelope.item, envelope.key))
                elif getattr(stage, "random", False):
                    item = stage(item, rng(self.seed, envelope.epoch, envelope.key, name))
                else:
                    item = stage(item)
            except Exception as error:  # noqa: BLE001 - reported by Gather, with the sample named
                name = getattr(error, "flows_stage", name)  # a stage inside .cache() names itself
                return Dropped(name, describe(envelope.item, envelope.key),
                               f"{type(error).__name__}: {error}")
        return item


class Workers(BaseNode):
    """Runs ``fn`` (an :class:`Apply`) over tasks in ``num_workers`` threads or processes, in
    order (inline for 0), with up to 2 tasks per worker in flight.

    A task is this rank's slice of one global batch (``batched``; the Envelopes up to the one
    marked ``last``), else :data:`CHUNK` consecutive samples; each output is one :class:`Done`.
    The Envelopes are read from ``source`` in the consumer's thread, noting the source's state
    after each output's last sample; the Workers' state is ``{"source": <that state for the
    last output yielded>}``, the same for any number or kind of workers, and a restore never
    maps a consumed sample again.

    The pool starts with the first epoch and lives until ``Loader.close()``: epochs and
    restores reuse it. A restore or ``close()`` cancels the tasks read ahead: each
    stops before its next sample (a worker finishes at most the sample it is on).
    """

    def __init__(self, source: BaseNode, fn: Callable[..., list[Done]], num_workers: int = 0,
                 method: Literal["thread", "process"] = "thread", mp_context: str | None = None,
                 batched: bool = True):
        super().__init__()
        if method not in ("thread", "process"):
            raise FlowsError(f"method must be 'thread' or 'process', not {method!r}")
        self.source, self.fn, self.num_workers = source, fn, num_workers
        self.method, self.mp_context, self.batched = method, mp_context, batched
        self.window = _IN_FLIGHT * num_workers if num_workers else 1
        self._pool: _Pool | None = None
        # tasks read ahead: (handle, or the source's error to raise in order; states; keys)
        self._pending: deque[tuple[Any, list[dict], list[str]]] = deque()
        self._ready: deque[tuple[Done, dict]] = deque()  # outputs of the task being delivered
        self._exhausted = False
        self._state: dict = {}
        # a reset or close waits for a next() still running in the prefetcher's thread
        self._lock = threading.Lock()

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._cancel()  # the tasks read ahead are dropped below
        with self._lock:
            self._drop_pending()
            self.source.reset(initial_state["source"] if initial_state else None)
            self._state, self._exhausted = self.source.state_dict(), False

    def next(self) -> Done:
        with self._lock:
            while not self._ready:
                self._ready.extend(self._next_task())
            done, self._state = self._ready.popleft()
            return done

    def get_state(self) -> dict:
        return {"source": self._state}

    def queues(self) -> tuple[int, int, int]:
        """(ready, in flight, capacity) of the tasks read ahead."""
        pool = self._pool
        ready = sum(1 for task, _, _ in self._pending
                    if isinstance(task, BaseException) or (pool is not None and pool.done(task)))
        return ready, len(self._pending), self.window

    def _next_task(self) -> list[tuple[Done, dict]]:
        self._fill()
        if not self._pending:
            raise StopIteration
        task, states, keys = self._pending.popleft()
        try:
            if isinstance(task, BaseException):
                raise task
            self._fill()  # keep the workers busy while this task finishes
            assert self._pool is not None
            outs = self._pool.result(task)
        except _WorkerDied as error:
            self._stop_pool()
            sample = keys[error.index] if error.index is not None and error.index < len(keys) else keys[0]
            raise FlowsError(f"a worker process died while mapping sample {sample!r} ({error})") from None
        return list(zip(outs, states[: len(outs)], strict=True))

    def _read_task(self) -> tuple[list[Envelope], list[dict]]:
        """The next task's Envelopes, and the source's state after each of its outputs."""
        envelopes: list[Envelope] = []
        states: list[dict] = []
        while not (envelopes and (envelopes[-1].last if self.batched else len(envelopes) == CHUNK)):
            try:
                envelopes.append(next(self.source))
            except StopIteration:
                self._exhausted = True
                break
            if not self.batched:
                states.append(self.source.state_dict())
        if self.batched and envelopes:
            states.append(self.source.state_dict())
        return envelopes, states

    def _fill(self) -> None:
        while not self._exhausted and len(self._pending) < self.window:
            try:
                envelopes, states = self._read_task()
            except Exception as error:  # noqa: BLE001 - raised in order, after the tasks before it
                self._pending.append((error, [], []))
                self._exhausted = True
                return
            if not envelopes:
                return
            if self._pool is None:
                self._pool = _start_pool(self.fn, self.num_workers, self.method, self.mp_context)
            keys = [e.key for e in envelopes]
            try:
                self._pending.append((self._pool.submit(envelopes), states, keys))
            except _WorkerDied as error:  # raised in order, naming the task's first sample
                self._pending.append((error, states, keys))
                self._exhausted = True
                return

    def _cancel(self) -> None:
        """Tell the tasks running now to stop before their next sample (no lock: a next() in
        the prefetcher's thread may be waiting for one of them)."""
        if self._pool is not None:
            self._pool.cancel()

    def _drop_pending(self) -> None:
        pending, self._pending, self._ready = self._pending, deque(), deque()
        if self._pool is None:
            return
        try:
            self._pool.drop([task for task, _, _ in pending if not isinstance(task, BaseException)])
        except _WorkerDied:
            self._pool.shutdown()
            self._pool = None
            return
        self._pool.resume()

    def _shutdown(self) -> None:
        """Stop the pool (``Loader.close()`` calls this), cancelling the tasks read ahead; a
        later epoch starts a new pool."""
        self._cancel()
        with self._lock:
            self._stop_pool()

    def _stop_pool(self) -> None:
        self._pending, self._ready = deque(), deque()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class _WorkerDied(Exception):
    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index  # the sample of the task it was on, when known


class _Pool:
    """What Workers needs from a pool: submit a task, wait for its result (in order), cancel
    and drop tasks, stop."""

    def submit(self, envelopes: list[Envelope]) -> Any:
        raise NotImplementedError

    def result(self, task: Any) -> list[Done]:
        raise NotImplementedError

    def done(self, task: Any) -> bool:
        return False  # unknown: counted as in flight

    def cancel(self) -> None:
        """Make the running and queued tasks stop before their next sample."""

    def resume(self) -> None:
        """Undo :meth:`cancel` once every cancelled task is dropped."""

    def drop(self, tasks: list[Any]) -> None:
        """Wait for ``tasks`` (cancelled) and throw their results away."""

    def shutdown(self) -> None:
        """Stop the workers (after :meth:`cancel`)."""


def _start_pool(fn: Callable, workers: int, method: str, mp_context: str | None) -> _Pool:
    if not workers:
        return _Inline(fn)
    return _ThreadPool(fn, workers) if method == "thread" else _ProcessPool(fn, workers, mp_context)


class _Inline(_Pool):
    """No workers: a task runs when it is submitted, in the consumer's thread."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def submit(self, envelopes: list[Envelope]) -> Any:
        try:
            return self.fn(envelopes)
        except Exception as error:  # noqa: BLE001 - raised by result(), in order
            return _Failed(error)

    def result(self, task: Any) -> list[Done]:
        if isinstance(task, _Failed):
            raise task.error
        return task

    def done(self, task: Any) -> bool:
        return True


def training_threads() -> int:
    """torch intra-op threads for the training step: half the cores this rank may use (its CPU
    affinity divided by torchrun's ``LOCAL_WORLD_SIZE``), at least 1, leaving the other half to
    the loader's workers (one thread each); ``OMP_NUM_THREADS``, when set, wins. Oversubscribed
    OpenMP threads spin and wait on each other. The count deliberately does not depend on the
    number of workers: another intra-op thread count changes the order of float reductions, so a
    run resumed with another worker count would no longer be bit-identical."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))) // 2)


@functools.cache
def _omp_set_num_threads() -> Callable[[int], None] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch loaded (it sets the calling thread's
    count only), or None when there is none to be found."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps}
    except OSError:
        return None
    for path in sorted(paths):
        if path.rsplit("/", 1)[-1].startswith(("libgomp", "libiomp", "libomp")):
            with contextlib.suppress(OSError, AttributeError):
                return ctypes.CDLL(path).omp_set_num_threads
    return None


def _one_intra_op_thread() -> None:
    """A worker thread's initializer: its torch ops use one intra-op thread. torch's own
    ``set_num_threads`` would also change the count every thread starting torch later takes up
    (the training loop's included), so OpenMP's per-thread setting is used where it is found."""
    torch.get_num_threads()  # torch's per-thread set-up first: it would reset this thread's count
    set_this_thread = _omp_set_num_threads()
    if set_this_thread is not None:
        set_this_thread(1)
    else:
        torch.set_num_threads(1)


class _ThreadPool(_Pool):
    """Threads named ``flows-worker-P_N`` (pool P), each running torch ops on one intra-op
    thread (the workers are the parallelism; every other thread keeps its own setting)."""

    _pools = itertools.count()

    def __init__(self, fn: Callable, workers: int):
        self.fn = fn
        self.stopping = threading.Event()
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix=f"flows-worker-{next(self._pools)}",
                                           initializer=_one_intra_op_thread)

    def submit(self, envelopes: list[Envelope]) -> Future:
        return self.executor.submit(self.fn, envelopes, self._cancelled)

    def _cancelled(self, index: int) -> bool:
        return self.stopping.is_set()

    def result(self, task: Future) -> list[Done]:
        return task.result()

    def done(self, task: Future) -> bool:
        return task.done()

    def cancel(self) -> None:
        self.stopping.set()

    def resume(self) -> None:
        self.stopping.clear()

    def drop(self, tasks: list[Future]) -> None:
        for task in tasks:
            task.cancel()  # one not started never starts
        wait_for(tasks)  # the running ones stop before their next sample

    def shutdown(self) -> None:
        self.stopping.set()
        self.executor.shutdown(wait=True, cancel_futures=True)


class _ProcessPool(_Pool):
    """Worker processes, each with its own pipe: task ``k`` goes to worker ``k mod n`` and its
    result comes back on the same pipe, so results arrive in order with no thread in between.
    Each worker gets ``fn`` once, at start-up, and uses one torch thread. A small shared array
    holds the cancel flag and the sample each worker is on (to name it if the worker dies). The
    tensors a task returns travel as numpy arrays: through a shared-memory :class:`_Arena` when
    the workers are forked (one copy out on arrival), else pickled through the pipe; never as
    torch's per-tensor shared-memory file descriptors, which cost milliseconds each."""

    def __init__(self, fn: Callable, workers: int, mp_context: str | None):
        context = multiprocessing.get_context(mp_context)
        forked = context.get_start_method() == "fork"
        self.control = context.RawArray("q", 1 + workers)  # [cancel flag, sample index per worker]
        self.pipes: list[Connection] = []
        self.processes: list[BaseProcess] = []
        self.arenas: list[_Arena | None] = []
        for index in range(workers):
            ours, theirs = context.Pipe()
            arena = _Arena() if forked else None
            process = context.Process(target=_serve, args=(theirs, fn, self.control, index, arena),  # type: ignore[attr-defined]
                                      daemon=True, name="flows-worker")
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)
            self.arenas.append(arena)
        self.sent = 0

    def submit(self, envelopes: list[Envelope]) -> int:
        worker = self.sent % len(self.pipes)
        self.sent += 1
        try:
            self.pipes[worker].send(envelopes)
        except OSError as error:
            raise _WorkerDied(f"exit code {self.processes[worker].exitcode}") from error
        return worker

    def result(self, worker: int) -> list[Done]:
        try:
            out = self.pipes[worker].recv()
        except (EOFError, OSError):
            self.processes[worker].join(timeout=1)
            raise _WorkerDied(f"exit code {self.processes[worker].exitcode}",
                              int(self.control[1 + worker])) from None
        if isinstance(out, _Failed):
            raise out.error
        unpack = _unpacker(self.arenas[worker])
        for done in out:
            done.out = unpack(done.out)
        return out

    def cancel(self) -> None:
        self.control[0] = 1

    def resume(self) -> None:
        self.control[0] = 0

    def drop(self, tasks: list[int]) -> None:
        for worker in tasks:  # in order: each pipe stays in step
            try:
                self.result(worker)
            except _WorkerDied:
                raise
            except Exception:  # noqa: BLE001,S110 - a dropped task's failure does not matter
                pass

    def shutdown(self) -> None:
        self.control[0] = 1
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
    """An exception a task raised, on its way back."""

    error: BaseException


def _serve(pipe: Connection, fn: Callable, control: Any, index: int, arena: _Arena | None = None) -> None:
    """A worker process: run each task received on ``pipe`` until None, until the pipe closes,
    or until the consumer's process is gone (a forked worker holds copies of the consumer's pipe
    ends, so it may see no end of file when the consumer dies). A task stops before its next
    sample when the consumer cancels it or is gone."""
    torch.set_num_threads(1)  # the workers are the parallelism
    consumer = os.getppid()

    def cancelled(sample: int) -> bool:
        control[1 + index] = sample
        return bool(control[0]) or os.getppid() != consumer

    while True:
        try:
            while not pipe.poll(1.0):
                if os.getppid() != consumer:
                    return
            envelopes = pipe.recv()
        except (EOFError, OSError):
            return
        if envelopes is None:
            return
        try:
            out: Any = fn(envelopes, cancelled)
            pack = _packer(arena)
            for done in out:
                done.out = pack(done.out)
        except Exception as error:  # noqa: BLE001 - re-raised in the consumer
            out = _Failed(error)
        if arena is not None:
            arena.tasks += 1
        if os.getppid() != consumer:
            return
        try:
            pipe.send(out)
        except Exception as error:  # noqa: BLE001 - e.g. an output that cannot be pickled
            pipe.send(_Failed(FlowsError(f"a worker could not send its output back: {error}")))


SLOT_BYTES = 64 << 20  # shared memory per task (a batch); arrays beyond it go through the pipe
_SLOTS = _IN_FLIGHT + 1  # per worker: its tasks in flight and the one being read


class _Arena:
    """Anonymous shared memory (nothing in ``/dev/shm`` to leave behind) a forked worker writes
    its results' arrays to: slot ``j % 3`` for the ``j``-th task it receives. A worker has at
    most 2 tasks in flight plus the one the consumer is reading, so every slot is read before it
    is written again. Pages are allocated as they are first written: a slot costs the size of
    the largest batch written to it, not ``SLOT_BYTES``."""

    def __init__(self) -> None:
        self.memory = mmap.mmap(-1, _SLOTS * SLOT_BYTES)  # MAP_SHARED: seen by forked children
        self.tasks = 0  # counted in the worker


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
    """In a worker: every CPU tensor of a task's outputs to an array, in the task's arena slot
    while it fits."""
    base, used = ((arena.tasks % _SLOTS) * SLOT_BYTES if arena is not None else 0), 0

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


class Gather(BaseNode):
    """Hands on the outputs of :class:`Workers` (this rank's batches, or single items of an
    unbatched flow), in order.

    Samples a stage failed on raise :class:`StageError` (``on_error="raise"``) or are skipped
    and counted (``on_error="skip"``); filtered samples are counted. The counts run over all
    epochs and are part of the state. The work per output is O(1) (plus one step per dropped
    sample)."""

    def __init__(self, source: BaseNode, on_error: OnError = "raise"):
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise FlowsError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.source, self.on_error = source, on_error
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
        while True:
            done: Done = next(self.source)
            for dropped in done.dropped:
                self._drop(dropped)
            if done.kept:
                return done.out

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
                epoch_owner(source).seek(self.epoch)
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
                    epoch_owner(self.sources[pick]).seek(self.epoch + self.restarts[pick])
                    self.sources[pick].reset()
        raise StopIteration  # every time, until the next reset

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "done": list(self.done),
                "restarts": list(self.restarts), "ended": self.ended,
                "sources": [s.state_dict() for s in self.sources]}

    def planned(self, epoch: int) -> int:
        """Items in ``epoch`` when every source delivers all it plans (no sample dropped)."""
        if epoch not in self._lengths:
            left = [epoch_owner(source).planned(epoch) for source in self.sources]
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
                left[pick] = epoch_owner(self.sources[pick]).planned(epoch + restarts[pick])
            self._lengths[epoch] = count
        return self._lengths[epoch]

    def _pick(self, epoch: int, step: int) -> int:
        return int(rng(self.seed, epoch, step).choice(len(self.sources), p=self.weights))


def epoch_owner(node: Any) -> Any:
    """The node at or under ``node`` that numbers the epochs (a Sampler or a Mix): its
    ``seek(epoch)`` makes the next ``reset()`` start ``epoch``, its ``planned(epoch)`` counts
    that epoch's outputs."""
    while not hasattr(node, "seek"):
        node = getattr(node, "source", None)
        if not isinstance(node, BaseNode):
            raise TypeError("this graph has no Sampler or Mix that numbers its epochs")
    return node


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
