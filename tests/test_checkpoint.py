"""Tests for flows.training.checkpoint: atomic, verified checkpoints on local disk and memory://."""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import struct
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from flows.errors import FlowsError
from flows.training.checkpoint import CheckpointManager, CheckpointWarning, capture_rng, restore_rng


@pytest.fixture(params=["local", "memory"])
def directory(request, tmp_path):
    """A fresh checkpoint directory, either on local disk or on fsspec's in-memory filesystem."""
    if request.param == "local":
        yield str(tmp_path / "ckpts")
    else:
        url = f"memory://flows-ckpt-test-{uuid.uuid4().hex}"
        yield url
        fs = MemoryFileSystem()
        if fs.exists(url):
            fs.rm(url, recursive=True)


def _training_state(step: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
    return {
        "step": step,
        "epoch": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng(),
        "loader": {
            "shard": 3,
            "offset": 1234,
            "order": [5, 1, 4],
            "files": ["a.wav", "b.wav"],
            "nested": {"seed": 7, "weights": [0.5, 0.25]},
        },
        "metrics": {"loss": 0.125, "best": None, "name": "val"},
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def _corrupt(manager: CheckpointManager, url: str, how: str) -> None:
    fs, path = manager.fs, url if manager.local else MemoryFileSystem._strip_protocol(url)
    data = bytearray(fs.cat_file(path))
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) * 3 // 4] ^= 0x10
    fs.pipe_file(path, bytes(data))


def test_round_trip_with_optimizer_scheduler_and_rng(directory):
    manager = CheckpointManager(directory)
    state = _training_state(step=10)
    url = manager.save(state, step=10)
    assert url.endswith("ckpt-0000000010.pt")
    assert manager.list() == [url]
    loaded = manager.load(url)
    _assert_same(state, loaded)
    assert manager.latest_valid() is not None
    latest_url, latest = manager.latest_valid()  # type: ignore[misc]
    assert latest_url == url
    _assert_same(state, latest)

    # the optimizer and scheduler state dicts load back into fresh objects
    model = torch.nn.Linear(4, 3)
    model.load_state_dict(loaded["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    scheduler.load_state_dict(loaded["scheduler"])
    assert scheduler.last_epoch == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)
    _assert_same(optimizer.state_dict(), state["optimizer"])


def test_urls_are_local_paths_or_fsspec_urls(directory, tmp_path):
    manager = CheckpointManager(directory)
    url = manager.save({"x": 1}, step=1)
    if directory.startswith("memory://"):
        assert url.startswith("memory://") and url.endswith("/ckpt-0000000001.pt")
        assert isinstance(manager.fs, MemoryFileSystem)
    else:
        assert url == os.path.join(str(tmp_path / "ckpts"), "ckpt-0000000001.pt")
        assert isinstance(manager.fs, LocalFileSystem)
        assert os.path.isfile(url)


def test_keep_last_k(directory):
    manager = CheckpointManager(directory, keep=2)
    urls = [manager.save({"step": step}, step=step) for step in (1, 2, 3, 4, 5)]
    assert manager.list() == [urls[4], urls[3]]
    assert manager.load(manager.list()[-1]) == {"step": 4}


def test_list_is_newest_first_by_step_not_name_order(directory):
    manager = CheckpointManager(directory, keep=10)
    for step in (20, 3, 100):
        manager.save({"step": step}, step=step)
    steps = [manager.load(url)["step"] for url in manager.list()]
    assert steps == [100, 20, 3]


def test_empty_directory(directory):
    manager = CheckpointManager(directory)
    assert manager.list() == []
    assert manager.latest_valid() is None


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_corrupt_newest_warns_and_falls_back(directory, how):
    manager = CheckpointManager(directory)
    good = manager.save({"step": 1, "w": torch.arange(1000.0)}, step=1)
    bad = manager.save({"step": 2, "w": torch.arange(1000.0) * 2}, step=2)
    _corrupt(manager, bad, how)

    with pytest.raises(FlowsError, match="ckpt-0000000002.pt"):
        manager.load(bad)
    with pytest.warns(CheckpointWarning) as record:
        result = manager.latest_valid()
    assert result is not None
    url, state = result
    assert url == good and state["step"] == 1
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "ckpt-0000000002.pt" in messages[0]
    reason = "truncated" if how == "truncate" else "sha256"
    assert reason in messages[0]


def test_truncated_to_less_than_header_and_empty_file(directory):
    manager = CheckpointManager(directory)
    manager.save({"step": 1}, step=1)
    bad = manager.save({"step": 2}, step=2)
    path = bad if manager.local else MemoryFileSystem._strip_protocol(bad)
    for data in (b"", b"FLOWS"):
        manager.fs.pipe_file(path, data)
        with pytest.raises(FlowsError, match="ckpt-0000000002.pt.*truncated"):
            manager.load(bad)
    with pytest.warns(CheckpointWarning, match="ckpt-0000000002.pt"):
        assert manager.latest_valid()[1] == {"step": 1}  # type: ignore[index]


def test_every_checkpoint_corrupt_returns_none(directory):
    manager = CheckpointManager(directory)
    for step in (1, 2):
        _corrupt(manager, manager.save({"step": step}, step=step), "bitflip")
    with pytest.warns(CheckpointWarning) as record:
        assert manager.latest_valid() is None
    assert len(record) == 2


def test_no_temp_files_left_after_save(directory):
    manager = CheckpointManager(directory, keep=2)
    for step in range(4):
        manager.save({"step": step}, step=step)
    paths = manager.fs.ls(manager.root, detail=False)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in paths)
    assert names == ["ckpt-0000000002.pt", "ckpt-0000000003.pt"]


def test_crash_during_local_rename_keeps_previous(tmp_path, monkeypatch):
    manager = CheckpointManager(str(tmp_path))
    good = manager.save({"step": 1}, step=1)
    with open(good, "rb") as f:
        before = f.read()

    def crash(*args, **kwargs):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        manager.save({"step": 2}, step=2)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000000001.pt"]  # temp file cleaned up
    with open(good, "rb") as f:
        assert f.read() == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert manager.latest_valid() == (good, {"step": 1})


def test_crash_during_local_write_keeps_previous(tmp_path, monkeypatch):
    manager = CheckpointManager(str(tmp_path))
    good = manager.save({"step": 1}, step=1)

    def crash(fd):
        raise OSError("simulated power loss before fsync")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="simulated power loss"):
        manager.save({"step": 2}, step=2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000000001.pt"]
    assert manager.latest_valid() == (good, {"step": 1})


def test_crash_during_remote_move_keeps_previous(monkeypatch):
    manager = CheckpointManager(f"memory://flows-ckpt-test-{uuid.uuid4().hex}")
    good = manager.save({"step": 1}, step=1)

    def crash(self, *args, **kwargs):
        raise OSError("simulated crash during move")

    monkeypatch.setattr(MemoryFileSystem, "mv", crash)
    with pytest.raises(OSError, match="simulated crash"):
        manager.save({"step": 2}, step=2)
    monkeypatch.undo()

    assert [p.rsplit("/", 1)[-1] for p in manager.fs.ls(manager.root, detail=False)] == [
        "ckpt-0000000001.pt"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert manager.latest_valid() == (good, {"step": 1})
    manager.fs.rm(manager.root, recursive=True)


def test_partial_remote_object_is_detected(monkeypatch):
    """An upload that died half-way and left a short object under the final name is caught."""
    manager = CheckpointManager(f"memory://flows-ckpt-test-{uuid.uuid4().hex}")
    good = manager.save({"step": 1}, step=1)
    real_pipe = MemoryFileSystem.pipe_file

    def partial_pipe(self, path, value, **kwargs):
        real_pipe(self, manager._path(2), value[: len(value) - 7], **kwargs)
        raise OSError("connection reset")

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", partial_pipe)
    with pytest.raises(OSError):
        manager.save({"step": 2}, step=2)
    monkeypatch.undo()
    assert len(manager.list()) == 2
    with pytest.warns(CheckpointWarning, match="ckpt-0000000002.pt.*truncated"):
        assert manager.latest_valid() == (good, {"step": 1})
    manager.fs.rm(manager.root, recursive=True)


class _Custom:
    """An arbitrary picklable object that weights_only loading must refuse."""

    def __init__(self, value: int) -> None:
        self.value = value


def test_arbitrary_pickled_object_is_refused(directory):
    manager = CheckpointManager(directory)
    good = manager.save({"step": 1}, step=1)
    bad = manager.save({"step": 2, "thing": _Custom(3)}, step=2)
    with pytest.raises(FlowsError, match="ckpt-0000000002.pt.*weights_only"):
        manager.load(bad)
    with pytest.warns(CheckpointWarning, match="ckpt-0000000002.pt"):
        assert manager.latest_valid() == (good, {"step": 1})


def test_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ckpt-0000000001.pt"
    torch.save({"step": 1}, path)  # plain torch.save, no flows header
    manager = CheckpointManager(str(tmp_path))
    with pytest.raises(FlowsError, match="ckpt-0000000001.pt.*magic"):
        manager.load(str(path))


def test_load_missing_file_names_it(tmp_path):
    manager = CheckpointManager(str(tmp_path))
    with pytest.raises(FlowsError, match="ckpt-0000000009.pt.*does not exist"):
        manager.load(str(tmp_path / "ckpt-0000000009.pt"))


def test_other_files_are_ignored(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "ckpt-latest.pt").write_text("not a step")
    manager = CheckpointManager(str(tmp_path), keep=1)
    url = manager.save({"step": 1}, step=1)
    manager.save({"step": 0}, step=0)  # an older step never evicts the checkpoint just written
    assert manager.list() == [url, str(tmp_path / "ckpt-0000000000.pt")]
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "ckpt-latest.pt").exists()


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        CheckpointManager(str(tmp_path), keep=0)
    with pytest.raises(ValueError):
        CheckpointManager(str(tmp_path)).save({}, step=-1)


def _draw() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        float(np.random.normal()),
        torch.rand(3).tolist(),
        torch.randn(2).tolist(),
    )


