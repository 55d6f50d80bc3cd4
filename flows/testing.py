"""Save/restore conformance checks, for flows' own nodes and for yours.

``check_resume(build)`` runs a freshly built loader (or node) uninterrupted, then saves its state
at every point torchdata's own ``run_test_save_load_state`` does and more (mid-epoch, an epoch's
last item, after the ``for`` loop, before anything, after a double reset, ...), loads each into a
*fresh* one (possibly with other settings, via ``rebuild``) and checks that the rest is identical;
it also checks torchdata's node contract on the graph's root.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeAlias

import torch
from torchdata.nodes import BaseNode

from flows.loader import Loader

Buildable: TypeAlias = "Loader | BaseNode"


def _loader(obj: Buildable) -> Loader:
    """A node in flows' Loader (which, unlike torchdata's, keeps a state loaded after a
    ``state_dict()`` on a fresh loader)."""
    return Loader(obj) if isinstance(obj, BaseNode) else obj


def run_epochs(loader: Any, epochs: int) -> list[Any]:
    """All outputs of ``epochs`` epochs, in order."""
    return [out for _ in range(epochs) for out in loader]


def assert_same(a: Any, b: Any, where: str = "output") -> None:
    """Deep equality with ``torch.equal`` on tensors (dtype included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def check_resume(build: Callable[[], Buildable], points: Iterable[int] | None = None,
                 epochs: int = 2, rebuild: Callable[[], Buildable] | None = None) -> list[Any]:
    """Check exact resume of ``build()`` wherever a state can be saved, as torchdata's own
    ``run_test_save_load_state`` does and more. Each state is loaded into a fresh ``rebuild()``
    (default ``build``; e.g. other workers), and the outputs after it must be the rest of an
    uninterrupted run of ``epochs`` epochs:

    - after each of ``points`` outputs (by default one, mid-epoch, the last of the first epoch
      before its StopIteration, the first and the middle of the next), also loaded into a loader
      whose ``state_dict()`` was asked first (as StatefulDataLoader's workers do);
    - before anything (a fresh loader's state), and after ``iter()`` before the first ``next()``;
    - after the ``for`` loop of an epoch (the next full epoch comes);
    - after a partial epoch (the next epoch is the same) or a double ``iter()`` (an epoch starts
      at its first ``next()``, so both begin the same epoch);
    - into the loader that saved them, in turn, as torchdata's helper does;
    - and torchdata's node contract on the graph's root: ``state_dict()`` on a fresh node,
      StopIteration every time after the end, ``reset(state)`` to the start, the middle and the
      end of an epoch (the end gives StopIteration; the next ``reset()`` the next epoch).

    The last three apply to flows' loaders and nodes; another loader (a StatefulDataLoader over
    ``flow.dataset()``) is checked at the points before them, its epoch ends being its own.
    Returns the uninterrupted outputs."""
    rebuild = rebuild or build
    per_epoch = _epochs(build, epochs)
    reference = [out for epoch in per_epoch for out in epoch]
    first = len(per_epoch[0])
    if points is None:
        later = [first + 1, first + len(per_epoch[1]) // 2] if epochs > 1 else []
        points = sorted({1, first // 2, first, *later} - {0} & set(range(len(reference))))

    def resumed(state: dict, where: str, ask_first: bool = False, start: int = 0) -> None:
        with _closing(rebuild()) as loader:
            if ask_first:
                loader.state_dict()
            loader.load_state_dict(state)
            assert_same(_consume(loader, len(reference) - start), reference[start:], where)

    for point in points:
        with _closing(build()) as loader:
            state = _state_after(loader, point)
        resumed(state, f"restore after {point} outputs", start=point)
        resumed(state, f"restore after {point} outputs, state_dict() asked first", True, point)
    with _closing(build()) as loader:
        native = isinstance(loader, Loader)
        resumed(loader.state_dict(), "restore of a fresh loader's state")
        it = iter(loader)
        resumed(loader.state_dict(), "restore before the first next()")
        assert_same(_consume(loader, len(reference), it), reference, "a fresh loader")
    if not native:  # another loader (a StatefulDataLoader): the points above; its own epoch rules
        return reference
    _check_reused(build, reference, first)
    if epochs > 1:
        _check_epoch_boundaries(build, resumed, reference, first)
    with _closing(build()) as loader:
        _check_node(loader.root, per_epoch)
    return reference


def _epochs(build: Callable[[], Buildable], epochs: int) -> list[list[Any]]:
    with _closing(build()) as loader:
        per_epoch = [list(loader) for _ in range(epochs)]
    assert all(per_epoch), "every epoch must have outputs"
    return per_epoch


def _state_after(loader: Any, point: int) -> dict:
    """The state saved after ``point`` outputs, inside the for loop."""
    seen = 0
    state = loader.state_dict()
    while seen < point:
        for _ in loader:
            seen += 1
            state = loader.state_dict()
            if seen == point:
                break
    return state


def _check_reused(build: Callable[[], Buildable], reference: list[Any], first: int) -> None:
    """torchdata's helper: states loaded, in turn, into the loader that saved them."""
    middle = first // 2 or 1
    with _closing(build()) as loader:
        initial = loader.state_dict()
        state = _state_after(loader, middle)
        for _ in range(2):  # the loader goes on elsewhere before loading
            for _ in loader:
                pass
        loader.load_state_dict(state)
        rest = _consume(loader, len(reference) - middle)
        assert_same(rest, reference[middle:], "a reused loader restored mid-epoch")
        loader.load_state_dict(initial)
        assert_same(_consume(loader, len(reference)), reference, "a reused loader restored to the start")


def _check_epoch_boundaries(build: Callable[[], Buildable], resumed: Callable[..., None],
                            reference: list[Any], first: int) -> None:
    rest = reference[first:]
    with _closing(build()) as loader:
        for _ in loader:
            pass
        resumed(loader.state_dict(), "restore after the for loop of an epoch", start=first)
    with _closing(build()) as loader:
        next(iter(loader))
        assert_same(_consume(loader, len(rest)), rest, "the epoch after a partial epoch")
    with _closing(build()) as loader:
        iter(loader)
        it = iter(loader)  # an epoch starts at its first next(): both iter()s begin the first
        resumed(loader.state_dict(), "restore after a double reset")
        assert_same(_consume(loader, len(reference), it), reference, "the epochs after a double reset")


def _check_node(node: BaseNode, per_epoch: list[list[Any]]) -> None:
    """torchdata's BaseNode contract, on the root of the graph."""
    initial = node.state_dict()  # before any reset() or next(): the node resets itself
    assert_same(_drain(node), per_epoch[0], "node: the first epoch")
    for _ in range(3):
        _assert_stops(node, "node: next() after the end")
    end = node.state_dict()
    node.reset(end)
    _assert_stops(node, "node: reset() to the end state")
    middle = len(per_epoch[0]) // 2
    node.reset(initial)
    head = [next(node) for _ in range(middle)]
    state = node.state_dict()
    node.reset(state)
    assert_same(head + _drain(node), per_epoch[0], "node: reset() to a mid-epoch state")
    if len(per_epoch) > 1:
        node.reset(end)
        node.reset()
        assert_same(_drain(node), per_epoch[1], "node: reset() after the end state")


def _drain(node: BaseNode) -> list[Any]:
    out = []
    while True:
        try:
            out.append(next(node))
        except StopIteration:
            return out


def _assert_stops(node: BaseNode, where: str) -> None:
    try:
        out = next(node)
    except StopIteration:
        return
    raise AssertionError(f"{where}: {type(out).__name__} instead of StopIteration")


@contextlib.contextmanager
def _closing(obj: Buildable) -> Iterator[Any]:
    """``obj`` as a loader, closed (threads and worker processes stopped) on the way out."""
    loader = _loader(obj)
    try:
        yield loader
    finally:
        if hasattr(loader, "close"):
            loader.close()


def _consume(loader: Any, count: int, it: Iterator[Any] | None = None) -> list[Any]:
    """``count`` outputs, over as many epochs as it takes (from ``it`` first, when given)."""
    out: list[Any] = []
    while len(out) < count:
        before = len(out)
        for item in it if it is not None else loader:
            out.append(item)
            if len(out) == count:
                break
        it = None
        if len(out) == before:
            break
    return out
