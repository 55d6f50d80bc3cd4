"""The worker pool: it lives across epochs and restores, stops on close(), and a worker process
that dies is reported with the sample it was mapping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from flows import Flow, FlowsError, StageError
from flows.execution import shared_memory
from flows.execution.threads import training_threads
from flows.testing import assert_same, check_resume, run_epochs

ROOT = Path(__file__).resolve().parents[1]
# the end of a subprocess script that built ``loader``: print its workers' pids, then wait
SERVE_PIDS = """
batch = next(iter(loader))
print(" ".join(str(int(p)) for p in set(batch["pid"].tolist())), flush=True)
time.sleep(60)
"""


def records(n: int) -> list[dict]:
    return [{"key": f"r{i}", "i": i} for i in range(n)]


def where(item: dict) -> dict:
    """Tag the item with the process and thread that mapped it."""
    return {**item, "pid": os.getpid(), "thread": threading.current_thread().name}


def die_on_r5(item: dict) -> dict:
    if item["key"] == "r5":
        os._exit(3)  # a worker process killed mid-sample (as by the OOM killer)
    return item


def alive() -> set[str]:
    return {t.name for t in threading.enumerate()}


@pytest.mark.parametrize("method", ["thread", "process"])
def test_one_pool_serves_every_epoch_and_restore_until_close(method):
    flow = Flow.items(records(24)).shuffle(seed=1).map(where).batch(4)
    loader = flow.loader(num_workers=2, method=method)
    batches, state, after = [], None, None
    for b in loader:  # epoch 1, noting the position after its 2nd batch
        batches.append(b)
        if len(batches) == 2:
            state = loader.state_dict()
        after = b if len(batches) == 3 else after
    batches += run_epochs(loader, 1)
    loader.load_state_dict(state)
    restored = next(iter(loader))
    assert restored["key"] == after["key"]
    batches.append(restored)
    if method == "thread":
        names = {t for b in batches for t in b["thread"]}
        assert len(names) <= 2 and names <= alive()
        assert all(name.startswith("flows-worker-") for name in names)
        assert {int(p) for b in batches for p in b["pid"]} == {os.getpid()}
    else:
        pids = {int(p) for b in batches for p in b["pid"]}
        assert len(pids) <= 2 and os.getpid() not in pids
    loader.close()
    if method == "thread":
        assert not names & alive()
    else:
        for pid in pids:  # stopped and reaped
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    again = run_epochs(loader, 1)  # iterated again after close(): a new pool
    assert sorted(k for b in again for k in b["key"]) == sorted(r["key"] for r in records(24))
    loader.close()


def test_a_worker_process_that_dies_is_reported_with_its_sample():
    loader = Flow.items(records(12)).map(die_on_r5).batch(3).loader(num_workers=2, method="process")
    with pytest.raises(FlowsError, match=r"worker process died while mapping sample 'r5'"):
        run_epochs(loader, 1)
    loader.close()


def test_worker_processes_exit_when_their_consumer_is_killed():
    """A consumer killed with SIGKILL leaves no worker behind, no copy of its stdout (a parent
    reading that stdout to the end is not kept waiting) and nothing in /dev/shm: the workers
    share memory only through anonymous or unlinked mappings."""
    script = textwrap.dedent("""
        import time
        from flows import Flow
        from tests.test_workers import records, where
        loader = Flow.items(records(40)).map(where).batch(4).loader(num_workers=2, method="process")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script + SERVE_PIDS], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]  # type: ignore[union-attr]
        assert pids
        tree = [proc.pid, *pids]
        for pid in tree:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            assert not [m for m in maps if "/dev/shm/" in m and not m.endswith("(deleted)")]
        proc.kill()
        assert proc.stdout.read() == ""  # type: ignore[union-attr]  # end of file: no worker holds it
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.05)
        assert not any(_running(p) for p in pids)
        assert not [p for p in Path("/dev/shm").iterdir() if any(str(pid) in p.name for pid in tree)]
    finally:
        proc.kill()
        proc.wait()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def tensors(item: dict) -> dict:
    """Tensors of several kinds, sizes and layouts, from the item's index."""
    g = torch.Generator().manual_seed(item["i"])
    big = 3_000_000 if item["i"] % 5 == 0 else 10  # 12 MB: more than a shared slot (see below)
    return {**item, "audio": torch.randn(2, 4000, generator=g).T,  # not contiguous
            "big": torch.rand(big, generator=g), "ids": torch.arange(item["i"], dtype=torch.int16),
            "half": torch.rand(3, generator=g).to(torch.bfloat16), "empty": torch.zeros(0, 5),
            "nested": [{"x": torch.full((2,), float(item["i"]))}]}


def test_process_workers_return_tensors_exactly(monkeypatch):
    """Process workers hand tensors back through shared memory, or the pipe when too large or
    of a dtype numpy lacks: bit for bit what threads give, with dtypes and shapes."""
    monkeypatch.setattr(shared_memory, "SLOT_BYTES", 1 << 20)  # forked workers see it: 12 MB -> the pipe
    flow = Flow.items(records(16)).shuffle(seed=3).map(tensors)
    threads, processes = (run_epochs(flow.loader(num_workers=2, method=m), 2)
                          for m in ("thread", "process"))
    assert len(threads) == len(processes) == 32
    for a, b in zip(threads, processes, strict=True):
        assert_same(a, b)
        assert b["audio"].dtype == torch.float32 and b["audio"].shape == (4000, 2)
        assert b["ids"].dtype == torch.int16 and b["half"].dtype == torch.bfloat16


