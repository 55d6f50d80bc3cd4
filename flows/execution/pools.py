"""Worker pools: where :class:`~flows.nodes.workers.Workers` runs its tasks. A pool takes tasks
(a list of Envelopes) in order, hands back each task's outputs in the same order, cancels and
drops tasks read ahead, and stops. Three kinds: :class:`Inline` (no workers, the consumer's
thread), :class:`ThreadPool` and :class:`ProcessPool` (one pipe per worker, results through
shared memory: :mod:`flows.execution.shared_memory`).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from flows.errors import FlowsError
from flows.execution.apply import Done
from flows.execution.shared_memory import Arena, packer, unpacker
from flows.execution.threads import one_intra_op_thread
from flows.nodes.sampler import Envelope

IN_FLIGHT = 2  # tasks read ahead per worker: the one it runs and the next one


class WorkerDied(Exception):
    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index  # the sample of the task it was on, when known


class Pool:
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


def start_pool(fn: Callable, workers: int, method: str, mp_context: str | None) -> Pool:
    if not workers:
        return Inline(fn)
    return ThreadPool(fn, workers) if method == "thread" else ProcessPool(fn, workers, mp_context)


class Inline(Pool):
    """No workers: a task runs when its result is asked for, in the consumer's thread (so
    nothing is mapped ahead of the consumer, and a dropped task never runs)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def submit(self, envelopes: list[Envelope]) -> list[Envelope]:
        return envelopes

    def result(self, task: list[Envelope]) -> list[Done]:
        return self.fn(task)


class ThreadPool(Pool):
    """Threads named ``flows-worker-P_N`` (pool P), each running torch ops on one intra-op
    thread (the workers are the parallelism; every other thread keeps its own setting)."""

    _pools = itertools.count()

    def __init__(self, fn: Callable, workers: int):
        self.fn = fn
        self.stopping = threading.Event()
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix=f"flows-worker-{next(self._pools)}",
                                           initializer=one_intra_op_thread)

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


class ProcessPool(Pool):
    """Worker processes, each with its own pipe: task ``k`` goes to worker ``k mod n`` and its
    result comes back on the same pipe, so results arrive in order with no thread in between.
    Each worker gets ``fn`` once, at start-up, and uses one torch thread. A small shared array
    holds the cancel flag and the sample each worker is on (to name it if the worker dies). The
    tensors a task returns travel as numpy arrays: through a shared-memory :class:`Arena` when
    the workers are forked (one copy out on arrival), else pickled through the pipe; never as
    torch's per-tensor shared-memory file descriptors, which cost milliseconds each."""

    def __init__(self, fn: Callable, workers: int, mp_context: str | None):
        context = multiprocessing.get_context(mp_context)
        forked = context.get_start_method() == "fork"
        self.control = context.RawArray("q", 1 + workers)  # [cancel flag, sample index per worker]
        self.pipes: list[Connection] = []
        self.processes: list[BaseProcess] = []
        self.arenas: list[Arena | None] = []
        for index in range(workers):
            ours, theirs = context.Pipe()
            arena = Arena(IN_FLIGHT + 1) if forked else None
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
            raise WorkerDied(f"exit code {self.processes[worker].exitcode}") from error
        return worker

    def result(self, worker: int) -> list[Done]:
        try:
            out = self.pipes[worker].recv()
        except (EOFError, OSError):
            self.processes[worker].join(timeout=1)
            raise WorkerDied(f"exit code {self.processes[worker].exitcode}",
                              int(self.control[1 + worker])) from None
        if isinstance(out, _Failed):
            raise out.error
        unpack = unpacker(self.arenas[worker])
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
            except WorkerDied:
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


def _serve(pipe: Connection, fn: Callable, control: Any, index: int, arena: Arena | None = None) -> None:
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
            pack = packer(arena)
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
