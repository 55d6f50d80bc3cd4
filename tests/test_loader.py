"""The loader's promises beyond plain resume: the flow's own errors through the read-ahead
thread, a loaded state that wins over anything asked before, exact skip counts and honest
lengths, and no abort at exit with a slow sample in flight."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable

import pytest
import torch

from flows import FixedBatches, Flow, StageError
from flows.testing import run_epochs
from tests.test_train import ROOT, Tiny


def records(n: int) -> list[dict]:
    return [{"key": f"s{i}", "path": f"/data/s{i}.wav", "x": torch.full((2,), float(i))} for i in range(n)]


class FailOn:
    """A picklable stage failing on the samples whose keys it is given."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = set(keys)

    def __call__(self, item: dict) -> dict:
        if item["key"] in self.keys:
            raise ValueError(f"cannot read {item['key']}")
        return item


def keys(batches: Iterable[dict]) -> list[list[str]]:
    return [b["key"] for b in batches]


# ---- the flow's own errors, through the prefetch thread (issue 13, point 8) ----------------------

def error_of(loader) -> StageError:
    with loader, pytest.raises(StageError) as info:
        run_epochs(loader, 1)
    return info.value


@pytest.mark.parametrize(("workers", "method"), [(0, "thread"), (2, "thread"), (2, "process")])
def test_a_stage_error_is_the_same_with_or_without_prefetch(workers, method):
    flow = Flow.items(records(12)).shuffle(seed=1).map(FailOn({"s7"}), name="explode").batch(3)
    plain = error_of(flow.loader(num_workers=workers, method=method, prefetch=0))
    prefetched = error_of(flow.loader(num_workers=workers, method=method, prefetch=2))
    assert str(plain) == "stage 'explode' failed on /data/s7.wav: ValueError: cannot read s7"
    assert str(prefetched) == str(plain)
    assert (prefetched.stage, prefetched.sample) == (plain.stage, plain.sample) == ("explode", "/data/s7.wav")
    assert "\n" not in str(prefetched)


