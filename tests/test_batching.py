"""Collation, stratified batches, duration buckets, mixing."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from flows import Flow, FlowsError, StageError
from flows.testing import run_epochs


def clips(lengths: list[int]) -> list[dict]:
    return [{"key": f"c{i}", "audio": torch.ones(1, n), "label": i % 2, "id": f"clip{i}",
             "score": 0.5} for i, n in enumerate(lengths)]


def test_fixed_length_collation_keeps_metadata():
    batch = next(iter(Flow.items(clips([5, 7, 9])).pad(6).batch(3).loader()))
    assert batch["audio"].shape == (3, 1, 6)
    assert batch["label"].tolist() == [0, 1, 0]
    assert batch["id"] == ["clip0", "clip1", "clip2"]
    assert batch["score"].dtype == torch.float64 or batch["score"].dtype == torch.float32


def test_numbers_with_gaps_stay_lists():
    records = [{"key": "a", "bits": 16}, {"key": "b", "bits": None}]
    assert next(iter(Flow.items(records).batch(2).loader()))["bits"] == [16, None]


def test_variable_length_collation_has_lengths_and_mask():
    batch = next(iter(Flow.items(clips([5, 7, 3])).batch(3, variable=True).loader()))
    assert batch["audio"].shape == (3, 1, 7)
    assert batch["lengths"].tolist() == [5, 7, 3]
    assert batch["attention_mask"].sum(1).tolist() == [5, 7, 3]
    assert batch["audio"][2, 0, 3:].abs().sum() == 0


def test_unequal_shapes_without_padding_say_what_to_do():
    with pytest.raises(FlowsError, match=r"c0 \[1, 5\], c1 \[1, 7\]\); lengths differ: pad or crop"):
        next(iter(Flow.items(clips([5, 7])).batch(2).loader()))


@pytest.mark.parametrize("variable", [False, True])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_mixed_channel_counts_name_the_samples_and_say_downmix(variable, on_error, prefetch):
    records = [{"key": f"k{i}", "path": f"/data/{'stereo' if i == 2 else 'mono'}{i}.wav",
                "audio": torch.ones(2 if i == 2 else 1, 8 + i)} for i in range(4)]
    flow = Flow.items(records).pad(8) if not variable else Flow.items(records)
    with pytest.raises(StageError) as info:
        list(flow.batch(4, variable=variable).loader(on_error=on_error, prefetch=prefetch))
    message = str(info.value)
    assert re.fullmatch(r"cannot batch field 'audio': shapes differ \(/data/mono0.wav \[1, \d+\], "
                        r"/data/stereo2.wav \[2, \d+\]\); channel counts differ: add \.downmix\(\) "
                        r"before batching", message), message
    assert (info.value.stage, info.value.sample) == ("collate", "/data/mono0.wav")
    batches = list(flow.downmix().batch(4, variable=variable).loader(on_error=on_error, prefetch=prefetch))
    assert batches[0]["audio"].shape[:2] == (4, 1)


def test_stratified_batches_are_balanced():
    records = [{"key": str(i), "label": "a" if i < 30 else ("b" if i < 45 else "c")} for i in range(60)]
    batches = run_epochs(Flow.items(records).shuffle(seed=0).stratify("label", 6).loader(), 1)
    for batch in batches[:7]:  # while every class still has samples
        assert set(Counter(batch["label"]).values()) == {2}
    assert sum(len(b["key"]) for b in batches) == 60


def test_duration_buckets_respect_the_budget_and_group_lengths():
    records = [{"key": str(i), "duration": float(1 + i % 10)} for i in range(100)]
    batches = run_epochs(Flow.items(records).shuffle(seed=0).bucket(max_seconds=20).loader(), 1)
    assert sum(len(b["key"]) for b in batches) == 100
    for b in batches:
        assert sum(b["duration"].tolist()) <= 20 or len(b["key"]) == 1
    spread = [max(b["duration"].tolist()) - min(b["duration"].tolist()) for b in batches]
    assert sum(spread) / len(spread) < 3  # similar lengths together


def test_mix_follows_weights():
    a = Flow.items([{"key": f"a{i}", "src": 0} for i in range(400)]).shuffle(seed=0)
    b = Flow.items([{"key": f"b{i}", "src": 1} for i in range(400)]).shuffle(seed=0)
    items = run_epochs(Flow.mix([a, b], [0.8, 0.2], seed=0).loader(), 1)
    share = sum(i["src"] for i in items[:300]) / 300
    assert 0.12 < share < 0.28


def test_device_stage_applies_batched_transform():
    flow = Flow.items(clips([4, 4])).batch(2).pin().to("cpu", transform=lambda b: {**b, "n": 2})
    batch = next(iter(flow.loader()))
    assert batch["n"] == 2 and batch["audio"].device.type == "cpu"


def test_torchaudio_transform_as_map():
    torchaudio = pytest.importorskip("torchaudio")
    flow = Flow.items(clips([400, 400])).map(torchaudio.transforms.MelSpectrogram(8000, n_mels=16),
                                             field="audio", to="mel").batch(2)
    assert next(iter(flow.loader()))["mel"].shape[:3] == (2, 1, 16)
