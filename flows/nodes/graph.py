"""Walking a built graph of nodes (each holds its input as ``source``, or ``sources`` for a Mix):
find a node by type, find the node that numbers the epochs, and stop every node below a root.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

from torchdata.nodes import BaseNode

T = TypeVar("T")


def epoch_owner(node: Any) -> Any:
    """The node at or under ``node`` that numbers the epochs (a Sampler or a Mix): its
    ``seek(epoch)`` makes the next ``reset()`` start ``epoch``, its ``planned(epoch)`` counts
    that epoch's outputs."""
    while not hasattr(node, "seek"):
        node = getattr(node, "source", None)
        if not isinstance(node, BaseNode):
            raise TypeError("this graph has no Sampler or Mix that numbers its epochs")
    return node


def walk(node: Any) -> Iterator[BaseNode]:
    """``node`` and every node below it, parents first."""
    if isinstance(node, BaseNode):
        yield node
        for name in ("source", "sources"):
            child = getattr(node, name, None)
            for c in child if isinstance(child, list) else [child]:
                yield from walk(c)


def find(node: Any, kind: type[T]) -> T | None:
    """The first node of type ``kind`` at or below ``node``."""
    return next((n for n in walk(node) if isinstance(n, kind)), None)


def close_graph(node: Any) -> None:
    """Stop the graph below ``node``: cancel the work read ahead, then call ``_shutdown()`` on
    every node and torchdata iterator."""
    _visit(node, set(), "_cancel")
    _visit(node, set(), "_shutdown")


def _visit(node: Any, seen: set[int], method: str) -> None:
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
            _visit(c, seen, method)
