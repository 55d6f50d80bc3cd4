"""Audio stages: decode, downmix, resample, normalize, pad/trim and random crop.

Items are dicts; after decoding they hold ``audio`` (float32 tensor, channels x frames) and
``sample_rate``. Resampling uses soxr (a maintained, anti-aliased resampler) by default, or
torchaudio's windowed-sinc kernel (cached per rate pair) when it is installed.

Decoding never calls back into Python while libsndfile reads: local files are opened by path
(the read stage hands over a :class:`~flows.stages.read.FileRef` instead of their bytes), bytes in
memory through an anonymous in-memory file (``memfd``), so thread workers decode in parallel.

**Reading only what is kept.** When ``pad``/``crop`` follows ``decode_audio`` with only
``downmix`` and one soxr ``resample`` in between, the decode stage opens the file and reads its
header only; the audio arrives as a :class:`Pending` read, and the pad or crop stage reads just
the frames it keeps, downmixes and resamples them, in the order written. Crop windows are drawn
from the full length, exactly as before. The output is bit-identical to the full path's: without
resampling the window is read by seeking; with it, from the file's (or segment's) first frame to
the window's end plus soxr's margin, since soxr's last bits depend on where its blocks fall
(starting elsewhere differs by up to ~4e-7 measured, within HQ's 20-bit precision, but not equal).
"""

from __future__ import annotations

import copy
import functools
import io as _io
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import soundfile
import torch

from flows.errors import FlowsError
from flows.stages.base import Stage
from flows.stages.read import FileRef
from flows.storage import io

_LOSSY = {"VORBIS", "OPUS", "MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III"}
_SHORT_DATA = re.compile(r": (\d+) \(should be (\d+)\)")  # libsndfile's log of a chunk's size
_UNKNOWN_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF}  # streamed files that never wrote their length
_MARGIN = 4096  # input frames read beyond a resampled window, per unit of the downsampling ratio


class BadAudioError(FlowsError):
    """A file decodes to something unusable: non-finite samples, or fewer frames than its header
    says (a truncated download)."""


