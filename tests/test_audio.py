"""Decoding every supported format, downmix, anti-aliased resampling, pad/trim/crop, normalize."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import torch

from flows import Flow
from flows.audio import DecodeAudio, Downmix, Normalize, PadTrim, RandomCrop, Resample


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
