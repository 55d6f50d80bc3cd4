"""Save/restore conformance checks, for flows' own nodes and for yours.

``check_resume(build)`` runs a freshly built loader (or node) uninterrupted, then for each
restore point saves its state after that many outputs, builds a *fresh* one (possibly with other
settings, via ``rebuild``), loads the state and checks that the rest is identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

import torch
from torchdata.nodes import BaseNode
from torchdata.nodes import Loader as _NodesLoader

from flows.loader import Loader

Buildable: TypeAlias = "Loader | BaseNode"


def _loader(obj: Buildable) -> Any:
    return _NodesLoader(obj) if isinstance(obj, BaseNode) else obj


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
    """Check exact resume of ``build()`` at each of ``points`` (outputs consumed before saving;
    by default the start, one output, mid-epoch, an epoch end and into the next epoch).

    Returns the uninterrupted outputs."""
    reference = run_epochs(_loader(build()), epochs)
    per_epoch = len(reference) // epochs
    if points is None:
        points = sorted({0, 1, per_epoch // 2, per_epoch, per_epoch + 1} - {len(reference)})
    for point in points:
        first = _loader(build())
        seen: list[Any] = []
        state = first.state_dict()
        for _ in range(epochs):
            for out in first:
                if len(seen) == point:
                    break
                seen.append(out)
                state = first.state_dict()
            if len(seen) == point:
                break
        resumed = _loader((rebuild or build)())
        resumed.load_state_dict(state)
        rest = _consume(resumed, len(reference) - point)
        assert_same(seen + rest, reference, f"restore after {point} outputs")
    return reference


def _consume(loader: Any, count: int) -> list[Any]:
    out: list[Any] = []
    while len(out) < count:
        before = len(out)
        for item in loader:
            out.append(item)
            if len(out) == count:
                break
        if len(out) == before:
            break
    return out
