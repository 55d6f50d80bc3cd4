"""Pipeline observability: per-node time and throughput, queue depths, the bottleneck, and an
optional Chrome trace.

``flow.loader(stats=True)`` builds the plain graph, then :meth:`Stats.instrument` wraps it from
the outside: the nodes stay the same (same outputs, same state), their ``next`` is timed where
they are found. It times the source (each Sampler reading records), every per-sample stage and
the collation (the Workers' function is wrapped: timed inside the workers, threads or processes,
the timings travel back with each task, a batch), the queues of the workers and of the
prefetcher, and the time the training loop waits for each batch.
``loader.stats()`` returns a :class:`Report`; ``print(report.table())`` shows it and names the
bottleneck; ``report.save_trace("trace.json")`` writes a Chrome trace (``chrome://tracing`` or
https://ui.perfetto.dev) when the loader was built with ``stats=Stats(trace=True)``.

With ``stats=False`` (the default) none of this is built: the graph is exactly the plain one.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchdata.nodes import BaseNode

from flows.errors import FlowsError
from flows.execution.apply import Apply, Cancelled, Done, never_cancelled
from flows.nodes.graph import walk
from flows.nodes.prefetch import Prefetch
from flows.nodes.sampler import Envelope, Sampler
from flows.nodes.workers import Workers
from flows.stages.base import Filter, stage_name
from flows.stages.cache import Cached

_local = threading.local()  # the current task's timing records, per worker thread

# one timing record: (stage name, start ns, duration ns, own duration ns without nested stages)
Record = tuple[str, int, int, int]


def _now() -> int:
    return time.perf_counter_ns()  # CLOCK_MONOTONIC on Linux: comparable across processes


# ---- probes running in the workers ------------------------------------------------------------


class TimedStage:
    """Wraps a stage: same name and randomness, records its duration for the current sample.
    A :class:`~flows.stages.cache.Cached` stage is reported as ``cache (hit)`` or ``cache (miss)``,
    with its inner stages reported separately on a miss."""

    def __init__(self, stage: Callable, cached: bool = False, name: str | None = None):
        self.stage, self.cached = stage, cached
        self.name = name or stage_name(stage)
        self.random = getattr(stage, "random", False)

    def __call__(self, *args: Any) -> Any:
        records: list[Record] = _local.records
        before = len(records)
        start = _now()
        try:
            return self.stage(*args)
        finally:
            duration = _now() - start
            inner = sum(r[3] for r in records[before:])
            name = self.name
            if self.cached:
                name = "cache (hit)" if len(records) == before else "cache (miss)"
            records.append((name, start, duration, duration - inner))


def timed(stage: Callable) -> Callable:
    """``stage`` wrapped so its time is recorded (filters stay filters, caches time their inner
    stages too)."""
    if isinstance(stage, Filter):
        return Filter(TimedStage(stage.predicate, name=stage.name), stage.name)
    if isinstance(stage, Cached):
        return TimedStage(stage.with_stages([timed(s) for s in stage.stages]), cached=True)
    return TimedStage(stage)


class TimedApply:
    """The workers' function with stats on: runs :class:`~flows.execution.apply.Apply` over timed stages
    and a timed collate, and attaches the task's records (plus process and thread ids) to its
    first output."""

    def __init__(self, apply: Apply):
        self.apply = copy.copy(apply)
        self.apply.stages = [timed(s) for s in apply.stages]
        if apply.collate is not None:
            self.apply.collate = TimedStage(apply.collate, name="collate")

    def __call__(self, envelopes: list[Envelope], cancelled: Cancelled = never_cancelled) -> list[Done]:
        records: list[Record] = []
        _local.records = records
        try:
            outs = self.apply(envelopes, cancelled)
        finally:
            _local.records = None
        if outs:
            outs[0].timings = (os.getpid(), threading.get_ident(), records)
        return outs


# ---- timing a node's next, in the main process --------------------------------------------


def _time_next(node: BaseNode, record: Callable[..., None],
               before: Callable[[Any], None] | None = None) -> None:
    """Make ``node``'s ``next`` (what torchdata's ``__next__`` calls) report each call:
    ``record(node, item, start, duration)``; ``before(node)`` runs first when given."""
    inner = node.next

    def timed_next() -> Any:
        if before is not None:
            before(node)
        start = _now()
        item = inner()
        record(node, item, start, _now() - start)
        return item

    node.next = timed_next  # type: ignore[method-assign]


# ---- the collector --------------------------------------------------------------------------


@dataclass
class _Queue:
    total: float = 0.0
    samples: int = 0
    peak: int = 0
    capacity: int = 0

    def add(self, depth: int, capacity: int) -> None:
        self.total += depth
        self.samples += 1
        self.peak = max(self.peak, depth)
        self.capacity = capacity


class Stats:
    """Collects a loader's timings. Pass ``stats=True`` or ``stats=Stats(trace=True)`` to
    :meth:`Flow.loader <flows.flow.Flow.loader>`; read them with ``loader.stats()``.

    ``trace=True`` also keeps up to ``max_events`` timed events for a Chrome trace."""

    def __init__(self, trace: bool = False, max_events: int = 1_000_000):
        self.trace, self.max_events = trace, max_events
        self.origin = _now()
        self.workers = 1
        self._lock = threading.Lock()
        self._prefetcher: Prefetch | None = None
        self.clear()

    def clear(self) -> None:
        """Forget everything measured so far (e.g. to report each epoch on its own)."""
        with self._lock:
            self.calls: dict[str, list[int]] = {}  # node -> [calls, ns, items]
            self.queues: dict[str, _Queue] = {}
            self.events: list[dict] = []
            self.samples = self.batches = 0
            self.wall_ns = self.wait_ns = 0
            self.first_batch_ns: list[int] = []

    # -- wrapping a built graph (the Loader calls this when stats are on) --
    def instrument(self, root: BaseNode) -> None:
        """Time the graph below ``root``, built and not started: each Sampler's reads, each
        Workers' tasks (its function, run in the workers, is wrapped) and the wait for them, and
        the prefetcher's queue. No node is added or replaced: states stay those of the plain graph."""
        for node in walk(root):
            if isinstance(node, Sampler):
                _time_next(node, self._source)
            elif isinstance(node, Workers):
                self.workers = max(self.workers, node.num_workers)
                if isinstance(node.fn, Apply):
                    node.fn = TimedApply(node.fn)
                _time_next(node, self._done, before=self._sample_workers)
            elif isinstance(node, Prefetch):
                self._prefetcher = node

    # -- recording --
    def _event(self, name: str, start: int, duration: int, pid: int | None = None,
               tid: int | None = None) -> None:
        if len(self.events) < self.max_events:
            self.events.append({"name": name, "ph": "X", "pid": pid or os.getpid(),
                                "tid": tid or threading.get_ident(),
                                "ts": (start - self.origin) / 1e3, "dur": duration / 1e3})

    def _source(self, node: Sampler, item: Any, start: int, duration: int) -> None:
        with self._lock:
            entry = self.calls.setdefault("source", [0, 0, 0])
            entry[0] += 1
            entry[1] += duration
            entry[2] += 1
            if self.trace:
                self._event("source", start, duration)

    def _done(self, node: Workers, done: Done, start: int, waited: int) -> None:
        pid, tid, records = done.timings or (0, 0, ())
        with self._lock:
            self.samples += done.samples
            for name, begin, duration, own in records:
                entry = self.calls.setdefault(name, [0, 0, 0])
                entry[0] += 1
                entry[1] += own
                entry[2] += done.kept if name == "collate" else 1
                if self.trace:
                    self._event(name, begin, duration, pid, tid)
            if self.trace:
                self._event("wait for workers", start, waited)

    def _queue(self, name: str, depth: int, capacity: int) -> None:
        with self._lock:
            self.queues.setdefault(name, _Queue()).add(depth, capacity)

    def _sample_workers(self, workers: Workers) -> None:
        if workers.num_workers:
            ready, in_flight, capacity = workers.queues()
            self._queue("workers: ready", ready, capacity)
            self._queue("workers: in flight", in_flight, capacity)

    def watch(self, start_epoch: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        """``start_epoch()``, timing the wait for each batch, and the first batch of the epoch
        from the call on (restarting or restoring the graph included)."""
        start = _now()
        return self._watch(start_epoch(), start)

    def _watch(self, iterator: Iterator[Any], start: int) -> Iterator[Any]:
        previous = start
        while True:
            if self._prefetcher is not None:
                self._queue("prefetch: ready batches", *self._prefetcher.queues())
            asked = _now()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            got = _now()
            first = previous == start
            with self._lock:
                self.batches += 1
                self.wait_ns += got - asked
                self.wall_ns += got - previous
                if first:
                    self.first_batch_ns.append(got - start)
                if self.trace:
                    self._event("first batch" if first else "wait for batch",
                                start if first else asked, got - (start if first else asked))
            previous = got
            yield batch

    # -- reading --
    def report(self) -> Report:
        """A snapshot of everything measured so far."""
        with self._lock:
            nodes = []
            for name, (calls, ns, items) in self.calls.items():
                parallel = 1 if name == "source" else self.workers
                nodes.append(NodeStats(name, calls, items, ns / 1e9, parallel))
            queues = [QueueStats(name, q.total / max(q.samples, 1), q.peak, q.capacity, q.samples)
                      for name, q in self.queues.items()]
            report = Report(nodes=nodes, queues=queues, samples=self.samples, batches=self.batches,
                            seconds=self.wall_ns / 1e9, waited=self.wait_ns / 1e9,
                            first_batch=[ns / 1e9 for ns in self.first_batch_ns],
                            workers=self.workers, events=list(self.events) if self.trace else None)
        report.bottleneck, report.reason = _bottleneck(report)
        return report


# ---- the report ---------------------------------------------------------------------------------


@dataclass
class NodeStats:
    """One node or stage: ``calls``, ``items`` handled, busy ``seconds`` (summed over the
    ``parallel`` workers sharing it)."""

    name: str
    calls: int
    items: int
    seconds: float
    parallel: int = 1

    @property
    def rate(self) -> float:
        """Items per second this node could sustain on its own with its workers (capacity)."""
        return self.items * self.parallel / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class QueueStats:
    """A queue's depth sampled each time its consumer asked for the next item."""

    name: str
    mean: float
    peak: int
    capacity: int
    samples: int


@dataclass
class Report:
    """What :meth:`Loader.stats <flows.loader.Loader.stats>` returns."""

    nodes: list[NodeStats]
    queues: list[QueueStats]
    samples: int
    batches: int
    seconds: float  # time spent iterating, up to the last batch delivered
    waited: float  # of which the training loop waited for batches
    first_batch: list[float]  # seconds from iter() to the first batch, per epoch
    workers: int
    events: list[dict] | None = None
    bottleneck: str = ""
    reason: str = ""

    @property
    def rate(self) -> float:
        """Samples per second delivered."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def node(self, name: str) -> NodeStats:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r}; nodes: {[n.name for n in self.nodes]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples, "batches": self.batches, "seconds": self.seconds,
            "samples_per_s": self.rate, "waited": self.waited, "first_batch": self.first_batch,
            "workers": self.workers, "bottleneck": self.bottleneck, "reason": self.reason,
            "nodes": [{**vars(n), "items_per_s": n.rate} for n in self.nodes],
            "queues": [vars(q) for q in self.queues],
        }

    def table(self) -> str:
        """A plain-text table: one row per node, then queues, waits and the bottleneck."""
        first = f"; first batch after {self.first_batch[0]:.3f} s" if self.first_batch else ""
        lines = [f"{self.samples} samples in {self.batches} batches, {self.seconds:.2f} s, "
                 f"{self.rate:.1f} samples/s{first} ({self.workers} worker(s))"]
        busy = sum(n.seconds for n in self.nodes)
        lines.append(f"{'node':<22}{'calls':>9}{'busy s':>10}{'share':>8}{'items/s':>12}")
        for n in _ordered(self.nodes):
            share = 100 * n.seconds / busy if busy else 0.0
            rate = "inf" if n.rate == float("inf") else f"{n.rate:.0f}"
            mark = "  <- bottleneck" if n.name == self.bottleneck else ""
            lines.append(f"{n.name:<22}{n.calls:>9}{n.seconds:>10.3f}{share:>7.1f}%{rate:>12}{mark}")
        for q in self.queues:
            lines.append(f"queue {q.name}: mean {q.mean:.2f}, max {q.peak} of {q.capacity}")
        if self.seconds:
            lines.append(f"the training loop waited {self.waited:.2f} s of {self.seconds:.2f} s "
                         f"({100 * self.waited / self.seconds:.0f}%) for batches")
        reason = f" ({self.reason})" if self.reason else ""
        lines.append(f"bottleneck: {self.bottleneck or 'unknown'}{reason}")
        return "\n".join(lines)

    def save_trace(self, path: str | os.PathLike[str]) -> Path:
        """Write the Chrome trace (JSON) of a loader built with ``stats=Stats(trace=True)``."""
        if self.events is None:
            raise FlowsError("no trace was recorded: build the loader with stats=Stats(trace=True)")
        path = Path(path)
        path.write_text(json.dumps({"traceEvents": self.events, "displayTimeUnit": "ms"}))
        return path


_ORDER = ("source", "read", "decode_audio", "downmix", "resample", "normalize", "pad")


def _ordered(nodes: list[NodeStats]) -> list[NodeStats]:
    """Pipeline order: the source, the stages (first seen first), collate last."""
    rank = {name: i for i, name in enumerate(_ORDER)}
    return sorted(nodes, key=lambda n: (n.name == "collate", n.name != "source",
                                        rank.get(n.name, len(rank))))


def _bottleneck(report: Report) -> tuple[str, str]:
    """The node that limits throughput: the training loop itself when it rarely waits for
    batches; else the node with the lowest capacity (the per-sample stages and the collation
    share the workers, so among them it is the one taking most of their time)."""
    if not report.nodes:
        return "", ""
    if report.batches > 1 and report.seconds > 0 and report.waited < 0.1 * report.seconds:
        return "consumer", (f"the training loop waited for batches only "
                            f"{100 * report.waited / report.seconds:.0f}% of the time")
    stages = [n for n in report.nodes if n.name != "source"]
    stage_time = sum(n.seconds for n in stages)
    candidates: list[tuple[float, str, str]] = []
    if stages and stage_time > 0:
        worst = max(stages, key=lambda n: n.seconds)
        pool = max(n.items for n in stages) * report.workers / stage_time
        candidates.append((pool, worst.name, f"{100 * worst.seconds / stage_time:.0f}% of the "
                           f"{report.workers} worker(s)' time; they sustain {pool:.0f} samples/s"))
    source = next((n for n in report.nodes if n.name == "source"), None)
    if source is not None and source.seconds > 0:
        candidates.append((source.rate, "source", f"one thread, sustains {source.rate:.0f} samples/s"))
    if not candidates:
        return "", ""
    _, name, reason = min(candidates)
    return name, reason


# ---- benchmarking helpers (used by ``flows bench RECIPE``) -----------------------------------


def bench(target: Any, batches: int | None = None, epochs: int = 1, **loader_kwargs: Any) -> Report:
    """Iterate ``target`` (a Flow, built with ``stats=True`` and ``loader_kwargs``, or a Loader
    built with stats) for ``epochs`` epochs or ``batches`` batches, and return its Report."""
    loader = target.loader(stats=True, **loader_kwargs) if hasattr(target, "loader") else target
    done = 0
    for _ in range(epochs):
        for _batch in loader:
            done += 1
            if batches is not None and done >= batches:
                return loader.stats()
    return loader.stats()


def bench_table(target: Any, batches: int | None = None, epochs: int = 1, **loader_kwargs: Any) -> str:
    """:func:`bench`, printed as a table (what ``flows bench RECIPE`` shows)."""
    return bench(target, batches, epochs, **loader_kwargs).table()


__all__ = ["NodeStats", "QueueStats", "Report", "Stats", "TimedApply", "TimedStage", "bench",
           "bench_table", "timed"]