def logged(item: dict) -> dict:
    """A slow stage that leaves a file per sample it starts (the tests count them)."""
    Path(item["log"], item["key"]).touch()
    time.sleep(0.1)
    return where(item)


def logged_records(log: Path, n: int) -> list[dict]:
    return [{"key": f"r{i}", "i": i, "log": str(log)} for i in range(n)]


def started(log: Path) -> int:
    return len(list(log.iterdir()))


@pytest.mark.parametrize("method", ["thread", "process"])
def test_a_worker_maps_a_whole_batch(method):
    """The unit of work is this rank's slice of a global batch (collated in the worker), or a
    chunk of consecutive samples in an unbatched flow."""
    flow = Flow.items(records(40)).shuffle(seed=2).map(where)
    batches = run_epochs(flow.batch(8).loader(num_workers=2, method=method), 1)
    assert len(batches) == 5
    assert all(len(set(b["thread"])) == 1 and len(set(b["pid"].tolist())) == 1 for b in batches)
    on_rank_1 = flow.batch(4).loader(num_workers=2, method=method, rank=1, world_size=2)
    assert all(len(set(b["pid"].tolist())) == 1 for b in on_rank_1)
    items = run_epochs(flow.loader(num_workers=2, method=method), 1)
    chunks = [items[i:i + 4] for i in range(0, 40, 4)]  # flows.nodes.workers.CHUNK samples per task
    assert all(len({(s["pid"], s["thread"]) for s in chunk}) == 1 for chunk in chunks)


def explode_on_r6(item: dict) -> dict:
    if item["key"] == "r6":
        raise ValueError("bad sample")
    return item


def not_r9(item: dict) -> bool:
    return item["key"] != "r9"


@pytest.mark.parametrize("method", ["thread", "process"])
@pytest.mark.parametrize("batched", [True, False])
def test_batch_tasks_raise_in_order_and_count_exactly(method, batched):
    """A failure is raised after the outputs before it, naming the stage and sample; skipped and
    filtered samples are counted exactly, also across a restore in the middle of a chunk."""
    base = Flow.items(records(16)).map(explode_on_r6, name="explode").filter(not_r9)
    flow = base.batch(4) if batched else base
    loader = flow.loader(num_workers=2, method=method, prefetch=0)
    delivered = []
    with pytest.raises(StageError, match=r"stage 'explode' failed on r6: ValueError: bad sample") as info:
        for out in loader:
            delivered.append(out)
    assert (info.value.stage, info.value.sample) == ("explode", "r6")
    assert len(delivered) == (1 if batched else 6)
    loader.close()
    skipping = flow.loader(num_workers=2, method=method, on_error="skip")
    reference = run_epochs(skipping, 1)
    assert (skipping.skipped, skipping.filtered) == (1, 1)
    assert sum(len(b["key"]) for b in reference) == 14 if batched else len(reference) == 14
    check_resume(lambda: flow.loader(num_workers=2, method=method, on_error="skip"),
                 rebuild=lambda: flow.loader(on_error="skip"), points=[2, 5])


@pytest.mark.parametrize("method", ["thread", "process"])
def test_close_cancels_the_work_read_ahead(tmp_path, method):
    """close() with batches read ahead stops every worker before its next sample: at most one
    sample per worker starts after it is called, and no worker is left."""
    loader = Flow.items(logged_records(tmp_path, 64)).map(logged).batch(8).loader(
        num_workers=2, method=method)
    batch = next(iter(loader))
    before = started(tmp_path)
    loader.close()
    after = started(tmp_path)
    assert after - before <= 2 and after < 48  # without cancelling: every task read ahead
    if method == "thread":
        assert not {t for t in alive() if t.startswith("flows-worker-")} & set(batch["thread"])
    else:
        for pid in {int(p) for p in batch["pid"]}:
            assert not _running(pid)
    assert started(tmp_path) == after


def test_sigterm_cancels_the_work_read_ahead(tmp_path):
    """A consumer stopped by SIGTERM leaves no worker process mapping what it had read ahead."""
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from flows import Flow
        from tests.test_workers import logged, logged_records
        loader = Flow.items(logged_records(Path({str(tmp_path)!r}), 64)).map(logged).batch(8).loader(
            num_workers=2, method="process")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script + SERVE_PIDS], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]  # type: ignore[union-attr]
        assert pids
        before = started(tmp_path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.05)
        assert not any(_running(p) for p in pids)
        assert started(tmp_path) - before <= 2  # at most one sample per worker
    finally:
        proc.kill()
        proc.wait()



def torch_threads(item: dict) -> dict:
    return {**item, "threads": torch.get_num_threads()}


def threads_of_a_new_thread() -> int:
    """torch's intra-op thread count as a thread starting now gets it."""
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_thread_workers_use_one_torch_thread_and_leave_the_default_alone():
    default = threads_of_a_new_thread()
    loader = Flow.items(records(8)).map(torch_threads).batch(4).loader(num_workers=2)
    assert {t for b in run_epochs(loader, 1) for t in b["threads"].tolist()} == {1}
    assert threads_of_a_new_thread() == default
    loader.close()


def test_training_threads_leave_half_the_cores_to_the_workers(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert training_threads() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # one rank per core
    assert training_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
    assert training_threads() == 3
