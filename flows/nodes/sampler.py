"""The Sampler: the root node of every flow. It yields this rank's samples of each epoch in plan
order (:mod:`flows.sampling`), as Envelopes: the record plus where it sits in the epoch.

The Sampler's state is (epoch, global batch, slot): restoring recomputes the plan (no sample is
read) and jumps there, so restore time does not grow with the position; and because the cursor
counts global batches, a state saved on W ranks resumes on W' ranks with the same global batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torchdata.nodes import BaseNode

from flows.errors import EmptySourceError, FlowsError
from flows.sampling.order import Order
from flows.sampling.plans import Batches, FixedBatches, Plan, Segments, as_batches
from flows.sources.base import Source


@dataclass
class Envelope:
    """One sample on its way through a flow: the record plus where it sits in the epoch."""

    item: Any
    key: str
    epoch: int
    batch: int  # global batch index in the epoch
    slot: int  # position in this rank's slice of that batch
    size: int  # length of this rank's slice

    @property
    def last(self) -> bool:
        return self.slot == self.size - 1


class Sampler(BaseNode[Envelope]):
    """Root node: yields this rank's samples of each epoch in plan order, as Envelopes.

    Each ``reset()`` without a state after the first starts the next epoch.
    """

    def __init__(
        self,
        source: Source,
        order: Order = Order(),
        plan: Plan | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise FlowsError(f"rank {rank} is not in a world of size {world_size}")
        self.source, self.order, self.rank, self.world_size = source, order, rank, world_size
        self.plan = plan or FixedBatches(world_size)
        self.epoch = 0
        self._started = False
        self._batches: Batches = Segments.of([])
        self._planned_epoch = -1
        self._ahead: tuple[int, Batches] | None = None  # a plan counted ahead (planned()), kept for _plan
        self._mine: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))  # this rank's current slice

    def _plan(self, epoch: int) -> Batches:
        if self._planned_epoch != epoch:
            ahead, self._ahead = self._ahead, None
            self._batches = ahead[1] if ahead is not None and ahead[0] == epoch else self._planned(epoch)
            self._planned_epoch = epoch
            self._mine = (-1, np.zeros(0, np.int64))
            if not len(self._batches):
                raise EmptySourceError(
                    f"the {self.source.name} source has {len(self.source)} samples: too few for "
                    f"one batch on each of {self.world_size} ranks"
                )
        return self._batches

    def __len__(self) -> int:
        """Batches per epoch for each rank."""
        return len(self._plan(self.epoch))

    def planned(self, epoch: int) -> int:
        """Batches of ``epoch`` for each rank (a plan made for it here is kept for the epoch)."""
        if epoch == self._planned_epoch:
            return len(self._batches)
        if self._ahead is None or self._ahead[0] != epoch:
            self._ahead = (epoch, self._planned(epoch))
        return len(self._ahead[1])

    def _planned(self, epoch: int) -> Batches:
        batches = as_batches(self.plan(self.order(self.source, epoch), self.source, self.order.seed or 0,
                                       epoch))
        # every rank gets one slice of every global batch: drop the ones too small to share
        return batches.at_least(self.world_size)

    def seek(self, epoch: int) -> None:
        """Make the next ``reset()`` without a state start ``epoch`` (a Mix restarting its flows)."""
        self.epoch, self._started = epoch - 1, True

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        if initial_state is not None:
            self.epoch = initial_state["epoch"]
            self._batch, self._slot = initial_state["batch"], initial_state["slot"]
            if self._slot and initial_state["world_size"] != self.world_size:
                raise FlowsError(
                    f"cannot resume mid-batch on {self.world_size} ranks a state saved on "
                    f"{initial_state['world_size']}: save loader state between batches"
                )
        else:
            if self._started:
                self.epoch += 1
            self._batch, self._slot = 0, 0
        self._started = True
        self._plan(self.epoch)

    def next(self) -> Envelope:
        batches = self._plan(self.epoch)
        if self._batch >= len(batches):
            raise StopIteration
        if self._mine[0] != self._batch:
            self._mine = (self._batch, batches[self._batch][self.rank :: self.world_size])
        mine = self._mine[1]
        index = int(mine[self._slot])
        envelope = Envelope(
            item=self.source[index],
            key=self.source.key(index),
            epoch=self.epoch,
            batch=self._batch,
            slot=self._slot,
            size=len(mine),
        )
        self._slot += 1
        if self._slot == len(mine):
            self._batch, self._slot = self._batch + 1, 0
        return envelope

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "batch": self._batch, "slot": self._slot,
                "world_size": self.world_size}
