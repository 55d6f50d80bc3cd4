"""The core promise: a loader restored from a state continues exactly, whatever the workers."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch

from flows import Flow
from flows.execution.apply import Apply
from flows.nodes.gather import Gather
from flows.nodes.mix import Mix
from flows.nodes.prefetch import Prefetch
from flows.nodes.sampler import Sampler
from flows.nodes.to_device import ToDevice
from flows.nodes.workers import Workers
from flows.sampling.order import Order
from flows.sampling.plans import FixedBatches
from flows.sources.items import Items
from flows.stages.collate import Collate
from flows.testing import assert_same, check_resume, run_epochs


class Scale:
    """A picklable per-sample stage (process workers need picklable stages) that counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, item: dict) -> dict:
        self.calls += 1
        return {**item, "y": item["x"] * 2}


def records(n: int = 22) -> list[dict]:
    return [{"key": f"s{i}", "x": torch.full((3,), float(i)), "label": i % 3,
             "duration": 1.0 + (i % 5)} for i in range(n)]


def flow(shuffle: bool = True) -> Flow:
    base = Flow.items(records())
    return (base.shuffle(seed=3) if shuffle else base).map(Scale())


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("workers", "method", "resume_workers", "resume_method"), [
    (0, "thread", 0, "thread"),
    (1, "thread", 4, "thread"),
    (4, "thread", 0, "thread"),
    (4, "process", 1, "thread"),
    (0, "thread", 4, "process"),
])
def test_exact_resume_any_workers(shuffle, workers, method, resume_workers, resume_method):
    batched = flow(shuffle).batch(4)
    check_resume(
        lambda: batched.loader(num_workers=workers, method=method),
        rebuild=lambda: batched.loader(num_workers=resume_workers, method=resume_method),
        epochs=2,
    )


@pytest.mark.parametrize("kind", ["stratify", "bucket", "unbatched", "mix", "crop"])
def test_exact_resume_every_batching(kind):
    base = flow()
    if kind == "stratify":
        built = base.stratify("label", 3)
    elif kind == "bucket":
        built = base.bucket(max_seconds=7.0, variable=False)
    elif kind == "unbatched":
        built = base
    elif kind == "mix":
        built = Flow.mix([base.batch(2), Flow.items(records(9)).shuffle(seed=5).batch(3)],
                         weights=[0.7, 0.3], seed=1, stop="all")
    else:
        audio = [{"key": f"a{i}", "audio": torch.arange(20.0 + i).reshape(1, -1)} for i in range(10)]
        built = Flow.items(audio).shuffle(seed=1).crop(8).batch(3)
    # batch tasks in threads, restored into batch tasks in processes
    check_resume(lambda: built.loader(num_workers=2),
                 rebuild=lambda: built.loader(num_workers=2, method="process"), epochs=3)


def test_epochs_reshuffle_and_are_pure_functions_of_seed():
    batched = flow().batch(22)
    a = run_epochs(batched.loader(), 3)
    b = run_epochs(batched.loader(num_workers=3), 3)
    assert_same(a, b)
    orders = [batch["key"] for batch in a]
    assert orders[0] != orders[1] != orders[2]
    assert all(sorted(o) == sorted(orders[0]) for o in orders)
    other_seed = Flow.items(records()).shuffle(seed=4).batch(22).loader()
    assert next(iter(other_seed))["key"] != orders[0]


def test_restore_does_not_redo_consumed_work():
    """Restoring near the end of an epoch maps only what is left (plus a prefetch window)."""
    batched = Flow.items(records(200)).shuffle(seed=0).map(Scale()).batch(4)
    loader = batched.loader(num_workers=2)
    it = iter(loader)
    for _ in range(45):
        next(it)
    state = loader.state_dict()
    counter = Scale()
    resumed = Flow.items(records(200)).shuffle(seed=0).map(counter).batch(4).loader(prefetch=0)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 5
    assert counter.calls == 20  # exactly the 5 remaining batches: nothing consumed is redone


