"""The core promise: a loader restored from a state continues exactly, whatever the workers."""

from __future__ import annotations

import pytest
import torch

from flows import Flow
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
