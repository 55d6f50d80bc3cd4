"""The worker pool: it lives across epochs and restores, stops on close(), and a worker process
that dies is reported with the sample it was mapping."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from flows import Flow, FlowsError
from flows.testing import assert_same, run_epochs


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
    """A consumer that dies without closing (os._exit, SIGKILL) leaves no worker behind, and no
    copy of its stdout: a parent reading that stdout to the end is not kept waiting."""
    script = textwrap.dedent("""
        import os, sys
        from flows import Flow
        from tests.test_workers import records, where
        loader = Flow.items(records(40)).map(where).batch(4).loader(num_workers=2, method="process")
        batch = next(iter(loader))
        print(" ".join(str(int(p)) for p in set(batch["pid"].tolist())), flush=True)
        os._exit(0)
    """)
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    pids = [int(p) for p in run.stdout.split()]
    assert pids
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    assert not any(_running(p) for p in pids)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def tensors(item: dict) -> dict:
    """Tensors of several kinds, sizes and layouts, from the item's index."""
    g = torch.Generator().manual_seed(item["i"])
    big = 3_000_000 if item["i"] % 5 == 0 else 10  # 12 MB: more than a worker's shared slot
    return {**item, "audio": torch.randn(2, 4000, generator=g).T,  # not contiguous
            "big": torch.rand(big, generator=g), "ids": torch.arange(item["i"], dtype=torch.int16),
            "half": torch.rand(3, generator=g).to(torch.bfloat16), "empty": torch.zeros(0, 5),
            "nested": [{"x": torch.full((2,), float(item["i"]))}]}


def test_process_workers_return_tensors_exactly():
    """Process workers hand tensors back through shared memory, or the pipe when too large or
    of a dtype numpy lacks: bit for bit what threads give, with dtypes and shapes."""
    flow = Flow.items(records(16)).shuffle(seed=3).map(tensors)
    threads, processes = (run_epochs(flow.loader(num_workers=2, method=m), 2)
                          for m in ("thread", "process"))
    assert len(threads) == len(processes) == 32
    for a, b in zip(threads, processes, strict=True):
        assert_same(a, b)
        assert b["audio"].dtype == torch.float32 and b["audio"].shape == (4000, 2)
        assert b["ids"].dtype == torch.int16 and b["half"].dtype == torch.bfloat16