def test_state_is_small_and_plain():
    loader = flow().batch(4).loader(num_workers=2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert len(repr(state)) < 600  # a cursor, never the data
    torch.save(state, "/dev/null")


def test_state_saved_again_after_restoring_at_an_epoch_end():
    batched = Flow.items(records(12)).shuffle(seed=1).batch(4)
    reference = run_epochs(batched.loader(), 2)
    first = batched.loader()
    it = iter(first)
    for _ in range(3):
        next(it)
    end = first.state_dict()
    second = batched.loader()
    second.load_state_dict(end)
    it = iter(second)
    out = [next(it)]
    third = batched.loader()
    third.load_state_dict(second.state_dict())
    out += list(third)
    assert_same(out, reference[3:])


def plain(n: int) -> list[dict]:
    """Records without tensors: node outputs (Envelopes) compare with ==."""
    return [{"key": f"p{i}", "i": i, "label": i % 3} for i in range(n)]


def sampler(n: int = 13, seed: int = 2, size: int = 3) -> Sampler:
    return Sampler(Items(plain(n)), Order(seed), FixedBatches(size))


def gathered(n: int = 13, seed: int = 2, workers: int = 0) -> Gather:
    return Gather(Workers(sampler(n, seed), Apply([], collate=Collate()), workers))


NODES = {
    "Sampler": lambda: sampler(),
    "Workers, inline": lambda: Workers(sampler(), Apply([]), 0),
    "Workers, 2 threads": lambda: Workers(sampler(), Apply([]), 2),
    "Workers, 2 processes": lambda: Workers(sampler(), Apply([]), 2, "process"),
    "Gather": lambda: gathered(),
    "Mix, stop first": lambda: Mix([gathered(), gathered(5, 7)], [0.6, 0.4], seed=1, stop="first"),
    "Mix, stop all": lambda: Mix([gathered(), gathered(5, 7)], [0.6, 0.4], seed=1, stop="all"),
    "Mix of mixes": lambda: Mix([Mix([gathered(), gathered(4, 1)], [1, 1], 2, "all"), gathered(5, 7)],
                                [0.5, 0.5], seed=1, stop="all"),
    "Prefetch": lambda: Prefetch(gathered(workers=2), 2),
    "ToDevice": lambda: ToDevice(gathered(), "cpu", transform=lambda b: {**b, "n": len(b["key"])}),
}


@pytest.mark.parametrize("name", NODES)
def test_every_node_passes_check_resume(name):
    """Every node type, on its own, through every save point of torchdata's helper and its
    node contract (flows.testing.check_resume)."""
    check_resume(NODES[name], epochs=3)


def mixed(stop: str) -> Flow:
    return Flow.mix([flow().batch(2), Flow.items(records(9)).shuffle(seed=5).batch(3)],
                    weights=[0.7, 0.3], seed=1, stop=stop)


LOADERS = {
    "workers 0, prefetch 0": lambda: flow().batch(4).loader(prefetch=0),
    "workers 1 thread, prefetch 1": lambda: flow().batch(4).loader(num_workers=1, prefetch=1),
    "workers 4 threads": lambda: flow().batch(4).loader(num_workers=4),
    "workers 4 processes": lambda: flow().batch(4).loader(num_workers=4, method="process"),
    "stratify": lambda: flow().stratify("label", 3).loader(num_workers=1),
    "bucket": lambda: flow().bucket(max_seconds=7.0, variable=False).loader(num_workers=1),
    "unbatched": lambda: flow().loader(),
    "crop": lambda: Flow.items([{"key": f"a{i}", "audio": torch.arange(20.0 + i).reshape(1, -1)}
                                for i in range(10)]).shuffle(seed=1).crop(8).batch(3).loader(),
    "mix first": lambda: mixed("first").loader(num_workers=2),
    "mix all": lambda: mixed("all").loader(),
    "mix all, prefetch 0": lambda: mixed("all").loader(prefetch=0),
    "pin, to cpu": lambda: flow().batch(4).pin().to("cpu").loader(num_workers=2),
    "stats": lambda: flow().batch(4).loader(num_workers=2, stats=True),
    "skip and filter": lambda: Flow.items(records()).shuffle(seed=3).map(FailOn({"s3", "s20"}))
                               .filter(lambda r: r["key"] != "s7").batch(4).loader(on_error="skip"),
}


@pytest.mark.parametrize("name", LOADERS)
def test_every_loader_configuration_passes_check_resume(name):
    check_resume(LOADERS[name], epochs=3)


class FailOn:
    """A picklable stage failing on the samples whose keys it is given."""

    def __init__(self, keys: set[str]) -> None:
        self.keys = keys

    def __call__(self, item: dict) -> dict:
        if item["key"] in self.keys:
            raise ValueError(f"cannot read {item['key']}")
        return item


@pytest.mark.parametrize("prefetch", [0, 2])
def test_mix_all_epochs_do_not_depend_on_how_far_earlier_epochs_ran(prefetch):
    """Epoch 2 of a stop="all" mix is the same after full epochs, after partial ones, after a
    double reset and after a restore at the end of an epoch."""
    whole = mixed("all").loader(prefetch=prefetch)
    reference = [keys(whole) for _ in range(3)]
    assert reference[0] != reference[1] != reference[2]
    partial = mixed("all").loader(prefetch=prefetch)
    for _ in range(2):
        next(iter(partial))  # epochs 0 and 1 cut short after one batch
    assert keys(partial) == reference[2]
    double = mixed("all").loader(prefetch=0)
    double.root.reset()
    double.root.reset()  # the second reset of the Mix node starts its epoch 1
    assert keys(double.root) == reference[1]
    assert keys(double) == reference[2]
    lazy = mixed("all").loader(prefetch=prefetch)
    iter(lazy)  # a loader's epoch starts at its first next(): both iter()s begin epoch 0
    assert [keys(iter(lazy)) for _ in range(2)] == reference[:2]
    ended = mixed("all").loader(prefetch=prefetch)
    for _ in range(2):
        for _ in ended:
            pass
    resumed = mixed("all").loader(prefetch=prefetch)
    resumed.load_state_dict(ended.state_dict())
    assert keys(resumed) == reference[2]


def keys(batches: Iterable[dict]) -> list[list[str]]:
    return [b["key"] for b in batches]