def test_restore_rng_reproduces_random_numpy_torch(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in python's and numpy's state
    np.random.normal()
    state = capture_rng()
    expected = _draw()

    # round-trip through a weights_only checkpoint before restoring
    manager = CheckpointManager(str(tmp_path))
    manager.save({"rng": state}, step=0)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restored = manager.latest_valid()
    assert restored is not None
    restore_rng(restored[1]["rng"])
    assert _draw() == expected

    restore_rng(state)
    assert _draw() == expected


def test_capture_rng_loads_with_weights_only(tmp_path):
    path = tmp_path / "rng.pt"
    torch.save(capture_rng(), path)
    state = torch.load(path, weights_only=True)
    assert set(state) >= {"python", "numpy", "torch"}


# --------------------------------------------------------------------------- leftovers

_WRITER = """
import sys, torch
from flows.training.checkpoint import CheckpointManager
manager, state = CheckpointManager(sys.argv[1], keep=1), {"w": torch.zeros(16 * 2**20)}
for step in range(200):
    manager.save(state, step)
"""


def _temps(directory: Path, pid: int | None = None) -> list[str]:
    return sorted(p.name for p in directory.glob(".ckpt-*.tmp")
                  if pid is None or f".{pid}." in p.name)


def _caught_mid_write(directory: Path, signum: int) -> subprocess.Popen:
    """A real process saving 64 MB checkpoints into ``directory`` in a loop, sent ``signum``
    (SIGKILL or SIGSTOP) while its temporary file is there; tried until one stays behind."""
    root = Path(__file__).resolve().parents[1]
    for _ in range(5):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(directory)], cwd=root,
                                  env={**os.environ, "PYTHONPATH": str(root)})
        for _ in range(2_000_000):  # bounded: until a temporary file of it shows
            if _temps(directory, writer.pid) or writer.poll() is not None:
                break
        os.kill(writer.pid, signum)
        if signum == signal.SIGKILL:
            writer.wait(timeout=60)
        else:
            os.waitpid(writer.pid, os.WUNTRACED)  # returns once it is stopped
        if _temps(directory, writer.pid):
            return writer
        os.kill(writer.pid, signal.SIGKILL)  # it had renamed it just in time: again
        writer.wait(timeout=60)
    raise AssertionError("no writer was caught mid-write in 5 tries")


