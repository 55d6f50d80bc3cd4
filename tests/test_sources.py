"""Sources: file listings, CSV and Parquet tables (streamed by row group), bad input."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile

from flows import ColumnError, EmptySourceError, Flow, StageError
from flows.testing import run_epochs


@pytest.fixture
def wav_dir(tmp_path):
    for sub, n in (("a", 3), ("b", 2)):
        (tmp_path / sub).mkdir()
        for i in range(n):
            soundfile.write(tmp_path / sub / f"{i}.wav", np.zeros(80 * (i + 1)), 8000)
    (tmp_path / "a" / "notes.txt").write_text("not audio")
    return tmp_path


def test_files_listing_is_sorted_recursive_and_filtered(wav_dir):
    keys = [b["key"] for b in run_epochs(Flow.files(str(wav_dir)).loader(), 1)]
    assert keys == ["a/0.wav", "a/1.wav", "a/2.wav", "b/0.wav", "b/1.wav"]
    flat = Flow.files(str(wav_dir / "a"), recursive=False, extensions=[".TXT"]).loader()
    assert [b["key"] for b in flat] == ["notes.txt"]
    globbed = Flow.files(str(wav_dir) + "/**/1.wav").loader()
    assert [b["key"] for b in globbed] == ["a/1.wav", "b/1.wav"]


def test_files_read_decode_end_to_end(wav_dir):
    batch = next(iter(Flow.files(str(wav_dir)).read().decode_audio().batch(5, variable=True).loader()))
    assert batch["lengths"].tolist() == [80, 160, 240, 80, 160]
    assert batch["sample_rate"].tolist() == [8000] * 5
    assert batch["path"][0].endswith("a/0.wav")


def test_empty_source_says_so(tmp_path):
    with pytest.raises(EmptySourceError, match=str(tmp_path)):
        Flow.files(str(tmp_path))


def test_csv_table_columns_where_and_paths(tmp_path):
    frame = pd.DataFrame({"file": [f"x{i}.wav" for i in range(6)], "fold": [1, 1, 2, 2, 3, 3],
                          "label": list("abcabc"), "extra": range(6)})
    frame.to_csv(tmp_path / "meta.csv", index=False)
    flow = Flow.table(str(tmp_path / "meta.csv"), columns=["file", "label"], where={"fold": [1, 3]},
                      path_column="file", root="s3://bucket/audio")
    rows = list(flow.loader())
    assert [r["file"] for r in rows] == ["x0.wav", "x1.wav", "x4.wav", "x5.wav"]
    assert rows[0] == {"file": "x0.wav", "label": "a", "path": "s3://bucket/audio/x0.wav"}
    with pytest.raises(ColumnError, match=r"no column\(s\) \['lable'\].*'label'"):
        Flow.table(str(tmp_path / "meta.csv"), columns=["lable"])
    with pytest.raises(EmptySourceError, match="meta.csv"):
        Flow.table(str(tmp_path / "meta.csv"), where={"fold": 9})


def write_parquet(path, rows: int, payload: int, group: int) -> None:
    table = pa.table({"id": np.arange(rows), "label": np.arange(rows) % 3,
                      "blob": [bytes([i % 256]) * payload for i in range(rows)]})
    pq.write_table(table, path, row_group_size=group)


def test_parquet_filter_and_block_shuffle(tmp_path):
    write_parquet(tmp_path / "t.parquet", rows=100, payload=8, group=10)
    flow = Flow.table(str(tmp_path / "t.parquet"), columns=["id", "label"], where={"label": 0})
    assert [r["id"] for r in flow.loader()] == list(range(0, 100, 3))
    by_callable = Flow.table(str(tmp_path / "t.parquet"), columns=["id", "label"],
                             where=lambda frame: frame["id"] >= 95)
    assert [r["id"] for r in by_callable.loader()] == [95, 96, 97, 98, 99]
    shuffled = Flow.table(str(tmp_path / "t.parquet"), columns=["id"]).shuffle(seed=1, window=2)
    ids = [r["id"] for r in shuffled.loader()]
    assert sorted(ids) == list(range(100)) and ids != list(range(100))
    # block shuffle: each run of 20 rows comes from just two row groups
    for start in range(0, 100, 20):
        assert len({i // 10 for i in ids[start : start + 20]}) == 2


def test_parquet_streaming_memory_is_bounded_by_row_groups(tmp_path):
    """Iterating a table ten times larger must not take ten times the memory."""
    def peak(rows: int) -> int:
        path = tmp_path / f"t{rows}.parquet"
        write_parquet(path, rows=rows, payload=20_000, group=20)
        flow = Flow.table(str(path)).shuffle(seed=0, window=2).batch(5)
        tracemalloc.start()
        for _ in flow.loader(prefetch=1):
            pass
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(200), peak(2000)  # 4 MB and 40 MB of payload
    assert large < 1.5 * small


class Explode:
    def __call__(self, item):
        if item["key"] == "k3":
            raise ValueError("bad sample")
        return item


def records():
    return [{"key": f"k{i}", "path": f"/data/k{i}.wav", "x": i} for i in range(8)]


def test_stage_error_names_the_sample_and_stage():
    flow = Flow.items(records()).map(Explode(), name="explode").batch(2)
    with pytest.raises(StageError, match=r"stage 'explode' failed on /data/k3.wav: ValueError: bad"):
        list(flow.loader(num_workers=2))


def test_corrupt_audio_names_file_and_stage(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wav")
    soundfile.write(tmp_path / "good.wav", np.zeros(10), 8000)
    flow = Flow.files(str(tmp_path)).read().decode_audio()
    with pytest.raises(StageError, match=r"'decode_audio' failed on .*bad.wav"):
        list(flow.loader())
    loader = flow.loader(on_error="skip")
    assert [item["key"] for item in loader] == ["good.wav"] and loader.skipped == 1


def test_skip_count_is_kept_in_state_and_exact_after_resume():
    flow = Flow.items(records()).shuffle(seed=0).map(Explode()).filter(lambda r: r["x"] != 5).batch(2)
    reference = flow.loader(on_error="skip")
    batches = list(reference)
    assert sum(len(b["key"]) for b in batches) == 6
    assert (reference.skipped, reference.filtered) == (1, 1)
    first = flow.loader(on_error="skip", num_workers=2)
    it = iter(first)
    seen = [next(it) for _ in range(len(batches) - 1)]  # the skip and the filter may be in any batch
    resumed = flow.loader(on_error="skip")
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed)
    assert [b["key"] for b in seen + rest] == [b["key"] for b in batches]
    assert (resumed.skipped, resumed.filtered) == (1, 1)
