"""Gather: hands on the outputs of :class:`~flows.nodes.workers.Workers` in order, raising or
counting the samples a task dropped.
"""

from __future__ import annotations

from typing import Any

from torchdata.nodes import BaseNode

from flows.errors import FlowsError, StageError
from flows.execution.apply import Done, Dropped, OnError


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