def test_temp_files_of_dead_writers_are_cleaned_not_those_of_live_ones(tmp_path):
    """One writer is SIGKILLed mid-write, another stopped (SIGSTOP) mid-write, and old temps
    of older versions and of another host lie there too: the next save removes the dead
    writer's and the day-old ones, keeps the live writer's and the fresh foreign one; once
    the live writer is killed, its temp goes at the next save."""
    live = _caught_mid_write(tmp_path, signal.SIGSTOP)
    try:
        dead = _caught_mid_write(tmp_path, signal.SIGKILL)
        old_style = tmp_path / ".ckpt-0000000007.pt.k2j4_x9q.tmp"  # mkstemp's, no writer named
        foreign = tmp_path / ".ckpt-0000000008.pt.otherhost.4242.0123456789ab.tmp"
        fresh_foreign = tmp_path / ".ckpt-0000000009.pt.otherhost.4243.0123456789ab.tmp"
        for path in (old_style, foreign, fresh_foreign):
            path.write_bytes(b"partial")
        day_and_a_bit = time.time() - 25 * 3600
        for path in (old_style, foreign):
            os.utime(path, (day_and_a_bit, day_and_a_bit))
        live_temps = _temps(tmp_path, live.pid)
        assert _temps(tmp_path, dead.pid)
        manager = CheckpointManager(str(tmp_path), keep=10)
        manager.save({"step": 1000}, step=1000)
        assert _temps(tmp_path) == sorted([*live_temps, fresh_foreign.name])
    finally:
        live.kill()
        live.wait(timeout=60)
    manager.save({"step": 1001}, step=1001)
    assert _temps(tmp_path) == [fresh_foreign.name]


