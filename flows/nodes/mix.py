"""Mix: interleaves several flows with seeded weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from torchdata.nodes import BaseNode

from flows.errors import FlowsError
from flows.nodes.graph import epoch_owner
from flows.sampling.order import rng


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
