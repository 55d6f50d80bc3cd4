"""A flow as a ``torch.utils.data.IterableDataset``: for torch's ``DataLoader`` and torchdata's
``StatefulDataLoader`` (what Lightning, accelerate and torchtitan drive).

    dataset = flow.batch(32).dataset()
    loader = StatefulDataLoader(dataset, batch_size=None, num_workers=4)

Sharding happens after ordering: rank ``r`` of ``W`` takes its slice of every global batch (as
in :mod:`flows.sampling`), and DataLoader worker ``k`` of ``K`` takes every ``K``-th of the
rank's batches. The DataLoader hands out its workers' outputs in turn, so with flows batching
(``.batch(n)`` and ``batch_size=None``) the batches are exactly ``flow.loader()``'s, whatever
``num_workers``. With DataLoader batching (an unbatched flow and ``batch_size=n``) each worker
batches its own samples: every sample still comes once per epoch, but which samples share a
batch depends on ``num_workers``, and each worker's last batch may be short. For a mix
(``Flow.mix``) each worker mixes its share of every flow's batches, so the interleaving depends
on ``num_workers``.

The epoch advances by itself, with persistent workers or not: the epoch each worker starts next
is kept in memory shared by every copy of the dataset (the DataLoader's workers get copies), and
a worker that reaches its end advances it. ``set_epoch(e)`` sets it, as
``DistributedSampler.set_epoch`` does; ``load_state_dict`` restores it.

``state_dict()`` is the position after the last output of the current iteration; a
StatefulDataLoader stores one per worker and restores them with the same ``num_workers``. To
resume on another number of workers, use :class:`flows.Loader` (``flow.loader()``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from flows.errors import EmptySourceError, FlowsError
from flows.nodes.graph import epoch_owner
from flows.sampling.order import EpochOrder
from flows.sampling.plans import Batches, Plan, as_batches

MAX_WORKERS = 1024

if TYPE_CHECKING:
    from flows.loader import Loader
    from flows.sources.base import Source


@dataclass(frozen=True)
class Strided(Plan):
    """Every ``count``-th global batch of ``plan``, from batch ``index`` on: DataLoader worker
    ``index`` of ``count``."""

    plan: Plan
    index: int
    count: int

    def __call__(self, order: EpochOrder, source: Source, seed: int, epoch: int) -> Batches:
        return _Every(as_batches(self.plan(order, source, seed, epoch)), self.index, self.count)


class _Every(Batches):
    """Every ``count``-th of ``batches`` from ``index`` on, looked up when asked."""

    def __init__(self, batches: Batches, index: int, count: int):
        self.batches, self.index, self.count = batches, index, count

    def __len__(self) -> int:
        return len(range(self.index, len(self.batches), self.count))

    def __getitem__(self, b: int) -> np.ndarray:
        if not 0 <= b < len(self):
            raise IndexError(b)
        return self.batches[self.index + b * self.count]

    def at_least(self, size: int) -> _Every:
        return _Every(self.batches.at_least(size), self.index, self.count)


@dataclass
class _Run:
    """One iteration (an epoch, or the rest of one) in this process."""

    loader: Loader
    epoch: int
    done: bool = False
    empty: bool = False  # this worker has no batch this epoch (fewer batches than workers)


class FlowDataset(IterableDataset):
    """A flow's outputs (batches, or samples for an unbatched flow) for this rank, epoch by
    epoch, sharded over the DataLoader's workers; a torchdata ``Stateful`` (see the module
    docstring). Build it with :meth:`flows.Flow.dataset`."""

    def __init__(self, build: Callable[[], Loader]):
        # ``build()``: a loader of this rank's flow without prefetch (a picklable callable:
        # spawned workers get it pickled); the DataLoader pins (pin_memory=True)
        self.build = build
        self._lengths: dict[int, int] = {}  # outputs per epoch, as len() counted them
        # the epoch each DataLoader worker slot starts next, in memory every copy shares
        self._next_epochs = torch.zeros(MAX_WORKERS, dtype=torch.int64).share_memory_()
        self._run: _Run | None = None
        self._pending: dict[str, Any] | None = None

    # ---- epochs --------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration starts (as ``DistributedSampler.set_epoch``); call it
        before iterating, in the main process, with or without workers."""
        self._next_epochs[:] = epoch

    @property
    def epoch(self) -> int:
        """The epoch of the iteration under way in this process, else of the next one."""
        return self._run.epoch if self._run is not None and not self._run.done else self._next_epoch()

    def _next_epoch(self) -> int:
        return int(self._next_epochs[_worker()[0]])

    def _set_next_epoch(self, epoch: int) -> None:
        """Worker ``k`` of ``K`` writes slots ``k, k + K, ...``: so no worker of an iteration
        changes the slot of another, however late that one starts, and together they set every
        slot, for any number of workers next time."""
        worker, workers = _worker()
        self._next_epochs[worker::workers] = epoch

    def __len__(self) -> int:
        """Outputs per epoch on this rank, over all DataLoader workers."""
        epoch = self.epoch
        if epoch not in self._lengths:  # the plan is a function of the epoch: counted once
            loader = self._build(0, 1)
            try:
                self._lengths[epoch] = epoch_owner(loader.root).planned(epoch)
            finally:
                loader.close()
        return self._lengths[epoch]

    # ---- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> FlowDataset:
        pending, self._pending = self._pending, None
        self._start(pending)
        return self

    def __next__(self) -> Any:
        run = self._run
        if run is None:
            raise TypeError("call iter() on a FlowDataset before next()")
        if run.done or run.empty:
            self._finish(run)
            raise StopIteration
        try:
            return next(run.loader.root)
        except StopIteration:
            self._finish(run)
            raise

    def _finish(self, run: _Run) -> None:
        if not run.done:
            run.done = True
            self._set_next_epoch(run.epoch + 1)
        run.loader.close()

    def _start(self, state: dict[str, Any] | None) -> None:
        if self._run is not None:
            self._run.loader.close()
        worker, workers = _worker()
        if state is not None:
            self._check(state, worker, workers)
            epoch = state["epoch"]
        else:
            epoch = self._next_epoch()
        loader = self._build(worker, workers)
        self._run = run = _Run(loader, epoch, done=bool(state and state["done"]))
        self._set_next_epoch(epoch + run.done)
        if state is not None and state["flow"] is None:  # the start of an epoch, or an empty shard
            run.empty = run.done
            state = None
        if state is None:
            epoch_owner(loader.root).seek(epoch)
        try:
            loader.root.reset(state["flow"] if state is not None else None)
        except EmptySourceError:
            if worker == 0:  # worker 0 has the rank's first batch, if there is one
                raise
            run.empty = True

    def _build(self, worker: int, workers: int) -> Loader:
        loader = self.build()
        assert not loader.wrappers, "no prefetch, pinning or device: the root is the flow itself"
        if workers > 1:
            for sampler in loader.samplers:
                sampler.plan = Strided(sampler.plan, worker, workers)
        return loader

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position after the last output of this process's iteration (or the pending restore,
        or the start of the next epoch)."""
        if self._pending is not None:
            return self._pending
        worker, workers = _worker()
        run = self._run
        if run is None:
            return {"epoch": self._next_epoch(), "flow": None, "done": False,
                    "worker": worker, "workers": workers}
        return {"epoch": run.epoch, "flow": None if run.empty else run.loader.root.state_dict(),
                "done": run.done, "worker": worker, "workers": workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: at once if an iteration is under way in this process (a
        StatefulDataLoader restores right after ``iter()``), else at the next ``iter()``."""
        self._check(state, *_worker())
        if self._run is None:
            self._pending = state
            self._set_next_epoch(state["epoch"] + state["done"])
        else:
            self._start(state)

    @staticmethod
    def _check(state: dict[str, Any], worker: int, workers: int) -> None:
        if "workers" not in state:
            kind = "flows.Loader" if "flow" in state else "StatefulDataLoader"
            raise FlowsError(f"this is a {kind} state, not a FlowDataset's: load it into the {kind} "
                             "that saved it (a StatefulDataLoader restores its dataset itself)")
        if (state["worker"], state["workers"]) != (worker, workers):
            raise FlowsError(
                f"this state was saved by DataLoader worker {state['worker']} of {state['workers']}, "
                f"not {worker} of {workers}: a StatefulDataLoader resumes only with the num_workers "
                f"it saved with; to resume on any number of workers, use flows.Loader (flow.loader())")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_run"] = None  # threads and pools stay in the process that started them
        return state


def _worker() -> tuple[int, int]:
    """(DataLoader worker id, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    if info is None:
        return 0, 1
    if info.num_workers > MAX_WORKERS:
        raise FlowsError(f"a FlowDataset serves at most {MAX_WORKERS} DataLoader workers, "
                         f"not {info.num_workers}")
    return info.id, info.num_workers
