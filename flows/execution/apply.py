"""A task's work: the per-sample stages on each of its Envelopes, skip and filter, and the
collation of a batch (:class:`Apply`), and what a task hands back (:class:`Done`, with the
samples it :class:`Dropped`). Tasks run in a pool (:mod:`flows.execution.pools`); their
failures travel back as data and are raised or counted, in order, by
:class:`~flows.nodes.gather.Gather`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from flows.nodes.sampler import Envelope
from flows.sampling.order import rng
from flows.stages.base import Filter, stage_name

OnError = Literal["raise", "skip"]


# ``cancelled(i)``, called by a task before its ``i``-th sample: whether to abandon the task
Cancelled = Callable[[int], bool]


def never_cancelled(index: int) -> bool:
    """The :data:`Cancelled` of a task run inline: it always runs to its end."""
    return False


@dataclass
class Dropped:
    """Stands in for a sample a stage failed on (``error``) or a filter rejected (``None``)."""

    stage: str
    sample: str
    error: str | None = None


@dataclass
class Done:
    """One output of a task: ``out`` (a collated batch, or one sample of an unbatched chunk),
    valid when ``kept`` samples went into it (0: every sample was dropped); the samples
    ``dropped`` before it, in order; and the stage timings when stats are on."""

    out: Any
    kept: int
    dropped: list[Dropped] = field(default_factory=list)
    timings: Any = None

    @property
    def samples(self) -> int:
        return self.kept + len(self.dropped)


class TaskCancelled(Exception):
    """A task abandoned between two samples because its result is no longer wanted."""


def describe(item: Any, key: str) -> str:
    """How errors name a sample: its path or URL when it has one, else its key (e.g. a table row)."""
    if isinstance(item, dict) and isinstance(item.get("path"), str):
        return item["path"]
    return key


class Apply:
    """Runs one task: ``stages`` on each Envelope's item, then (``batched``) ``collate`` on the
    kept items. Failures and filtered samples become :class:`Dropped` markers, which cross
    worker boundaries as data; :class:`Gather` raises or counts them in order. With
    ``on_error="raise"`` the task stops at its first failure (nothing after it is delivered)."""

    def __init__(self, stages: Sequence[Callable], seed: int = 0, collate: Callable | None = None,
                 batched: bool = True, on_error: OnError = "raise"):
        self.stages, self.seed, self.collate = list(stages), seed, collate
        self.batched, self.on_error = batched, on_error

    def __call__(self, envelopes: Sequence[Envelope], cancelled: Cancelled = never_cancelled) -> list[Done]:
        """A batched task's one output, or one output per sample of an unbatched chunk (up to
        the first failure when raising)."""
        outs: list[Done] = []
        kept: list[Any] = []
        dropped: list[Dropped] = []
        failed = False
        for i, envelope in enumerate(envelopes):
            if cancelled(i):
                raise TaskCancelled
            item = self.sample(envelope)
            if isinstance(item, Dropped):
                dropped.append(item)
                failed = item.error is not None and self.on_error == "raise"
            elif self.batched:
                kept.append(item)
            if not self.batched:
                outs.append(Done(None, 0, [item]) if isinstance(item, Dropped) else Done(item, 1))
            if failed:
                break
        if not self.batched:
            return outs
        if not kept or failed:
            return [Done(None, 0, dropped)]
        return [Done(self.collate(kept) if self.collate else kept, len(kept), dropped)]

    def sample(self, envelope: Envelope) -> Any:
        """The stages on one sample: its item, or a :class:`Dropped` marker."""
        item = envelope.item
        for stage in self.stages:
            name = stage_name(stage)
            try:
                if isinstance(stage, Filter):
                    if not stage.predicate(item):
                        return Dropped(name, describe(envelope.item, envelope.key))
                elif getattr(stage, "random", False):
                    item = stage(item, rng(self.seed, envelope.epoch, envelope.key, name))
                else:
                    item = stage(item)
            except Exception as error:  # noqa: BLE001 - reported by Gather, with the sample named
                name = getattr(error, "flows_stage", name)  # a stage inside .cache() names itself
                return Dropped(name, describe(envelope.item, envelope.key),
                               f"{type(error).__name__}: {error}")
        return item