class Pending:
    """Audio still in its file: the part to use (a segment), and the downmix/resample steps
    recorded so far. :meth:`window` reads, downmixes and resamples only the frames asked for."""

    def __init__(self, opened: soundfile.SoundFile, label: str, start: int, frames: int):
        self.file, self.label, self.start, self.frames = opened, label, start, frames
        self.rate = self.file.samplerate
        self.steps: tuple[Stage, ...] = ()

    def then(self, step: Stage) -> Pending:
        """This read with ``step`` (a Downmix or a soxr Resample) recorded after the others."""
        out = copy.copy(self)
        out.steps = (*self.steps, step)
        return out

    @property
    def length(self) -> int:
        """Frames after the recorded steps: what the full path would give."""
        resample = self._resample()
        return self.frames if resample is None else output_frames(self.frames, self.rate, resample.rate)

    def _resample(self) -> Resample | None:
        return next((s for s in self.steps if isinstance(s, Resample)), None)

    def window(self, start: int, length: int) -> torch.Tensor:
        """Frames ``start .. start+length`` (fewer at the end) of the audio after the steps."""
        end = min(start + length, self.length)
        resample = self._resample()
        first, last = start, end
        if resample is not None and resample.rate != self.rate:
            # soxr's output depends, in its last bits, on where its blocks fall: starting anywhere
            # but frame 0 would differ from the full path by up to ~4e-7, so a resampled window
            # is read from the start, and only the tail after it (beyond soxr's margin) is skipped
            rate, new = self.rate, resample.rate
            first, last = 0, min(self.frames, -(-end * rate // new) + _MARGIN * max(1, -(-rate // new)))
        audio = self.read(first, last)
        item = {"audio": audio, "sample_rate": self.rate}
        for step in self.steps:
            item = step(item)
        skip = start - first
        return item["audio"][:, skip : skip + end - start]

    def read(self, first: int, last: int) -> torch.Tensor:
        """Decoded frames ``first .. last`` of the segment, checked, as (channels, frames)."""
        offset = self.start + first
        try:
            if offset and self.file.subtype not in _LOSSY and self.file.seekable():
                self.file.seek(offset)
                samples = self.file.read(last - first, dtype="float32", always_2d=True)
            else:  # lossy decoders seek approximately: decode from the start, as the full path does
                samples = self.file.read(self.start + last, dtype="float32", always_2d=True)[offset:]
        except soundfile.LibsndfileError as error:  # e.g. a truncated FLAC: "decoder lost sync"
            raise BadAudioError(f"cannot decode {self.label}: {error.error_string}") from None
        finally:
            self.file.close()
        bad = np.size(samples) - np.count_nonzero(np.isfinite(samples))
        if bad:
            raise BadAudioError(f"{bad} non-finite samples (NaN/Inf) in {self.label}")
        return torch.from_numpy(np.ascontiguousarray(samples.T))


def output_frames(frames: int, rate: int, new_rate: int) -> int:
    """The length soxr gives ``frames`` resampled from ``rate`` to ``new_rate`` (rounded half up)."""
    return (2 * frames * new_rate + rate) // (2 * rate)


def _open(data: Any, label: str) -> soundfile.SoundFile:
    """Open encoded audio for reading, without Python read callbacks where possible."""
    try:
        if isinstance(data, FileRef):
            source = data.url if data.local else io.open_file(data.url, data.storage_options)  # ranges
            return soundfile.SoundFile(source)
        if not hasattr(os, "memfd_create"):
            return soundfile.SoundFile(_io.BytesIO(data))
        return soundfile.SoundFile(_memfd(data), closefd=True)  # closed by libsndfile, also on errors
    except soundfile.LibsndfileError as error:
        raise BadAudioError(f"cannot decode {label}: {error.error_string}") from None


def _memfd(data: bytes) -> int:
    """An anonymous in-memory file holding ``data``: libsndfile reads it itself, GIL released."""
    fd = os.memfd_create("flows-audio", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_length(opened: soundfile.SoundFile, label: str) -> None:
    """A file whose header announces more data than it holds (WAV, AIFF, W64, RF64, AU: logged by
    libsndfile as ``size (should be N)``) is a truncated file."""
    short = [(int(declared), int(present)) for declared, present in _SHORT_DATA.findall(opened.extra_info)
             if int(declared) not in _UNKNOWN_SIZES and int(declared) - int(present) >= 8 * opened.channels]
    if short:  # the last one logged is the innermost chunk: the audio data
        declared, present = short[-1]
        raise BadAudioError(f"truncated: {label} holds {opened.frames} frames, {present} of the "
                            f"{declared} bytes its header announces")


class DecodeAudio(Stage):
    """Decode WAV (8/16/24/32-bit integer or float), FLAC, OGG or MP3 with soundfile.

    ``item[field]`` is raw bytes, a Hugging Face ``{"bytes", "path"}`` audio struct or a
    :class:`~flows.stages.read.FileRef` left by the read stage. The bytes are dropped from the output
    to keep items small. ``start`` and ``end`` (or ``duration``) name record fields giving the
    part of the file to use, in ``unit`` seconds or frames (an annotation table's columns): only
    that part is read. Non-finite samples and truncated WAV files are errors (skippable with
    ``on_error="skip"``)."""

    name = "decode_audio"

    def __init__(self, field: str = "bytes", start: str | None = None, end: str | None = None,
                 duration: str | None = None, unit: Literal["seconds", "frames"] = "seconds"):
        if (end or duration) and not start or (end and duration):
            raise FlowsError("decode_audio: give start with either end or duration")
        if unit not in ("seconds", "frames"):
            raise FlowsError(f"decode_audio: unit is 'seconds' or 'frames', not {unit!r}")
        self.field, self.start, self.end, self.duration, self.unit = field, start, end, duration, unit
        self.lazy = False  # True: exact formats hand over a Pending, read by the stage after

    def reading(self, lazy: bool) -> DecodeAudio:
        """This stage, reading lazily (``lazy``: a :class:`Pending` for a later stage to read
        its window of) or everything at once (a tensor)."""
        out = copy.copy(self)
        out.lazy = lazy
        return out

    @property
    def segmented(self) -> bool:
        return self.start is not None

    def cache_params(self) -> dict:  # lazy reads give the same output
        return {"field": self.field, "start": self.start, "end": self.end, "duration": self.duration,
                "unit": self.unit}

    def __call__(self, item: dict) -> dict:
        data, label = item[self.field], item.get("path")
        if isinstance(data, dict):  # a Hugging Face audio struct
            data, label = data["bytes"], label or data.get("path")
        if not isinstance(label, str):
            label = data.url if isinstance(data, FileRef) else "the audio bytes"
        opened = _open(data, label)
        try:
            _check_length(opened, label)
            start, frames = self._segment(item, opened, label)
        except BaseException:
            opened.close()
            raise
        pending = Pending(opened, label, start, frames)
        exact = opened.subtype not in _LOSSY  # frame counts and seeks are exact
        out = {k: v for k, v in item.items() if k != self.field}
        out["audio"] = pending if self.lazy and exact else pending.window(0, frames)
        out["sample_rate"] = pending.rate
        return out

    def _segment(self, item: dict, opened: soundfile.SoundFile, label: str) -> tuple[int, int]:
        """(first frame, frames) of the part of the file to use."""
        total = opened.frames
        if self.start is None:
            return 0, total
        scale = opened.samplerate if self.unit == "seconds" else 1
        first = round(float(item[self.start]) * scale)
        last = total
        if self.end is not None:
            last = round(float(item[self.end]) * scale)
        elif self.duration is not None:
            last = first + round(float(item[self.duration]) * scale)
        if last > total and last - total <= 1:  # seconds rounded up past the last frame
            last = total
        if not 0 <= first < last <= total:
            raise FlowsError(f"segment [{first}, {last}) frames lies outside {label} ({total} frames "
                             f"at {opened.samplerate} Hz)")
        return first, last - first


def windowed(stages: Sequence[Callable]) -> tuple[Callable, ...]:
    """``stages`` with their last decode reading lazily, when only downmix and at most one soxr
    resample follow it: the stage about to be added (pad or crop) then reads only its window."""
    steps = 0
    for i in range(len(stages) - 1, -1, -1):
        stage = stages[i]
        if isinstance(stage, DecodeAudio):
            return (*stages[:i], stage.reading(lazy=True), *stages[i + 1 :])
        if isinstance(stage, Resample) and stage.backend == "soxr" and not steps:
            steps += 1
        elif not isinstance(stage, Downmix):
            break
    return tuple(stages)


class Downmix(Stage):
    """Average the channels into one: (channels, frames) -> (1, frames)."""

    name = "downmix"

    def __call__(self, item: dict) -> dict:
        audio = item["audio"]
        if isinstance(audio, Pending):
            return {**item, "audio": audio.then(self)}
        return {**item, "audio": audio.mean(dim=0, keepdim=True)}


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
        audio = item["audio"]
        if isinstance(audio, Pending):
            return {**item, "audio": audio.then(self), "sample_rate": self.rate}
        if orig == self.rate:
            return item
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


def frames(audio: torch.Tensor | Pending) -> int:
    """The length of ``audio`` in frames, read or not."""
    return audio.length if isinstance(audio, Pending) else audio.shape[-1]


def fit(audio: torch.Tensor | Pending, length: int, start: int = 0) -> torch.Tensor:
    """Frames ``start .. start+length`` of ``audio``, zero-padded at the end when too short; of a
    :class:`Pending` read, only those frames are read."""
    audio = audio.window(start, length) if isinstance(audio, Pending) else audio[..., start : start + length]
    missing = length - audio.shape[-1]
    return torch.nn.functional.pad(audio, (0, missing)) if missing > 0 else audio


def _reading(stage: Callable[..., dict]) -> Callable[..., dict]:
    """Errors of the reading a bounding stage does for a lazy decode are the decode's."""

    @functools.wraps(stage)
    def call(self: Any, item: dict, *args: Any) -> dict:
        lazy = isinstance(item["audio"], Pending)
        try:
            return stage(self, item, *args)
        except Exception as error:
            if lazy and not hasattr(error, "flows_stage"):
                error.flows_stage = DecodeAudio.name  # type: ignore[attr-defined]  # named by Apply
            raise

    return call


class PadTrim(Stage):
    """Zero-pad or trim the end to exactly ``length`` frames."""

    name = "pad"

    def __init__(self, length: int):
        self.length = length

    @_reading
    def __call__(self, item: dict) -> dict:
        return {**item, "audio": fit(item["audio"], self.length)}


class RandomCrop(Stage):
    """A random window of ``length`` frames (zero-padded when shorter), drawn from the sample's
    own generator: the same window after a resume and for any number of workers."""

    name = "random_crop"
    random = True

    def __init__(self, length: int):
        self.length = length

    @_reading
    def __call__(self, item: dict, generator: np.random.Generator) -> dict:  # type: ignore[override]
        total = frames(item["audio"])
        start = int(generator.integers(0, total - self.length + 1)) if total > self.length else 0
        return {**item, "audio": fit(item["audio"], self.length, start)}
