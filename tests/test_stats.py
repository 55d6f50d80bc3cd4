"""Observability: loader.stats() times every node without changing outputs or state."""

from __future__ import annotations

import json
import time

import pytest
import torch

from flows import Flow, FlowsError, Gather, Stats, Workers
from flows.execution.apply import Apply
from flows.stats import bench, bench_table
from flows.testing import assert_same, check_resume, run_epochs


class Slow:
    """A picklable stage that takes a while: the bottleneck of the flows below."""

    name = "slow"

    def __call__(self, item: dict) -> dict:
        time.sleep(0.002)
        return {**item, "y": item["x"] + 1}


def double(item: dict) -> dict:
    return {**item, "x": item["x"] * 2}


def records(n: int = 24) -> list[dict]:
    return [{"key": f"s{i}", "x": torch.full((3,), float(i)), "audio": torch.arange(5.0)[None] + i,
             "label": i % 3} for i in range(n)]


def flow() -> Flow:
    return Flow.items(records()).shuffle(seed=1).map(double).map(Slow()).crop(2).batch(4)


def test_off_builds_the_plain_graph():
    loader = flow().loader(num_workers=2)
    gather = loader.root.source  # the Prefetcher's source
    assert isinstance(gather, Gather) and isinstance(gather.source, Workers)
    assert isinstance(gather.source.fn, Apply)
    assert loader._stats is None
    with pytest.raises(FlowsError, match="stats=True"):
        loader.stats()


@pytest.mark.parametrize(("workers", "method"), [(0, "thread"), (2, "thread"), (2, "process")])
def test_same_output_and_state_with_stats(workers, method):
    plain_loader = flow().loader(num_workers=workers, method=method)
    plain = run_epochs(plain_loader, 2)
    loader = flow().loader(num_workers=workers, method=method, stats=True)
    assert_same(run_epochs(loader, 2), plain)
    assert loader.state_dict() == plain_loader.state_dict()
    report = loader.stats()
    names = {n.name for n in report.nodes}
    assert {"source", "double", "slow", "random_crop", "collate"} <= names
    assert report.node("slow").calls == 48 and report.node("collate").calls == 12
    assert report.samples == 48 and report.batches == 12 and len(report.first_batch) == 2
    assert report.bottleneck == "slow"
    if workers:
        assert {q.name for q in report.queues} >= {"workers: in flight", "prefetch: ready batches"}
    table = report.table()
    assert "slow" in table and "bottleneck: slow" in table


def test_resume_is_exact_with_stats():
    built = flow()
    check_resume(lambda: built.loader(num_workers=2, stats=True),
                 rebuild=lambda: built.loader(num_workers=1), points=[2, 7])
    check_resume(lambda: built.loader(num_workers=0),
                 rebuild=lambda: built.loader(num_workers=2, method="process", stats=True),
                 points=[3])


def test_filters_mixes_and_skips_are_counted_as_without_stats():
    def bad(item: dict) -> dict:
        if item["label"] == 2:
            raise ValueError("bad sample")
        return item

    base = Flow.items(records()).map(double).filter(lambda r: r["key"] != "s0").map(bad).batch(3)
    mixed = Flow.mix([base, Flow.items(records(6)).batch(2)], weights=[0.5, 0.5], seed=2)
    for built in (base, mixed):
        plain = built.loader(on_error="skip")
        timed = built.loader(on_error="skip", stats=True)
        assert_same(run_epochs(timed, 1), run_epochs(plain, 1))
        assert (timed.skipped, timed.filtered) == (plain.skipped, plain.filtered)
    assert timed.stats().node("filter(<lambda>)").calls > 0


def test_chrome_trace(tmp_path):
    loader = flow().loader(num_workers=2, method="process", stats=Stats(trace=True))
    run_epochs(loader, 1)
    path = loader.stats().save_trace(tmp_path / "trace.json")
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["name"] for e in events}
    assert {"source", "slow", "collate", "first batch"} <= names
    assert len({e["pid"] for e in events if e["name"] == "slow"}) >= 1
    assert all(e["ph"] == "X" and e["dur"] >= 0 for e in events)
    untraced = flow().loader(stats=True)
    run_epochs(untraced, 1)
    with pytest.raises(FlowsError, match="trace=True"):
        untraced.stats().save_trace(tmp_path / "none.json")


def test_reset_and_bench_helpers():
    loader = flow().loader(stats=True)
    run_epochs(loader, 1)
    assert loader.stats(reset=True).batches == 6
    assert loader.stats().batches == 0
    report = bench(flow(), batches=2, num_workers=1)
    assert report.batches == 2
    assert report.to_dict()["bottleneck"] == "slow"
    table = bench_table(flow(), batches=3)
    assert "samples/s" in table and "bottleneck" in table
