"""Sharding across ranks: every sample exactly once per epoch, equal batch counts per rank."""

from __future__ import annotations

import pytest
import torch

from flows import Flow
from flows.testing import run_epochs


def records(n: int) -> list[dict]:
    return [{"key": f"s{i}", "x": torch.tensor([i]), "label": i % 4, "duration": 0.5 + (i % 7) / 2}
            for i in range(n)]


def batching(kind: str, flow: Flow) -> Flow:
    return {"fixed": lambda: flow.batch(3),
            "stratify": lambda: flow.stratify("label", 4),
            "bucket": lambda: flow.bucket(max_seconds=6.0)}[kind]()


@pytest.mark.parametrize("kind", ["fixed", "stratify", "bucket"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_partition_the_epoch(kind, world):
    flow = batching(kind, Flow.items(records(50)).shuffle(seed=2))
    per_rank = [run_epochs(flow.loader(rank=r, world_size=world), 1) for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1, "ranks must get equal batch counts"
    keys = [k for batches in per_rank for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys))
    dropped = 50 - len(keys)
    assert 0 <= dropped < world * (4 if kind != "bucket" else 12)


def test_global_order_continues_on_another_world_size():
    """Saved on 2 ranks (global batch 6), resumed on 1 rank (batch 6): the same global order."""
    flow = Flow.items(records(36)).shuffle(seed=1)
    reference = [k for b in run_epochs(flow.batch(6).loader(), 1) for k in b["key"]]
    loaders = [flow.batch(3).loader(rank=r, world_size=2) for r in range(2)]
    its = [iter(ld) for ld in loaders]
    seen = set()
    for _ in range(2):
        for it in its:
            seen.update(next(it)["key"])
    state = loaders[1].state_dict()
    assert seen == set(reference[:12])
    single = flow.batch(6).loader(rank=0, world_size=1)
    single.load_state_dict(state)
    rest = [k for b in single for k in b["key"]]
    assert rest == reference[12:]
