"""Workers: runs the per-sample stages of a flow in threads or processes, a task at a time.

The node reads the Sampler's Envelopes in the consumer's thread, cuts them into tasks (this
rank's slice of one global batch, or :data:`CHUNK` samples of an unbatched flow), submits them
to a pool (:mod:`flows.execution.pools`) and yields each task's outputs in order, as
:class:`~flows.execution.apply.Done`. Its state is the Sampler's after the last output yielded.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from torchdata.nodes import BaseNode

from flows.errors import FlowsError
from flows.execution.apply import Done
from flows.execution.pools import IN_FLIGHT, Pool, WorkerDied, start_pool
from flows.nodes.sampler import Envelope

CHUNK = 4  # samples per task in an unbatched flow


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
        self.window = IN_FLIGHT * num_workers if num_workers else 1
        self._pool: Pool | None = None
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
        except WorkerDied as error:
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
                self._pool = start_pool(self.fn, self.num_workers, self.method, self.mp_context)
            keys = [e.key for e in envelopes]
            try:
                self._pending.append((self._pool.submit(envelopes), states, keys))
            except WorkerDied as error:  # raised in order, naming the task's first sample
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
        except WorkerDied:
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
