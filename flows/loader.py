"""The Loader: iterate a built flow epoch by epoch, save and restore its exact position."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from torchdata.nodes import BaseNode
from torchdata.nodes import Loader as _NodesLoader

from flows.errors import FlowsError
from flows.nodes.graph import close_graph, epoch_owner, find, walk
from flows.nodes.sampler import Sampler
from flows.nodes.workers import Workers

if TYPE_CHECKING:
    from flows.sources.base import Source
    from flows.stats import Report, Stats

T = TypeVar("T")


class Loader:
    """An iterable over a flow's batches; each ``iter()`` is one epoch.

    ``state_dict()`` taken between batches, loaded into a freshly built loader (any number or
    kind of workers) with ``load_state_dict()``, continues with exactly the next batch.
    """

    def __init__(self, root: BaseNode, wrappers: int = 0, stats: Stats | None = None):
        self.root = root
        self.samplers = [node for node in walk(root) if isinstance(node, Sampler)]  # a mix's in order
        self.wrappers = wrappers  # nodes above the flow (prefetch, device), each {"source": ...}
        self._loader = _NodesLoader(root)
        self._stats = stats
        self._pending: dict[str, Any] | None = None  # loaded, applied by the next iter()
        self._batches = 0
        self._ended = False  # the last epoch iterated has ended: len() is the next one's
        if stats is not None:
            stats.instrument(root)

    def __iter__(self) -> Iterator[Any]:
        # the epoch starts at the first next(): an iter() never advanced takes no epoch
        # (Lightning calls one to check that what it is given is iterable)
        yield from (self._epoch() if self._stats is None else self._stats.watch(self._epoch))

    def _epoch(self) -> Iterator[Any]:
        it = iter(self._loader)
        restored, self._pending = self._pending, None
        if it._cached_item is None:
            # torchdata, restarting a loader restored at an epoch's end, keeps reporting that
            # end as its state for the whole next epoch: drop the stale state
            it._cached_state_dict = None
            self._batches = 0
        else:  # restored mid-epoch: torchdata looked ahead one batch
            self._batches = restored["batches"] if restored else 0
        self._ended = False
        return self._count(it)

    def _count(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            self._batches += 1
            yield batch
        self._ended = True

    def stats(self, reset: bool = False) -> Report:
        """Per-node timings, queue depths and the bottleneck so far (a loader built with
        ``stats=True``); ``reset=True`` starts counting afresh, e.g. for each epoch."""
        if self._stats is None:
            raise FlowsError("this loader keeps no stats: build it with flow.loader(stats=True)")
        report = self._stats.report()
        if reset:
            self._stats.clear()
        return report

    def __len__(self) -> int:
        """Batches planned for the epoch in progress on this rank (between epochs: the next one).
        The exact count unless samples are dropped (``on_error="skip"``, ``filter`` stages), then
        an upper bound, as a batch whose every sample is dropped does not come; after an epoch,
        :attr:`batches` is its exact count."""
        top = epoch_owner(self.root)
        return top.planned(top.epoch + self._ended)

    @property
    def batches(self) -> int:
        """Batches delivered so far in this epoch; once the epoch has ended, its exact count."""
        return self._batches

    @property
    def epoch(self) -> int:
        return self.samplers[0].epoch

    def state_dict(self) -> dict[str, Any]:
        """The flow's position after the last batch delivered. It does not depend on workers,
        prefetching, pinning or device placement, so any build of the same flow can load it.
        A state loaded and not yet iterated is returned as it is."""
        if self._pending is not None:
            return self._pending
        state = self._loader.state_dict()["root"]
        for _ in range(self.wrappers):
            state = state["source"]
        return {"flow": state, "batches": self._batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` at the next ``iter()``, whatever was iterated or saved before."""
        if "flow" not in state or "workers" in state:
            raise FlowsError(_foreign(state))
        inner = state["flow"]
        for _ in range(self.wrappers):
            inner = {"source": inner}
        self._loader.load_state_dict({"root": inner, "num_yielded": 0})
        # a state_dict() on a fresh loader made an iterator that torchdata's next iter() would
        # hand out as it is, ignoring the state loaded here
        self._loader._iter_for_state_dict = False
        self._pending = {"batches": 0, **state}

    # ---- what trainers read from a DataLoader (Lightning, accelerate, torchtitan) -----------------
    @property
    def batch_size(self) -> int | None:
        """Samples per batch on this rank; None when batches vary (``bucket``) or the flow is
        unbatched (it yields samples, like a DataLoader with ``batch_size=None``)."""
        workers = find(self.root, Workers)
        size = getattr(self.samplers[0].plan, "size", None)
        if workers is None or not workers.batched or size is None:
            return None
        return size // self.samplers[0].world_size

    @property
    def num_workers(self) -> int:
        """Workers running the per-sample stages (threads or processes)."""
        workers = find(self.root, Workers)
        return workers.num_workers if workers is not None else 0

    @property
    def dataset(self) -> Source:
        """The records this loader reads (the first flow's, for a mix): ``len()`` and indexing."""
        return self.samplers[0].source

    def close(self) -> None:
        """Stop the background threads and worker processes now (also done by ``with loader:``).
        A process must not exit with them running: native threads abort at interpreter exit.
        Work read ahead is cancelled first, so nothing waits for it."""
        close_graph(self._loader)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def skipped(self) -> int:
        """Samples skipped on error (``on_error="skip"``) in all epochs so far: as of the last
        batch delivered, and, once an epoch has ended, every sample of it (after its last batch too)."""
        return _count(self.state_dict(), "skipped")

    @property
    def filtered(self) -> int:
        """Samples removed by ``filter`` stages in all epochs so far (counted as :attr:`skipped`)."""
        return _count(self.state_dict(), "filtered")


def _foreign(state: dict[str, Any]) -> str:
    """Why ``state`` is not a flows.Loader state."""
    kind = ("a FlowDataset state (one DataLoader worker's)" if "workers" in state
            else "a torchdata StatefulDataLoader state" if any(str(k).startswith("_") for k in state)
            else f"a dict with keys {sorted(map(str, state))[:5]}")
    return (f"flows.Loader.load_state_dict got {kind}, not a flows.Loader state: a StatefulDataLoader "
            "over flow.dataset() loads its own states (with the num_workers it saved with)")


def _count(state: Any, field: str) -> int:
    """Sum ``field`` over every Gather state nested in a loader state."""
    if isinstance(state, dict):
        here = state[field] if field in state and "source" in state else 0
        return here + sum(_count(v, field) for k, v in state.items() if k != field)
    if isinstance(state, list):
        return sum(_count(v, field) for v in state)
    return 0
