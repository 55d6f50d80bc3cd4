"""Per-sample stages: small picklable callables that turn one record into the next.

A stage is any callable ``item -> item``. Stages with ``random = True`` are called as
``stage(item, generator)`` with a generator derived from (seed, epoch, sample key, stage name),
so their draws are the same after a resume and for any number of workers. This module holds
the base class and the generic stages (:class:`Map`, :class:`Filter`); the others live one
concern per module beside it (read, audio, tensor, cache, collate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Stage:
    """Base class of the built-in stages (a plain callable works as a stage too)."""

    name = "stage"
    random = False

    def __call__(self, item: Any) -> Any:
        raise NotImplementedError


def stage_name(stage: Callable) -> str:
    """The name a stage is reported under in errors and stats."""
    return getattr(stage, "name", None) or getattr(stage, "__name__", None) or type(stage).__name__


class Map(Stage):
    """Apply ``fn`` to the item, or to ``item[field]`` storing the result in ``item[to or field]``.

    Any callable works, a ``torchaudio`` transform or an ``nn.Module`` included."""

    def __init__(self, fn: Callable, field: str | None = None, to: str | None = None,
                 name: str | None = None):
        self.fn, self.field, self.to = fn, field, to
        self.name = name or stage_name(fn)

    def __call__(self, item: Any) -> Any:
        if self.field is None:
            return self.fn(item)
        out = dict(item)
        out[self.to or self.field] = self.fn(item[self.field])
        return out


class Filter(Stage):
    """Keep items for which ``predicate(item)`` is true; the others are counted as filtered."""

    def __init__(self, predicate: Callable[[Any], bool], name: str | None = None):
        self.predicate = predicate
        self.name = name or f"filter({stage_name(predicate)})"

    def __call__(self, item: Any) -> Any:
        return item