def test_stray_files_under_checkpoint_names_are_ignored_never_pruned(directory):
    """A junk ``ckpt-9999999999.pt`` and a checkpoint renamed to another step take no keep
    slot, are never returned, never deleted, and warned about once each."""
    manager = CheckpointManager(directory, keep=2)
    first = manager.save({"step": 1}, step=1)
    stray, renamed = (f"{manager.root}/ckpt-999999999{n}.pt" for n in (9, 8))
    manager.fs.pipe_file(stray, b"some other tool's file")
    manager.fs.pipe_file(renamed, manager.fs.cat_file(first if manager.local else
                                                      MemoryFileSystem._strip_protocol(first)))
    with pytest.warns(CheckpointWarning) as record:
        urls = [manager.save({"step": step}, step=step) for step in (2, 3, 4)]
    assert sorted(str(w.message).split()[1].rsplit("/", 1)[1] for w in record) == [
        "ckpt-9999999998.pt:", "ckpt-9999999999.pt:"]
    assert manager.list() == [urls[2], urls[1]]
    assert manager.fs.exists(stray) and manager.fs.exists(renamed)
    with pytest.raises(FlowsError, match="ckpt-9999999998.pt holds step 1: a copy renamed"):
        manager.load(renamed if manager.local else f"memory://{renamed}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per manager, and nothing to skip
        assert manager.latest_valid() == (urls[2], {"step": 4})


def test_format_1_checkpoints_still_load_and_count(tmp_path):
    """Checkpoints written before the header named the step load as before."""
    payload = io.BytesIO()
    torch.save({"step": 5}, payload)
    data = payload.getvalue()
    header = struct.pack(">12sQ32s", b"FLOWS-CKPT\x00\x01", len(data), hashlib.sha256(data).digest())
    (tmp_path / "ckpt-0000000005.pt").write_bytes(header + data)
    manager = CheckpointManager(str(tmp_path))
    assert manager.latest_valid() == (str(tmp_path / "ckpt-0000000005.pt"), {"step": 5})
