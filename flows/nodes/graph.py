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
    return _below(node, ("source", "sources"), BaseNode)


def find(node: Any, kind: type[T]) -> T | None:
    """The first node of type ``kind`` at or below ``node``."""
    return next((n for n in walk(node) if isinstance(n, kind)), None)


def close_graph(node: Any) -> None:
    """Stop the graph below ``node`` (a node, a Loader or torchdata's): cancel the work read
    ahead, then call ``_shutdown()`` on every node and torchdata iterator."""
    for method in ("_cancel", "_shutdown"):
        for reached in _below(node, ("_it", "root", "source", "sources"), object):
            stop = getattr(reached, method, None)
            if callable(stop):
                stop()


def _below(node: Any, names: tuple[str, ...], kind: type[T]) -> Iterator[T]:
    """``node`` and every object of type ``kind`` reached from it through the attributes
    ``names`` (a list: each of its items) of objects of that type, each once, parents first."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current is None or not isinstance(current, kind) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        children: list[Any] = []
        for name in names:
            child = getattr(current, name, None)
            children.extend(child if isinstance(child, list) else [child])
        stack.extend(reversed(children))
