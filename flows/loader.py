"""The Loader: iterate a built flow epoch by epoch, save and restore its exact position."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torchdata.nodes import BaseNode
from torchdata.nodes import Loader as _NodesLoader

from flows.errors import FlowsError
from flows.sampling import Sampler

if TYPE_CHECKING:
    from flows.stats import Report, Stats


class Loader:
    """An iterable over a flow's batches; each ``iter()`` is one epoch.

    ``state_dict()`` taken between batches, loaded into a freshly built loader (any number or
    kind of workers) with ``load_state_dict()``, continues with exactly the next batch.
    """

    def __init__(self, root: BaseNode, samplers: list[Sampler], wrappers: list[str] | None = None,
                 stats: Stats | None = None):
        self.root = root
        self.samplers = samplers
        self.wrappers = wrappers or []  # state key of each node above the flow, outermost first
        self._loader = _NodesLoader(root)
        self._stats = stats
        if stats is not None:
            stats.attach(root)

    def __iter__(self) -> Iterator[Any]:
        return self._epoch() if self._stats is None else self._stats.watch(self._epoch)

    def _epoch(self) -> Iterator[Any]:
        it = iter(self._loader)
        if it._cached_item is None:
            # torchdata, restarting a loader restored at an epoch's end, keeps reporting that
            # end as its state for the whole next epoch: drop the stale state
            it._cached_state_dict = None
        return it

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
        """Batches per epoch on this rank (the first flow's, for a mix)."""
        return len(self.samplers[0])

    @property
    def epoch(self) -> int:
        return self.samplers[0].epoch

    def state_dict(self) -> dict[str, Any]:
        """The flow's position after the last batch delivered. It does not depend on workers,
        prefetching, pinning or device placement, so any build of the same flow can load it."""
        state = self._loader.state_dict()["root"]
        for key in self.wrappers:  # prefetch/pin snapshot per item, so no step is pending
            state = state[key]
        return {"flow": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        inner = state["flow"]
        for key in reversed(self.wrappers):
            inner = {key: inner, "steps_since_snapshot": 0} if key == "snapshot" else {key: inner}
        self._loader.load_state_dict({"root": inner, "num_yielded": 0})

    def close(self) -> None:
        """Stop the background threads and worker processes now (also done by ``with loader:``).
        A process must not exit with them running: native threads abort at interpreter exit.
        Work read ahead is cancelled first, so nothing waits for it."""
        _shutdown(self._loader, set(), "_cancel")
        _shutdown(self._loader, set())

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def skipped(self) -> int:
        """Samples skipped on error (``on_error="skip"``) so far, as of the last batch delivered."""
        return _count(self.state_dict(), "skipped")

    @property
    def filtered(self) -> int:
        """Samples removed by ``filter`` stages so far, as of the last batch delivered."""
        return _count(self.state_dict(), "filtered")


def _count(state: Any, field: str) -> int:
    """Sum ``field`` over every Gather state nested in a loader state."""
    if isinstance(state, dict):
        here = state[field] if field in state and "source" in state else 0
        return here + sum(_count(v, field) for k, v in state.items() if k != field)
    if isinstance(state, list):
        return sum(_count(v, field) for v in state)
    return 0


def _shutdown(node: Any, seen: set[int], method: str = "_shutdown") -> None:
    """Call ``method()`` on every node and torchdata iterator in the graph below ``node``."""
    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    stop = getattr(node, method, None)
    if callable(stop):
        stop()
    for name in ("_it", "root", "source", "sources"):
        child = getattr(node, name, None)
        for c in child if isinstance(child, list) else [child]:
            _shutdown(c, seen, method)
