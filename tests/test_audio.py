"""Decoding every supported format, downmix, anti-aliased resampling, pad/trim/crop, normalize."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import soundfile
import torch

from flows import Flow, StageError
from flows.stages.audio import DecodeAudio, Downmix, Normalize, PadTrim, RandomCrop, Resample
from flows.testing import assert_same, run_epochs


def encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def tone(freq: float, rate: int, seconds: float = 0.5, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


@pytest.mark.parametrize(("fmt", "subtype", "tolerance"), [
    ("WAV", "PCM_U8", 1e-2), ("WAV", "PCM_16", 1e-4), ("WAV", "PCM_24", 1e-6),
    ("WAV", "PCM_32", 1e-6), ("WAV", "FLOAT", 1e-7), ("FLAC", "PCM_24", 1e-6),
    ("OGG", "VORBIS", 0.1), ("MP3", "MPEG_LAYER_III", 0.2),
])
def test_decode_formats(fmt, subtype, tolerance):
    original = tone(440, 16000, channels=2)
    item = DecodeAudio()({"bytes": encode(original, 16000, fmt, subtype), "key": "k"})
    audio = item["audio"]
    assert audio.dtype == torch.float32 and audio.shape[0] == 2 and item["sample_rate"] == 16000
    assert "bytes" not in item
    if fmt in ("OGG", "MP3"):  # lossy: compare energy, frames may be padded by the codec
        assert abs(audio.pow(2).mean().item() - 0.125) < tolerance
    else:
        assert np.abs(audio.numpy().T - original).max() < tolerance


def test_decode_hugging_face_struct():
    data = encode(tone(300, 8000), 8000, "FLAC")
    item = DecodeAudio("audio")({"audio": {"bytes": data, "path": "x.flac"}})
    assert item["sample_rate"] == 8000 and item["audio"].shape == (1, 4000)


def test_downmix_and_normalize():
    item = {"audio": torch.tensor([[1.0, -1.0], [3.0, 1.0]]), "sample_rate": 8000}
    mono = Downmix()(item)["audio"]
    assert torch.equal(mono, torch.tensor([[2.0, 0.0]]))
    assert Normalize()({"audio": mono})["audio"].abs().max() == pytest.approx(1.0, abs=1e-6)
    standard = Normalize("standard")({"audio": torch.randn(1, 1000) * 5 + 3})["audio"]
    assert abs(standard.mean().item()) < 1e-5 and standard.std().item() == pytest.approx(1, abs=1e-4)


def test_resample_is_anti_aliased():
    """A 6 kHz tone has no place at 8 kHz (Nyquist 4 kHz): a real resampler removes it, where
    decimation would fold it down to 2 kHz."""
    rate = 16000
    item = {"audio": torch.from_numpy(tone(6000, rate, 1.0)).float()[None], "sample_rate": rate}
    out = Resample(8000)(item)
    assert out["sample_rate"] == 8000 and out["audio"].shape == (1, 8000)
    assert out["audio"].pow(2).mean() < 1e-3 * item["audio"].pow(2).mean()
    decimated = item["audio"][:, ::2]
    assert decimated.pow(2).mean() > 0.5 * item["audio"].pow(2).mean()
    inband = {"audio": torch.from_numpy(tone(1000, rate, 1.0)).float()[None], "sample_rate": rate}
    kept = Resample(8000)(inband)["audio"]
    assert kept.pow(2).mean() == pytest.approx(0.125, rel=0.02)


def test_resample_torchaudio_backend():
    pytest.importorskip("torchaudio")
    item = {"audio": torch.from_numpy(tone(1000, 16000, 1.0)).float()[None], "sample_rate": 16000}
    out = Resample(8000, backend="torchaudio")(item)
    assert out["audio"].shape == (1, 8000)


def test_pad_trim_and_crop():
    item = {"audio": torch.arange(10.0)[None]}
    assert PadTrim(4)(item)["audio"].tolist() == [[0, 1, 2, 3]]
    assert PadTrim(12)(item)["audio"].tolist() == [[*range(10), 0, 0]]
    crop = RandomCrop(4)
    a = crop(item, np.random.default_rng(7))["audio"]
    b = crop(item, np.random.default_rng(7))["audio"]
    assert torch.equal(a, b) and a.shape == (1, 4)
    assert RandomCrop(12)(item, np.random.default_rng(0))["audio"].shape == (1, 12)


def test_crop_draws_depend_on_sample_and_epoch_not_workers():
    records = [{"key": f"k{i}", "audio": torch.arange(100.0)[None]} for i in range(8)]
    flow = Flow.items(records).shuffle(seed=0).crop(10).batch(8)
    serial, parallel = flow.loader(), flow.loader(num_workers=3)
    e0, e1 = list(serial), list(serial)
    assert torch.equal(e0[0]["audio"], list(parallel)[0]["audio"])
    starts0 = {k: a[0, 0].item() for k, a in zip(e0[0]["key"], e0[0]["audio"], strict=True)}
    starts1 = {k: a[0, 0].item() for k, a in zip(e1[0]["key"], e1[0]["audio"], strict=True)}
    assert starts0 != starts1  # a new epoch draws new windows


# ---- reading only what is kept, decoding without Python callbacks -----------------------------


class Same:
    """An identity stage: between resample and pad/crop it makes the flow take the full path."""

    name = "same"

    def __call__(self, item: dict) -> dict:
        return item


@pytest.fixture
def clips(tmp_path):
    """Clips of several rates, channel counts and formats, 2-8 s long."""
    rng = np.random.default_rng(0)
    specs = [(44100, 2, "WAV", "PCM_16"), (22050, 3, "FLAC", "PCM_24"), (16000, 1, "WAV", "FLOAT"),
             (48000, 2, "WAV", "PCM_24"), (8000, 1, "FLAC", "PCM_16"), (48000, 1, "OGG", "VORBIS")]
    for i, (rate, channels, fmt, subtype) in enumerate(specs):
        samples = (0.2 * rng.standard_normal((int(rate * (2 + 1.3 * i)), channels))).astype(np.float32)
        ext = {"WAV": "wav", "FLAC": "flac", "OGG": "ogg"}[fmt]
        soundfile.write(tmp_path / f"clip{i}.{ext}", samples, rate, format=fmt, subtype=subtype)
    return tmp_path


class CountFrames:
    """Counts the frames libsndfile decodes (soundfile.SoundFile.read wrapped)."""

    def __init__(self, monkeypatch):
        self.frames = 0
        read = soundfile.SoundFile.read

        def counting(f, *args, **kwargs):
            out = read(f, *args, **kwargs)
            self.frames += len(out)
            return out

        monkeypatch.setattr(soundfile.SoundFile, "read", counting)


@pytest.mark.parametrize("op", ["pad", "crop"])
@pytest.mark.parametrize("length", [8000, 200_000])
def test_windowed_reads_are_bit_identical_to_the_full_path(clips, op, length, monkeypatch):
    base = Flow.files(str(clips)).shuffle(seed=3).read().decode_audio().downmix().resample(16_000)
    windowed = getattr(base, op)(length).batch(6)
    full = getattr(base.map(Same()), op)(length).batch(6)
    counter = CountFrames(monkeypatch)
    reference = run_epochs(full.loader(), 2)
    full_frames, counter.frames = counter.frames, 0
    for loader in (windowed.loader(), windowed.loader(num_workers=2),
                   windowed.loader(num_workers=2, method="process")):
        assert_same(run_epochs(loader, 2), reference)
    counter.frames = 0
    assert_same(run_epochs(windowed.loader(), 2), reference)
    if length == 8000:  # half a second of 2-10 s clips: much less is decoded (Ogg: all of it)
        ogg = 2 * soundfile.info(clips / "clip5.ogg").frames
        # pad: the start; crop: from the start to the window's end (see flows.stages.audio), ~half
        assert counter.frames - ogg < (full_frames - ogg) * (0.25 if op == "pad" else 0.75)
    else:  # longer than every clip: everything is read, nothing more
        assert counter.frames == full_frames


def test_a_window_without_resampling_is_read_by_seeking(tmp_path, monkeypatch):
    samples = np.random.default_rng(1).standard_normal((16000 * 20, 2)).astype(np.float32) * 0.1
    soundfile.write(tmp_path / "long.flac", samples, 16000, subtype="PCM_24")
    flow = Flow.files(str(tmp_path)).read().decode_audio().downmix()
    counter = CountFrames(monkeypatch)
    windowed = run_epochs(flow.crop(4000).batch(1).loader(), 3)
    assert counter.frames == 3 * 4000  # exactly the three windows, each from its own seek
    assert_same(windowed, run_epochs(flow.map(Same()).crop(4000).batch(1).loader(), 3))


def test_read_keeps_bytes_unless_a_decoder_reads_the_file(clips):
    record = {"path": str(clips / "clip0.wav")}
    raw = Flow.items([record]).read().map(lambda item: {**item, "n": len(item["bytes"])})
    assert next(iter(raw.loader()))["n"] == (clips / "clip0.wav").stat().st_size
    missing = Flow.items([{"path": str(clips / "nope.wav")}]).read().decode_audio()
    with pytest.raises(StageError, match=r"'read' failed on .*nope.wav: ObjectNotFoundError"):
        list(missing.loader())


# ---- segments: one row per example, a file and a part of it --------------------------------------


@pytest.fixture
def long_clip(tmp_path):
    samples = (0.3 * np.random.default_rng(2).standard_normal((44100 * 6, 2))).astype(np.float32)
    soundfile.write(tmp_path / "talk.wav", samples, 44100, subtype="PCM_16")
    return tmp_path, soundfile.read(tmp_path / "talk.wav", dtype="float32", always_2d=True)[0].T


@pytest.mark.parametrize("layout", ["start_end_seconds", "offset_duration_seconds", "start_stop_frames"])
def test_segments_read_only_their_part(long_clip, layout, monkeypatch):
    root, audio = long_clip
    starts, ends = [0.5, 2.25], [1.5, 5.0]  # two rows of one file
    columns = {"path": ["talk.wav", "talk.wav"]}
    if layout == "start_end_seconds":  # hand-written annotation CSVs
        columns |= {"start": starts, "end": ends}
        options = {"start": "start", "end": "end"}
    elif layout == "offset_duration_seconds":  # lhotse supervisions
        columns |= {"offset": starts, "duration": [e - s for s, e in zip(starts, ends, strict=True)]}
        options = {"start": "offset", "duration": "duration"}
    else:  # SpeechBrain-style sample indices
        columns |= {"start": [round(s * 44100) for s in starts], "stop": [round(e * 44100) for e in ends]}
        options = {"start": "start", "end": "stop", "unit": "frames"}
    pd.DataFrame(columns).to_csv(root / "segments.csv", index=False)
    table = Flow.table(str(root / "segments.csv"), path_column="path", root=str(root))
    counter = CountFrames(monkeypatch)
    items = list(table.read().decode_audio(**options).loader())
    parts = [(round(s * 44100), round(e * 44100)) for s, e in zip(starts, ends, strict=True)]
    assert counter.frames == sum(last - first for first, last in parts)
    for item, (first, last) in zip(items, parts, strict=True):
        assert torch.equal(item["audio"], torch.from_numpy(audio[:, first:last]))
    # a bounded chain reads inside the segment only, with the same output as the full path
    chain = table.read().decode_audio(**options).downmix().resample(16_000)
    for op in ("pad", "crop"):
        assert_same(run_epochs(getattr(chain, op)(8000).batch(2).loader(), 2),
                    run_epochs(getattr(chain.map(Same()), op)(8000).batch(2).loader(), 2))


def test_segment_outside_the_file_is_a_decode_error(long_clip):
    root, _ = long_clip
    pd.DataFrame({"path": ["talk.wav"], "start": [5.0], "end": [9.0]}).to_csv(root / "s.csv", index=False)
    flow = Flow.table(str(root / "s.csv"), path_column="path", root=str(root)).read()
    with pytest.raises(StageError, match=r"'decode_audio' failed on .*talk.wav: .*outside"):
        list(flow.decode_audio(start="start", end="end").loader())


def test_remote_segment_is_read_by_range_requests(tmp_path, fault_proxy, s3_bucket, s3_options):
    import fsspec

    samples = (0.1 * np.random.default_rng(3).standard_normal(16000 * 300)).astype(np.float32)
    soundfile.write(tmp_path / "long.wav", samples, 16000, subtype="PCM_16")
    prefix = f"{s3_bucket}/segments-{tmp_path.name}"
    fs = fsspec.filesystem("s3", **s3_options)
    fs.put(str(tmp_path / "long.wav"), f"{prefix}/long.wav")
    pd.DataFrame({"path": ["long.wav"], "start": [250.0], "end": [251.0]}).to_csv(tmp_path / "t.csv")
    proxy = fault_proxy(rate=0.0)
    flow = (Flow.table(str(tmp_path / "t.csv"), path_column="path", root=prefix,
                       storage_options=proxy.storage_options())
            .read().decode_audio(start="start", end="end"))
    item = next(iter(flow.loader()))
    expected = soundfile.read(tmp_path / "long.wav", dtype="float32")[0][250 * 16000 : 251 * 16000]
    assert torch.equal(item["audio"][0], torch.from_numpy(expected))
    size = (tmp_path / "long.wav").stat().st_size
    assert proxy.bytes_sent < size / 5, (proxy.bytes_sent, size)


# ---- bad audio: non-finite samples, truncated files --------------------------------------------


def bad_clips(root):
    """Files sorted bad first: a NaN, an Inf, a truncated WAV, then a good one."""
    samples = (0.1 * np.random.default_rng(0).standard_normal((50800, 1))).astype(np.float32)
    with_nan, with_inf = samples.copy(), samples.copy()
    with_nan[100], with_inf[400] = np.nan, -np.inf
    soundfile.write(root / "a_nan.wav", with_nan, 16000, subtype="FLOAT")
    soundfile.write(root / "b_inf.flac", np.clip(samples, -1, 1), 16000)  # FLAC holds no Inf: ok
    soundfile.write(root / "b_inf.wav", with_inf, 16000, subtype="DOUBLE")
    whole = encode(samples, 16000, "WAV", "PCM_16")
    (root / "c_truncated.wav").write_bytes(whole[: 44 + 25389 * 2])  # header says 50,800 frames
    soundfile.write(root / "d_good.wav", samples, 16000)
    return root


CHAINS = {"decode": lambda flow: flow, "pad": lambda flow: flow.pad(1000),
          "resample+crop": lambda flow: flow.resample(8000).crop(1000)}


@pytest.mark.parametrize("chain", CHAINS)
def test_non_finite_and_truncated_audio_are_decode_errors(tmp_path, chain):
    """Whether decoding everything or (pad, crop) only the window kept: the frames read are checked."""
    bad_clips(tmp_path)
    truncated = "truncated: .* holds 25389 frames, 50778 of the 101600 bytes its header announces"
    for name, reason in [("a_nan.wav", "1 non-finite samples"), ("b_inf.wav", "1 non-finite samples"),
                         ("c_truncated.wav", truncated)]:
        one = CHAINS[chain](Flow.items([{"path": str(tmp_path / name)}]).read().decode_audio())
        message = rf"stage 'decode_audio' failed on .*{name}: BadAudioError: {reason}"
        with pytest.raises(StageError, match=message):
            list(one.loader())
    loader = CHAINS[chain](Flow.files(str(tmp_path)).read().decode_audio()).batch(1).loader(on_error="skip")
    assert [b["key"] for b in loader] == [["b_inf.flac"], ["d_good.wav"]] and loader.skipped == 3


def test_table_recipe_reads_segments(long_clip, monkeypatch):
    from recipes.table import TableRecipe

    root, audio = long_clip
    pd.DataFrame({"path": ["talk.wav"] * 4, "label": ["yes", "no", "yes", "no"],
                  "split": ["train"] * 3 + ["test"], "start": [0.0, 1.0, 3.0, 0.5],
                  "stop": [1.0, 2.5, 3.5, 1.0]}).to_csv(root / "meta.csv", index=False)
    config = TableRecipe.Config(data_dir=str(root), table="meta.csv", split_column="split",
                                start_column="start", end_column="stop", columns="path,label",
                                sample_rate=44100, mono=False, batch_size=3)
    counter = CountFrames(monkeypatch)
    (batch,) = list(TableRecipe(config).train_flow().loader())
    assert counter.frames == round(3.0 * 44100)  # the three parts, nothing else
    order = [round(start * 44100) for start in batch["start"].tolist()]
    lengths = {0: 44100, 44100: 66150, 132300: 22050}
    for row, first in enumerate(order):
        n = lengths[first]
        assert torch.equal(batch["audio"][row, :, :n], torch.from_numpy(audio[:, first : first + n]))


@pytest.mark.parametrize(("fmt", "reason"), [
    ("WAV", "truncated"), ("AIFF", "truncated"), ("W64", "truncated"), ("RF64", "truncated"),
    ("AU", "truncated"), ("FLAC", "cannot decode .*lost sync"), ("CAF", "cannot decode .*malformed"),
])
def test_truncated_files_are_decode_errors(fmt, reason):
    """Half of each file (bytes in memory: the path a remote file or a Parquet column takes)."""
    whole = encode((0.1 * np.random.default_rng(0).standard_normal(50800)).astype(np.float32), 16000,
                   fmt, "PCM_16")
    records = [{"key": "cut", "bytes": whole[: len(whole) // 2]}, {"key": "whole", "bytes": whole}]
    flow = Flow.items(records).decode_audio().pad(60000).batch(1)
    with pytest.raises(StageError, match=rf"stage 'decode_audio' failed on cut: BadAudioError: {reason}"):
        list(flow.loader())
    loader = flow.loader(on_error="skip")
    assert [b["key"] for b in loader] == [["whole"]] and loader.skipped == 1
