"""Scale: the order as a function, lazy plans, columnar sources and file manifests."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows import Flow
from flows.errors import EmptySourceError
from flows.nodes.sampler import Sampler
from flows.sampling.order import Bijections, EpochOrder, Order, permute, rng
from flows.sampling.plans import DurationBuckets, FixedBatches, StratifiedBatches
from flows.sources.base import Source
from flows.sources.items import Items
from flows.storage import io
from flows.testing import check_resume, run_epochs


# ---- the order as a function ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permute_is_a_bijection_for_every_key(n):
    orders = [permute(np.arange(n), n, key) for key in (0, 1, 2**63 + 5)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(n))
    if n > 3:
        assert orders[0].tolist() != orders[1].tolist() != orders[2].tolist()


def test_permute_looks_uniform():
    """Over keys, the first element is uniform; within one permutation, neighbours are unrelated."""
    firsts = np.bincount([permute([0], 10, k)[0] for k in range(2000)], minlength=10)
    assert firsts.min() > 150 and firsts.max() < 250  # 200 expected each
    order = permute(np.arange(100_000), 100_000, 7)
    assert np.sum(np.abs(np.diff(order)) == 1) < 10  # about 2 expected
    assert abs(np.corrcoef(np.arange(100_000), order)[0, 1]) < 0.02


def test_permute_of_a_slice_is_the_slice_of_the_whole_and_per_position_domains():
    whole = permute(np.arange(5000), 5000, 9)
    assert permute(np.arange(1200, 1300), 5000, 9).tolist() == whole[1200:1300].tolist()
    assert [permute([i], 5000, 9)[0] for i in (0, 4999)] == [whole[0], whole[4999]]
    # one domain and key per group of positions (what the block shuffle uses)
    mixed = Bijections([10, 5000], [1, 9])(np.array([3, 3, 4999]), np.array([0, 1, 1]))
    assert mixed.tolist() == [permute([3], 10, 1)[0], whole[3], whole[4999]]


def test_order_is_a_pure_function_of_seed_and_epoch():
    a, b = np.asarray(EpochOrder(1000, 3, 0)), np.asarray(EpochOrder(1000, 3, 0))
    assert a.tolist() == b.tolist()
    assert a.tolist() != np.asarray(EpochOrder(1000, 3, 1)).tolist()
    assert a.tolist() != np.asarray(EpochOrder(1000, 4, 0)).tolist()
    assert np.asarray(EpochOrder(5, None, 7)).tolist() == [0, 1, 2, 3, 4]
    # far positions of a huge order, without storing it
    huge = EpochOrder(10**12, 3, 0)
    picked = huge[np.array([0, 10**12 - 1])]
    assert len(set(picked.tolist())) == 2 and all(0 <= p < 10**12 for p in picked)


def test_block_shuffle_keeps_windows_of_blocks_together():
    starts = np.array([0, 10, 25, 25, 40, 60, 61, 100])  # unequal blocks, one empty
    order = np.asarray(EpochOrder(100, 5, 0, starts, window=2))
    assert sorted(order.tolist()) == list(range(100))
    block_of = np.searchsorted(starts, order, side="right") - 1
    runs = np.flatnonzero(np.diff(block_of)) + 1
    assert len(runs) > 7  # rows of a window are interleaved, not block after block
    windows = np.split(order, np.cumsum([len(w) for w in _windows(order, starts, 5, 0, 2)])[:-1])
    for window in windows:  # each window holds at most 2 blocks
        assert len(set((np.searchsorted(starts, window, side="right") - 1).tolist())) <= 2


def _windows(order, starts, seed, epoch, window):
    """The rows of each window of the block shuffle, from the EpochOrder's own block order."""
    epoch_order = EpochOrder(len(order), seed, epoch, starts, window)
    bounds = epoch_order._windows
    return [order[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]


class Huge(Source):
    """``n`` records that are their own index: a source as long as a large corpus, costing nothing."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def test_fixed_plan_of_a_billion_samples_is_lazy_and_restores_at_the_end():
    """Sampler memory does not grow with the dataset: a 10^9-sample epoch, restored at 90%."""
    tracemalloc.start()
    sampler = Sampler(Huge(10**9), Order(seed=0), FixedBatches(256 * 8), rank=3, world_size=8)
    batches = len(sampler)
    sampler.reset({"epoch": 2, "batch": int(batches * 0.9), "slot": 0, "world_size": 8})
    got = [sampler.next().item for _ in range(256)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert batches == -(-10**9 // 2048)
    assert peak < 2**20, f"{peak} bytes traced"
    assert len(set(got)) == 256
    again = Sampler(Huge(10**9), Order(seed=0), FixedBatches(256 * 8), rank=3, world_size=8)
    again.reset({"epoch": 2, "batch": int(batches * 0.9), "slot": 0, "world_size": 8})
    assert [again.next().item for _ in range(256)] == got


# ---- stratified and bucketed plans: compact arrays, the old semantics --------------------------------
def _round_robin(order, labels, turn):
    """The stratified order as the loop it replaces computed it: classes take turns."""
    queues = [[i for i in order if labels[i] == c] for c in range(len(turn))]
    picked = []
    while any(queues):
        for q in turn:
            if queues[q]:
                picked.append(queues[q].pop(0))
    return picked


def test_stratified_plan_is_the_round_robin_in_compact_arrays():
    labels = [(i * 7) % 5 if i % 11 else 0 for i in range(203)]  # unbalanced classes
    source = Items([{"label": f"c{x}"} for x in labels])
    order = Order(seed=4)(source, 1)
    batches = StratifiedBatches(8, "label")(order, source, 4, 1)
    codes = source.codes("label")  # in order of first appearance
    turn_order = rng(4, 1, "stratify").permutation(5)  # classes in turn order
    expected = _round_robin(np.asarray(order).tolist(), codes.tolist(), turn_order.tolist())
    assert np.concatenate([batches[b] for b in range(len(batches))]).tolist() == expected
    assert batches.order.dtype == np.int32  # 4 bytes per sample, no Python object
    first = [labels[i] for i in batches[0]]
    assert len(set(first)) == 5  # every class in the first batch


def test_buckets_are_greedy_within_sorted_pools():
    durations = [0.5 + ((i * 37) % 23) / 4 for i in range(300)]
    source = Items([{"duration": d} for d in durations])
    plan = DurationBuckets(max_seconds=12.0, pool=64)
    batches = plan(Order(seed=1)(source, 0), source, 1, 0)
    got = sorted(tuple(sorted(batches[b].tolist())) for b in range(len(batches)))
    order = np.asarray(Order(seed=1)(source, 0))
    expected = []
    for start in range(0, 300, 64):  # the greedy loop it replaces
        pool = sorted(order[start : start + 64], key=lambda i: durations[i])  # stable
        current, total = [], 0.0
        for i in pool:
            if current and total + durations[i] > 12.0:
                expected.append(tuple(sorted(current)))
                current, total = [], 0.0
            current.append(int(i))
            total += durations[i]
        expected.append(tuple(sorted(current)))
    assert got == sorted(expected)
    assert batches.indices.dtype == np.int32


@pytest.mark.parametrize("kind", ["stratify", "bucket"])
def test_stratified_and_bucketed_resume_across_world_sizes(kind):
    records = [{"key": f"s{i}", "label": i % 3, "duration": 1.0 + i % 4} for i in range(60)]
    flow = Flow.items(records).shuffle(seed=5)

    def batching(world):
        return flow.stratify("label", 6 // world) if kind == "stratify" else flow.bucket(8.0 / world)

    whole = [list(b["key"]) for b in run_epochs(batching(1).loader(), 1)]
    pair = [batching(2).loader(rank=r, world_size=2) for r in range(2)]
    its = [iter(ld) for ld in pair]
    firsts = [next(it) for it in its]
    assert sorted(firsts[0]["key"] + firsts[1]["key"]) == sorted(whole[0])
    resumed = batching(1).loader()
    resumed.load_state_dict(pair[0].state_dict())
    assert [list(b["key"]) for b in resumed] == whole[1:]


# ---- columnar sources -------------------------------------------------------------------------------
def test_items_from_columns_build_records_per_sample_and_resume():
    columns = {"key": [f"k{i}" for i in range(40)], "x": np.arange(40), "y": np.linspace(0, 1, 40)}
    flow = Flow.items(columns)
    assert flow.source[3] == {"key": "k3", "x": 3, "y": pytest.approx(3 / 39)}
    assert type(flow.source[3]["x"]) is int and flow.source.key(3) == "k3"
    check_resume(lambda: flow.shuffle(seed=1).stratify("x", 4).loader())
    table = pa.table({"path": ["a.wav", "b.wav"], "label": ["yes", "no"]})
    assert [r["label"] for r in Flow.items(table).loader()] == ["yes", "no"]
    with pytest.raises(EmptySourceError, match="no rows"):
        Flow.items({"x": []})


def test_parquet_filter_blocks_and_codes_stay_compact(tmp_path):
    path = tmp_path / "t.parquet"
    ids = np.arange(1000)
    pq.write_table(pa.table({"id": ids, "label": [f"c{i % 7}" for i in ids]}), path, row_group_size=100)
    flow = Flow.table(str(path), where={"label": ["c1", "c2"]})
    source = flow.source
    assert source.blocks().tolist()[0] == 0 and source.blocks().tolist()[-1] == len(source)
    assert len(source.blocks()) == 11  # ten row groups
    assert source.codes("label").dtype == np.int32
    assert len(set(source.codes("label").tolist())) == 2
    rows = [r["id"] for r in flow.shuffle(seed=2, window=2).loader()]
    assert sorted(rows) == [i for i in ids if i % 7 in (1, 2)]
    assert len({i // 100 for i in rows[:50]}) <= 2  # the first window: two row groups
    check_resume(lambda: flow.shuffle(seed=2, window=2).stratify("label", 6).loader(num_workers=2))
    part = flow.split([0.5, 0.5], seed=0)[0]  # a subset keeps runs of row groups as blocks
    assert len(part.source.blocks()) >= 11


# ---- file manifests ---------------------------------------------------------------------------------
@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "clips"
    for name in ("b/2.wav", "a/1.wav", "a/0.flac", "notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * len(name))
    return root


def counting_listings(monkeypatch) -> dict[str, int]:
    calls = {"n": 0}
    original = io.list_files_with_sizes

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(io, "list_files_with_sizes", counting)
    return calls


def test_files_are_listed_once_into_a_memory_mapped_manifest(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWS_CACHE_DIR", str(tmp_path / "cache"))
    calls = counting_listings(monkeypatch)
    flow = Flow.files(str(tree))
    assert calls["n"] == 1
    made = list((tmp_path / "cache" / "manifests").glob("*.arrow"))
    assert [str(p) for p in made] == [flow.source.manifest]
    assert [r["key"] for r in flow.loader()] == ["a/0.flac", "a/1.wav", "b/2.wav"]
    table = Flow.table(flow.source.manifest).source
    assert [table[i]["size"] for i in range(3)] == [8, 7, 7]
    assert table[0]["mtime"] == pytest.approx(os.stat(tree / "a/0.flac").st_mtime)
    # saved where the user says, then reused without listing
    saved = tmp_path / "clips.arrow"
    Flow.files(str(tree), manifest=saved)
    assert calls["n"] == 2 and saved.exists()
    again = Flow.files(str(tree), manifest=saved)
    assert calls["n"] == 2
    check_resume(lambda: again.shuffle(seed=1).batch(2).loader(num_workers=2, method="process"))


def test_manifest_command_writes_a_reusable_manifest(tree, tmp_path):
    out = tmp_path / "m" / "all.arrow"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "flows", "manifest", str(tree), str(out), "--extensions"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "4 files listed" in done.stdout
    rows = list(Flow.table(str(out), where={"size": 9}).loader())
    assert [Path(r["path"]).name for r in rows] == ["notes.txt"]
    missing = subprocess.run([sys.executable, "-m", "flows", "manifest", str(tmp_path / "nope"), str(out)],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "nope" in missing.stderr and "Traceback" not in missing.stderr