def test_the_cli_prints_one_line_for_a_bad_file(tmp_path):
    data = Tiny.generate(tmp_path / "data")
    bad = sorted((data / "train").iterdir())[5]
    bad.write_bytes(b"not a tensor")
    run = subprocess.run([sys.executable, "-m", "flows", "train", "tests.test_train:Tiny", "--data-dir",
                          str(data), "--checkpoint-dir", str(tmp_path / "ckpt"), "--epochs", "1",
                          "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, run.stderr
    assert re.fullmatch(rf"flows: error: stage '\w+' failed on \S*{bad.name}: .+", errors[0]), errors[0]
    assert "Traceback" not in run.stderr and "Caught" not in run.stderr


# ---- a loaded state wins (point 3) ---------------------------------------------------------------

@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_state_loaded_after_asking_a_fresh_loader_for_its_state_is_kept(prefetch):
    flow = Flow.items(records(20)).shuffle(seed=2).batch(4)
    reference = keys(flow.loader())
    first = flow.loader(prefetch=prefetch)
    it = iter(first)
    for _ in range(2):
        next(it)
    middle = first.state_dict()
    fresh = flow.loader(prefetch=prefetch)
    fresh.state_dict()  # as StatefulDataLoader's workers do before the first fetch
    fresh.load_state_dict(middle)
    assert fresh.state_dict() == middle  # asked again before iterating: the loaded state
    assert keys(fresh) == reference[2:]
    first.close()


# ---- Mix ends for good (point 2) ---------------------------------------------------------------

def mixed(stop: str) -> Flow:
    a = Flow.items(records(30)).shuffle(seed=1).batch(2)
    b = Flow.items(records(7)).shuffle(seed=2).batch(3)
    return Flow.mix([a, b], weights=[0.5, 0.5], seed=0, stop=stop)


@pytest.mark.parametrize("stop", ["first", "all"])
def test_mix_raises_stop_iteration_every_time_after_its_end(stop):
    mix = mixed(stop).loader(prefetch=0).root
    out = []
    with pytest.raises(StopIteration):
        while True:
            out.append(next(mix))
    assert out
    for _ in range(5):
        with pytest.raises(StopIteration):
            next(mix)


@pytest.mark.parametrize("stop", ["first", "all"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_mix_state_saved_after_an_epoch_restores_the_next_full_epoch(stop, prefetch):
    whole = mixed(stop).loader(prefetch=prefetch)
    reference = [keys(whole) for _ in range(2)]
    ended = mixed(stop).loader(prefetch=prefetch)
    for _ in ended:
        pass
    resumed = mixed(stop).loader(prefetch=prefetch)
    resumed.load_state_dict(ended.state_dict())
    assert keys(resumed) == reference[1]
    for loader in (whole, ended, resumed):
        loader.close()


# ---- exact skip counts, honest lengths (point 9) --------------------------------------------------

# 22 samples in batches of 4 (unshuffled): s2 fails, and so do the last batch and a half
FAILING = {"s2", *(f"s{i}" for i in range(16, 22))}


@pytest.mark.parametrize(("workers", "method", "prefetch"),
                         [(0, "thread", 0), (0, "thread", 2), (2, "thread", 2), (2, "process", 1)])
def test_skips_after_the_last_batch_are_counted_at_each_epoch_end(workers, method, prefetch):
    flow = Flow.items(records(22)).map(FailOn(FAILING)).batch(4)
    with flow.loader(num_workers=workers, method=method, prefetch=prefetch, on_error="skip") as loader:
        assert len(loader) == 6  # planned: an upper bound when samples are skipped
        for epoch in (1, 2):
            delivered = list(loader)
            assert len(delivered) == loader.batches == 4  # the exact count, after the epoch
            assert loader.skipped == 7 * epoch
            assert len(loader) >= loader.batches
        end = loader.state_dict()
    resumed = flow.loader(on_error="skip")
    resumed.load_state_dict(end)
    assert resumed.skipped == 14
    assert len(list(resumed)) == 4 and resumed.skipped == 21 and resumed.batches == 4


def test_skip_count_and_batch_count_survive_a_mid_epoch_restore():
    flow = Flow.items(records(22)).shuffle(seed=4).map(FailOn(FAILING)).batch(4)
    reference = flow.loader(on_error="skip")
    epochs = [keys(reference) for _ in range(2)]
    counts = reference.skipped, reference.batches
    first = flow.loader(on_error="skip", num_workers=2)
    for _ in first:
        pass
    it = iter(first)
    next(it)
    next(it)
    resumed = flow.loader(on_error="skip")
    resumed.load_state_dict(first.state_dict())
    assert keys(resumed) == epochs[1][2:]
    assert (resumed.skipped, resumed.batches) == counts == (14, len(epochs[1]))
    first.close()


@pytest.mark.parametrize("stop", ["first", "all"])
def test_len_is_the_exact_batch_count_of_each_epoch(stop):
    """Asked between epochs or after iter(), for a mix or a bucketed flow (lengths vary by epoch)."""
    timed = Flow.items([{**r, "duration": 0.5 + (i * 7 % 10) / 2} for i, r in enumerate(records(40))])
    counts = []
    for flow in (mixed(stop), timed.shuffle(seed=1).bucket(max_seconds=6.0, pool=4, variable=False)):
        with flow.loader() as loader:
            for _ in range(4):
                between = len(loader)
                it = iter(loader)
                assert len(loader) == between
                counts.append(len(list(it)))
                assert between == counts[-1] == loader.batches
    assert len(set(counts[4:])) > 1  # the bucketed flow's epochs differ in length


# ---- no abort at exit (point 5) ----------------------------------------------------------------

def slow(item: dict) -> dict:
    """About a second of torch work: the read-ahead thread is inside torch when the consumer
    closes the loader and exits."""
    x = torch.randn(256, 256)
    start = time.perf_counter()
    while time.perf_counter() - start < 1.0:
        x = torch.tanh(x @ x)
    return {**item, "y": x.sum()}


@pytest.mark.parametrize(("workers", "close"), [(0, True)] * 4 + [(0, False), (2, True)])
def test_closing_with_a_slow_sample_in_flight_never_aborts(workers, close):
    """A slow torch stage, one batch, close() (or not), exit: a real process, every time exit 0.
    (Before: SIGABRT, "terminate called without an active exception", in about half the runs.)"""
    script = textwrap.dedent(f"""
        from flows import Flow
        from tests.test_loader import records, slow
        loader = Flow.items(records(6)).map(slow).batch(1).loader(num_workers={workers})
        next(iter(loader))
        if {close}:
            loader.close()
        print("done", flush=True)
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "done", (run.returncode, run.stderr)
    assert "terminate called" not in run.stderr


def test_len_makes_each_epochs_plan_once():
    """``len(loader)`` before and between epochs (trainers ask often) plans that epoch once: the
    plan counted is the plan the epoch then runs."""
    plans = []

    class Counted(FixedBatches):
        def __call__(self, *args):  # type: ignore[no-untyped-def]
            plans.append(1)
            return super().__call__(*args)

    flow = dataclasses.replace(Flow.items(list(range(40))).batch(4), plan=lambda world: Counted(4 * world))
    loader = flow.loader(prefetch=0)
    for _ in range(2):
        assert [len(loader) for _ in range(3)] == [10, 10, 10]
        assert len(list(loader)) == 10
    assert len(plans) == 2


def test_no_workers_map_nothing_ahead_of_the_consumer():
    """With 0 workers a batch is mapped when it is asked for: the first batch maps its 4 samples."""
    mapped = []
    loader = Flow.items(list(range(40))).map(lambda x: mapped.append(x) or x).batch(4).loader(prefetch=0)
    first = next(iter(loader))
    assert len(first) == 4 and mapped == [0, 1, 2, 3]
