"""The cache stage: same output as without it, read back memory-mapped, invalidated by changes."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from flows import Cached, Flow, FlowsError, StageError
from flows.stages.cache import describe, load
from flows.testing import assert_same, check_resume, run_epochs


def write_clips(root: Path, n: int = 8) -> Path:
    """Small heterogeneous WAVs: several rates, mono and stereo, int and float."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rate = (8000, 22050, 44100, 48000)[i % 4]
        channels = 1 + i % 2
        data = 0.5 * rng.standard_normal((int(rate * (0.3 + 0.1 * i)), channels))
        soundfile.write(root / f"clip{i}.wav", np.clip(data, -1, 1), rate,
                        subtype=("PCM_16", "FLOAT", "PCM_24")[i % 3])
    return root


class Counting:
    """A deterministic stage that counts its calls (inline and thread workers share it)."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, item: dict) -> dict:
        self.calls += 1
        return item


class Opaque:
    """A value the cache refuses to store."""


@pytest.fixture
def clips(tmp_path: Path) -> Path:
    return write_clips(tmp_path / "clips")


def audio_flow(clips: Path) -> Flow:
    return Flow.files(str(clips)).shuffle(seed=4).read().decode_audio().downmix().resample(16_000)


def test_same_output_as_without_cache_and_hits_later(clips, tmp_path):
    counting = Counting()
    cached = audio_flow(clips).map(counting).cache(tmp_path / "cache").crop(4000).batch(3)
    reference = run_epochs(audio_flow(clips).crop(4000).batch(3).loader(), 3)
    assert_same(run_epochs(cached.loader(num_workers=2), 3), reference)
    assert counting.calls == 8  # computed on the first epoch only
    assert_same(run_epochs(cached.loader(num_workers=2, method="process"), 3), reference)
    assert_same(run_epochs(cached.loader(), 3), reference)  # a new loader: still cached
    assert counting.calls == 8


def test_entries_are_memory_mapped(clips, tmp_path):
    stage = audio_flow(clips).pad(8000).cache(tmp_path / "cache").stages[0]
    assert isinstance(stage, Cached)
    record = Flow.files(str(clips)).source[0]
    first = stage(record)
    path = stage.path(stage.key(record))
    again = load(path)
    assert_same(again, first)
    if sys.platform.startswith("linux"):
        maps = Path("/proc/self/maps").read_text()
        assert os.path.realpath(path) in maps  # the tensor is a view of the file's pages
    again["audio"] += 1  # copy-on-write: the entry itself is unchanged
    assert_same(load(path), first)


@pytest.mark.parametrize(("workers", "method", "resume_workers", "resume_method"), [
    (0, "thread", 2, "thread"),
    (2, "thread", 2, "process"),
])
def test_resume_exact_with_a_partly_filled_cache(clips, tmp_path, workers, method, resume_workers,
                                                  resume_method):
    cached = audio_flow(clips).cache(tmp_path / "cache").crop(3000).batch(2)
    check_resume(lambda: cached.loader(num_workers=workers, method=method),
                 rebuild=lambda: cached.loader(num_workers=resume_workers, method=resume_method),
                 points=[1, 3, 5])
    assert_same(run_epochs(cached.loader(), 2), run_epochs(audio_flow(clips).crop(3000).batch(2)
                                                           .loader(), 2))


def test_invalidated_when_source_or_parameter_changes(clips, tmp_path):
    directory = tmp_path / "cache"
    by_rate = {r: audio_flow(clips).resample(r).cache(directory).stages[0] for r in (8000, 16000)}
    assert by_rate[8000].root != by_rate[16000].root
    assert by_rate[8000].root != audio_flow(clips).resample(8000).cache(directory, version="2").stages[0].root
    assert by_rate[8000].root == audio_flow(clips).resample(8000).cache(directory).stages[0].root

    flow = Flow.files(str(clips)).read().decode_audio().cache(directory)
    before = run_epochs(flow.loader(), 1)
    path = clips / "clip0.wav"
    stat = path.stat()
    soundfile.write(path, np.full(800, 0.25), 8000)  # new content, new size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = run_epochs(flow.loader(), 1)
    assert torch.allclose(after[0]["audio"], torch.full((1, 800), 0.25))
    assert_same(after[1:], before[1:])


def test_keys_ignore_what_changes_no_byte(clips, tmp_path):
    a = Flow.files(str(clips)).read(retries=1).decode_audio().cache(tmp_path).stages[0]
    b = Flow.files(str(clips)).read(retries=9, cache_dir="/tmp/x").decode_audio().cache(tmp_path).stages[0]
    assert a.root == b.root
    assert " at 0x" not in a.description


def test_describe_functions_by_code_and_closure():
    def scale_by(k: float):
        return lambda item: {**item, "x": item["x"] * k}

    assert describe(scale_by(2.0)) == describe(scale_by(2.0))
    assert describe(scale_by(2.0)) != describe(scale_by(3.0))
    assert describe(torch.ones(3)) != describe(torch.zeros(3))
    assert describe({"b": 1, "a": 2}) == describe({"a": 2, "b": 1})


def test_round_trips_any_plain_value_exactly(tmp_path):
    item = {
        "key": "k", "int": 3, "float": 0.1, "none": None, "flag": True, "bytes": b"\x00\x01",
        "list": [1, "a", (2.5, None)], "nested": {"t": torch.arange(6).reshape(2, 3).T},
        "bool": torch.tensor([True, False]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(7),
        "half": torch.randn(3, dtype=torch.bfloat16), "complex": torch.randn(2, dtype=torch.complex64),
        "np": np.float32(1.5), "when": datetime.date(2024, 1, 2),
    }
    stage = Cached([lambda x: x], tmp_path)
    assert_same(stage(item), item)
    out = stage(item)  # the second call reads the entry
    assert_same(out, item)
    assert type(out["list"][2]) is tuple and type(out["np"]) is np.float32


def test_errors_name_the_stage_and_the_sample(clips, tmp_path):
    (clips / "broken.wav").write_bytes(b"RIFF....not audio")
    flow = Flow.files(str(clips)).read().decode_audio().cache(tmp_path)
    with pytest.raises(StageError, match=r"stage 'decode_audio' failed on .*broken\.wav"):
        run_epochs(flow.loader(), 1)
    skipping = flow.loader(on_error="skip")
    assert len(run_epochs(skipping, 1)) == 8 and skipping.skipped == 1
    bad = Flow.items([{"key": "a"}]).map(lambda r: {**r, "obj": Opaque()}).cache(tmp_path)
    with pytest.raises(StageError, match="cannot cache"):
        run_epochs(bad.loader(), 1)


def test_refuses_random_stages_filters_and_remote_directories(clips, tmp_path):
    with pytest.raises(FlowsError, match="random_crop"):
        audio_flow(clips).crop(100).cache(tmp_path)
    with pytest.raises(FlowsError, match="filter"):
        audio_flow(clips).filter(lambda r: True).cache(tmp_path)
    with pytest.raises(FlowsError, match="local directory"):
        audio_flow(clips).cache("s3://bucket/cache")
    with pytest.raises(FlowsError, match="stages before"):
        Flow.files(str(clips)).cache(tmp_path)


def test_unreadable_entry_is_computed_again(clips, tmp_path):
    flow = Flow.files(str(clips)).read().decode_audio().cache(tmp_path / "c")
    reference = run_epochs(flow.loader(), 1)
    stage = flow.stages[0]
    assert isinstance(stage, Cached)
    record = Flow.files(str(clips)).source[0]
    Path(stage.path(stage.key(record))).write_bytes(b"garbage")
    assert_same(run_epochs(flow.loader(), 1), reference)
    stage.clear()
    assert not Path(stage.root).exists()
