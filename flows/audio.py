"""Audio stages: decode, downmix, resample, normalize, pad/trim and random crop.

Items are dicts; after decoding they hold ``audio`` (float32 tensor, channels x frames) and
``sample_rate``. Resampling uses soxr (a maintained, anti-aliased resampler) by default, or
torchaudio's windowed-sinc kernel (cached per rate pair) when it is installed.
"""

from __future__ import annotations

import functools
import io as _io
from typing import Any, Literal

import numpy as np
import soundfile
import torch

from flows.stages import Stage


class DecodeAudio(Stage):
    """Decode WAV (8/16/24/32-bit integer or float), FLAC, OGG or MP3 bytes with soundfile.

    ``item[field]`` is raw bytes or a Hugging Face ``{"bytes", "path"}`` audio struct. The bytes
    are dropped from the output to keep items small."""

    name = "decode_audio"

    def __init__(self, field: str = "bytes"):
        self.field = field

    def __call__(self, item: dict) -> dict:
        data = item[self.field]
        if isinstance(data, dict):
            data = data["bytes"]
        samples, rate = soundfile.read(_io.BytesIO(data), dtype="float32", always_2d=True)
        out = {k: v for k, v in item.items() if k != self.field}
        out["audio"] = torch.from_numpy(np.ascontiguousarray(samples.T))
        out["sample_rate"] = int(rate)
        return out


class Downmix(Stage):
    """Average the channels into one: (channels, frames) -> (1, frames)."""

    name = "downmix"

    def __call__(self, item: dict) -> dict:
        return {**item, "audio": item["audio"].mean(dim=0, keepdim=True)}


@functools.lru_cache(maxsize=64)
def _torchaudio_kernel(orig: int, new: int) -> Any:
    import torchaudio  # optional extra

    return torchaudio.transforms.Resample(orig, new)


class Resample(Stage):
    """Resample to ``rate`` with an anti-aliasing resampler (never decimation).

    ``backend="soxr"`` (default, soxr's "HQ" quality) or ``"torchaudio"`` (kernels cached per
    rate pair; needs the ``torchaudio`` extra)."""

    name = "resample"

    def __init__(self, rate: int, backend: Literal["soxr", "torchaudio"] = "soxr",
                 quality: str = "HQ"):
        self.rate, self.backend, self.quality = rate, backend, quality

    def __call__(self, item: dict) -> dict:
        orig = item["sample_rate"]
        if orig == self.rate:
            return item
        audio = item["audio"]
        if self.backend == "torchaudio":
            resampled = _torchaudio_kernel(orig, self.rate)(audio)
        else:
            import soxr

            out = soxr.resample(audio.T.numpy(), orig, self.rate, quality=self.quality)
            resampled = torch.from_numpy(np.ascontiguousarray(out.reshape(len(out), -1).T))
        return {**item, "audio": resampled, "sample_rate": self.rate}


class Normalize(Stage):
    """Scale to peak 1 (``"peak"``) or to zero mean and unit variance (``"standard"``)."""

    name = "normalize"

    def __init__(self, mode: Literal["peak", "standard"] = "peak", eps: float = 1e-8):
        self.mode, self.eps = mode, eps

    def __call__(self, item: dict) -> dict:
        audio = item["audio"]
        if self.mode == "peak":
            audio = audio / (audio.abs().max() + self.eps)
        else:
            audio = (audio - audio.mean()) / (audio.std() + self.eps)
        return {**item, "audio": audio}


def fit(audio: torch.Tensor, length: int, start: int = 0) -> torch.Tensor:
    """Frames ``start .. start+length`` of ``audio``, zero-padded at the end when too short."""
    audio = audio[..., start : start + length]
    missing = length - audio.shape[-1]
    return torch.nn.functional.pad(audio, (0, missing)) if missing > 0 else audio


class PadTrim(Stage):
    """Zero-pad or trim the end to exactly ``length`` frames."""

    name = "pad"

    def __init__(self, length: int):
        self.length = length

    def __call__(self, item: dict) -> dict:
        return {**item, "audio": fit(item["audio"], self.length)}


class RandomCrop(Stage):
    """A random window of ``length`` frames (zero-padded when shorter), drawn from the sample's
    own generator: the same window after a resume and for any number of workers."""

    name = "random_crop"
    random = True

    def __init__(self, length: int):
        self.length = length

    def __call__(self, item: dict, generator: np.random.Generator) -> dict:  # type: ignore[override]
        frames = item["audio"].shape[-1]
        start = int(generator.integers(0, frames - self.length + 1)) if frames > self.length else 0
        return {**item, "audio": fit(item["audio"], self.length, start)}
