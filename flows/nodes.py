"""The nodes flows adds to ``torchdata.nodes``; each follows its ``reset(initial_state)`` /
``get_state()`` / ``next()`` contract with plain-dict state.

- :class:`Apply` runs the per-sample stages on an Envelope (inside torchdata's ParallelMapper).
- :class:`Gather` regroups this rank's slice of each global batch, drops skipped samples
  (counting them in its state) and collates.
- :class:`Mix` interleaves several flows with seeded weights.
- :class:`ToDevice` moves batches to the training device and runs batched transforms there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torchdata.nodes import BaseNode, ParallelMapper

from flows.errors import FlowsError, StageError
from flows.sampling import Envelope, rng
from flows.stages import Filter, stage_name

OnError = Literal["raise", "skip"]


@dataclass
class Dropped:
    """Stands in for a sample a stage failed on (``error``) or a filter rejected (``None``)."""

    stage: str
    sample: str
    error: str | None = None


def describe(item: Any, key: str) -> str:
    """How errors name a sample: its path or URL when it has one, else its key (e.g. a table row)."""
    if isinstance(item, dict) and isinstance(item.get("path"), str):
        return item["path"]
    return key


class Apply:
    """Runs ``stages`` on an Envelope's item. Failures become :class:`Dropped` markers, which
    cross worker boundaries as data; :class:`Gather` raises or counts them in order."""

    def __init__(self, stages: Sequence[Callable], seed: int = 0):
        self.stages, self.seed = list(stages), seed

    def __call__(self, envelope: Envelope) -> Envelope:
        item = envelope.item
        sample = describe(item, envelope.key)
        for stage in self.stages:
            name = stage_name(stage)
            try:
                if isinstance(stage, Filter):
                    if not stage.predicate(item):
                        envelope.item = Dropped(name, sample)
                        return envelope
                elif getattr(stage, "random", False):
                    item = stage(item, rng(self.seed, envelope.epoch, envelope.key, name))
                else:
                    item = stage(item)
            except Exception as error:  # noqa: BLE001 - reported by Gather, with the sample named
                name = getattr(error, "flows_stage", name)  # a stage inside .cache() names itself
                envelope.item = Dropped(name, sample, f"{type(error).__name__}: {error}")
                return envelope
        envelope.item = item
        return envelope


class Workers(BaseNode):
    """torchdata's ParallelMapper (in order, threads or processes, inline for 0 workers) with a
    state that does not depend on the number of workers: ``{"source": <state after the last
    item yielded>}``. Its per-item snapshots mean a restore never re-maps consumed items."""

    def __init__(self, source: BaseNode, fn: Callable, num_workers: int = 0,
                 method: Literal["thread", "process"] = "thread", mp_context: str | None = None):
        super().__init__()
        self.num_workers = num_workers
        self.mapper = ParallelMapper(source, fn, num_workers, method=method,
                                     multiprocessing_context=mp_context, snapshot_frequency=1)

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        if initial_state is None:
            self.mapper.reset()
            return
        source = initial_state["source"]
        inner = {"snapshot": source, "steps_since_snapshot": 0} if self.num_workers else {"source": source}
        self.mapper.reset({ParallelMapper.IT_STATE_KEY: inner})

    def next(self) -> Any:
        return next(self.mapper)

    def get_state(self) -> dict:
        inner = self.mapper.state_dict()[ParallelMapper.IT_STATE_KEY]
        return {"source": inner["snapshot"] if self.num_workers else inner["source"]}


class Gather(BaseNode):
    """Regroups Envelopes into this rank's batches (or single items when ``batched`` is False).

    Failed samples raise :class:`StageError` (``on_error="raise"``) or are skipped and counted
    (``on_error="skip"``); filtered samples are counted. The counts are part of the state."""

    def __init__(self, source: BaseNode, collate: Callable | None = None, batched: bool = True,
                 on_error: OnError = "raise"):
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise FlowsError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.source, self.collate, self.batched, self.on_error = source, collate, batched, on_error
        self.skipped = 0
        self.filtered = 0

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        state = initial_state or {}
        self.source.reset(state.get("source"))
        self.skipped, self.filtered = state.get("skipped", 0), state.get("filtered", 0)

    def next(self) -> Any:
        items: list[Any] = []
        while True:
            envelope: Envelope = next(self.source)
            if isinstance(envelope.item, Dropped):
                self._drop(envelope.item)
            else:
                items.append(envelope.item)
            if items and (envelope.last or not self.batched):
                if not self.batched:
                    return items[0]
                return self.collate(items) if self.collate else items

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
    ``stop="all"`` restarts exhausted sources until each has finished once."""

    def __init__(self, sources: Sequence[BaseNode], weights: Sequence[float], seed: int = 0,
                 stop: Literal["first", "all"] = "first"):
        super().__init__()
        if len(sources) != len(weights) or not sources:
            raise FlowsError("Mix needs one weight per flow, and at least one flow")
        self.sources, self.seed, self.stop = list(sources), seed, stop
        self.weights = np.asarray(weights, dtype=float) / float(np.sum(weights))
        self.epoch, self._started = 0, False

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        if initial_state is not None:
            self.epoch, self.step = initial_state["epoch"], initial_state["step"]
            self.done = list(initial_state["done"])
            for source, state in zip(self.sources, initial_state["sources"], strict=True):
                source.reset(state)
        else:
            self.epoch += 1 if self._started else 0
            self.step, self.done = 0, [False] * len(self.sources)
            for source in self.sources:
                source.reset()
        self._started = True

    def next(self) -> Any:
        while True:
            pick = int(rng(self.seed, self.epoch, self.step).choice(len(self.sources), p=self.weights))
            self.step += 1
            try:
                return next(self.sources[pick])
            except StopIteration:
                self.done[pick] = True
                if self.stop == "first" or all(self.done):
                    raise
                self.sources[pick].reset()

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "done": list(self.done),
                "sources": [s.state_dict() for s in self.sources]}


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
