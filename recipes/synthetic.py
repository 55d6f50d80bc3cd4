"""Small synthetic stand-ins for the corpora our recipes serve, written in their original layouts.

Every generator is deterministic for a given ``seed`` (same seed -> byte-identical files) and
writes the dataset exactly as the original distribution lays it out on disk (see
``shared/notes/datasets.md``), so loaders, tests and demos can run without downloading
gigabytes.  The content is synthetic but *learnable*: each label (a YESNO word, an
UrbanSound8K class, a SOUSA rudiment and skill tier, a tensor-folder class) has a distinct
sound or pattern that a small network picks up quickly.

Only numpy, soundfile and pyarrow/pandas are needed; torch is imported lazily by
:func:`make_tensor_folder` when ``fmt="pt"``.
"""

from __future__ import annotations

import io
import json
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from numpy.typing import NDArray

__all__ = [
    "URBANSOUND8K_CLASSES",
    "URBANSOUND8K_SAMPLE_RATES",
    "URBANSOUND8K_SUBTYPES",
    "SOUSA_RUDIMENTS",
    "SOUSA_SKILL_TIERS",
    "make_yesno",
    "make_urbansound8k",
    "make_sousa",
    "make_sousa_hf",
    "make_tensor_folder",
]

FloatArray = NDArray[np.float64]

# --------------------------------------------------------------------------------------------
# Shared helpers: one WAV/FLAC writer, one tone/noise synthesizer
# --------------------------------------------------------------------------------------------


def _write_audio(
    target: Path | BinaryIO,
    data: NDArray[Any],
    samplerate: int,
    subtype: str,
    fmt: str = "WAV",
) -> None:
    """Write ``data`` (frames, or frames x channels, in [-1, 1]) as ``fmt``/``subtype``.

    ``target`` is a path (parent folders are created) or a binary file object.
    """
    clipped = np.clip(np.asarray(data, dtype=np.float64), -1.0, 1.0).astype(np.float32)
    if isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(target), clipped, samplerate, subtype=subtype, format=fmt)
    else:
        sf.write(target, clipped, samplerate, subtype=subtype, format=fmt)


def _band_noise(
    n: int, sr: int, rng: np.random.Generator, band: tuple[float, float] | None
) -> FloatArray:
    """Unit-RMS Gaussian noise, optionally band-limited to ``band`` Hz by an FFT mask."""
    white = rng.standard_normal(n)
    if band is not None and n > 1:
        lo, hi = band
        hi = min(hi, 0.5 * sr)
        spec = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(n, 1.0 / sr)
        spec[(freqs < lo) | (freqs > hi)] = 0.0
        white = np.fft.irfft(spec, n)
    rms = float(np.sqrt(np.mean(white**2))) if n else 0.0
    return white / rms if rms > 0 else white


def _synth(
    sr: int,
    duration: float,
    rng: np.random.Generator,
    *,
    f0: float | Sequence[float] | FloatArray = 0.0,
    harmonics: int = 1,
    rolloff: float = 1.0,
    glide: float = 0.0,
    vibrato: tuple[float, float] = (0.0, 0.0),
    noise: float = 0.0,
    band: tuple[float, float] | None = None,
    am: tuple[float, float] = (0.0, 0.0),
    decay: float = 0.0,
    pulse_rate: float = 0.0,
    fade: float = 0.005,
) -> FloatArray:
    """Synthesize a tone + noise sound of ``duration`` seconds at ``sr`` Hz.

    * ``f0``: fundamental in Hz, or a sequence of notes played in equal consecutive segments;
      ``harmonics`` partials with amplitude ``1 / k**rolloff`` (those above Nyquist dropped);
      ``glide`` is the relative pitch change over the sound (``-0.2`` = falls by 20 %);
      ``vibrato = (depth_hz, rate_hz)`` is a sinusoidal frequency modulation.
    * ``noise``: level of unit-RMS Gaussian noise relative to the tone, band-limited to ``band``.
    * ``am = (rate_hz, depth)``: amplitude modulation; ``decay``: exponential decay time
      constant (s), restarted every ``1 / pulse_rate`` seconds when ``pulse_rate`` > 0
      (bursts, barks, strokes); ``fade``: linear fade-in/out length (s).
    """
    n = max(1, int(round(duration * sr)))
    t = np.arange(n) / sr
    out = np.zeros(n)
    notes = np.atleast_1d(np.asarray(f0, dtype=np.float64))
    if np.any(notes > 0):
        seg = np.minimum((np.arange(n) * len(notes)) // n, len(notes) - 1)
        freq = notes[seg] * (1.0 + glide * t / max(duration, 1e-9))
        depth, rate = vibrato
        if depth:
            freq = freq + depth * np.sin(2 * np.pi * rate * t)
        phase = 2 * np.pi * np.cumsum(freq) / sr
        top = float(freq.max())
        for k in range(1, harmonics + 1):
            if k * top >= 0.48 * sr:
                break
            out += np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k**rolloff
    if noise:
        out += noise * _band_noise(n, sr, rng, band)
    rate, depth = am
    if rate:
        out *= 1.0 - depth * (0.5 + 0.5 * np.sin(2 * np.pi * rate * t))
    if decay:
        local = np.mod(t, 1.0 / pulse_rate) if pulse_rate else t
        out *= np.exp(-local / decay)
    ramp = min(int(fade * sr), n // 2)
    if ramp > 0:
        env = np.linspace(0.0, 1.0, ramp)
        out[:ramp] *= env
        out[-ramp:] *= env[::-1]
    return out


def _normalize(x: FloatArray, peak: float) -> FloatArray:
    """Scale ``x`` so that its absolute peak is ``peak``."""
    top = float(np.max(np.abs(x))) if x.size else 0.0
    return x * (peak / top) if top > 0 else x


def _write_parquet(table: pa.Table, path: Path, row_group_size: int) -> None:
    """Write ``table`` with small row groups (so row-group streaming can be exercised)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size, compression="snappy")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# YESNO
# --------------------------------------------------------------------------------------------

_YESNO_README = """\
Synthetic stand-in for the YESNO corpus (OpenSLR 1, http://openslr.org/resources/1/waves_yesno.tar.gz).

The original contains 60 .wav files, sampled at 8 kHz.  In each file a male speaker says
8 words; each word is either "yes" or "no", so each file is a random sequence of 8 yes-es
or noes.  There is no separate transcription provided; the sequence is encoded in the
filename, with 1 for yes and 0 for no, for instance:

waves_yesno/1_0_1_1_1_0_1_0.wav
waves_yesno/0_1_1_0_0_1_1_0.wav
...

This copy was generated by recipes.synthetic.make_yesno (seed {seed}): the words are
synthetic ("yes": a rising, brighter voiced tone ending in an /s/-like hiss; "no": a
falling, darker nasal tone), same layout, 8000 Hz mono 16-bit PCM, 5-7 s per file.
"""


def _yesno_word(yes: bool, sr: int, rng: np.random.Generator) -> FloatArray:
    """Render one synthetic "yes" or "no" (~0.4-0.5 s) with random pitch and length jitter."""
    pitch = rng.uniform(0.92, 1.08)
    if yes:
        voiced = _synth(
            sr,
            rng.uniform(0.24, 0.32),
            rng,
            f0=185.0 * pitch,
            harmonics=14,
            rolloff=0.9,
            glide=0.18,
            vibrato=(4.0, 5.5),
            noise=0.05,
            band=(200, 3000),
            fade=0.03,
        )
        hiss = _synth(sr, rng.uniform(0.14, 0.2), rng, noise=1.0, band=(2400, 3900), fade=0.03)
        word = np.concatenate([voiced, 0.45 * _normalize(hiss, float(np.max(np.abs(voiced))))])
    else:
        word = _synth(
            sr,
            rng.uniform(0.4, 0.52),
            rng,
            f0=125.0 * pitch,
            harmonics=7,
            rolloff=2.2,
            glide=-0.28,
            vibrato=(3.0, 4.0),
            noise=0.03,
            band=(80, 900),
            am=(6.0, 0.2),
            fade=0.05,
        )
    return _normalize(word, rng.uniform(0.22, 0.38))


def make_yesno(root: str | Path, n_files: int = 60, seed: int = 0) -> Path:
    """Write a synthetic YESNO corpus: ``root/waves_yesno/{b0}_..._{b7}.wav`` plus a README.

    ``n_files`` distinct 8-word label sequences (1 = yes, 0 = no) are drawn at random
    (at most 256 exist); each file is 8000 Hz mono 16-bit PCM, 5-7 s long, with the 8 words
    in roughly evenly spaced slots (small timing/amplitude/pitch jitter) over low background
    noise.  Returns the ``waves_yesno`` directory.
    """
    if not 1 <= n_files <= 256:
        raise ValueError(f"n_files must be in 1..256 (distinct 8-bit sequences), got {n_files}")
    sr = 8000
    rng = np.random.default_rng(seed)
    out_dir = Path(root) / "waves_yesno"
    out_dir.mkdir(parents=True, exist_ok=True)
    codes = rng.choice(256, size=n_files, replace=False)
    for code in codes:
        bits = [(int(code) >> (7 - i)) & 1 for i in range(8)]
        duration = rng.uniform(5.0, 7.0)
        n = int(round(duration * sr))
        signal = rng.uniform(0.003, 0.006) * _band_noise(n, sr, rng, (60.0, 3800.0))
        lead, tail = rng.uniform(0.3, 0.6), rng.uniform(0.15, 0.3)
        slot = (duration - lead - tail) / 8
        for i, bit in enumerate(bits):
            word = _yesno_word(bool(bit), sr, rng)
            wlen = len(word) / sr
            slack = max(0.0, (slot - wlen) / 2)
            start_s = lead + i * slot + slack + rng.uniform(-1, 1) * min(0.05, slack)
            start = int(round(start_s * sr))
            stop = min(n, start + len(word))
            signal[start:stop] += word[: stop - start]
        name = "_".join(str(b) for b in bits) + ".wav"
        _write_audio(out_dir / name, signal, sr, "PCM_16")
    (out_dir / "README").write_text(_YESNO_README.format(seed=seed), encoding="utf-8")
    return out_dir


# --------------------------------------------------------------------------------------------
# UrbanSound8K
# --------------------------------------------------------------------------------------------

URBANSOUND8K_CLASSES: tuple[str, ...] = (
    "air_conditioner",
    "car_horn",
    "children_playing",
    "dog_bark",
    "drilling",
    "engine_idling",
    "gun_shot",
    "jackhammer",
    "siren",
    "street_music",
)
URBANSOUND8K_SAMPLE_RATES: tuple[int, ...] = (8000, 11025, 16000, 22050, 44100, 48000, 96000)
URBANSOUND8K_SUBTYPES: tuple[str, ...] = ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT")

_URBAN_COLUMNS = ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]


def _urban_sound(class_id: int, sr: int, duration: float, rng: np.random.Generator) -> FloatArray:
    """A class-specific sound (all cues below 4 kHz so they survive an 8 kHz rate)."""
    j = rng.uniform(0.9, 1.1)
    if class_id == 0:  # air_conditioner: low rumble + hum
        return _synth(sr, duration, rng, f0=120 * j, harmonics=3, noise=2.0, band=(40, 400))
    if class_id == 1:  # car_horn: bright steady tone
        return _synth(sr, duration, rng, f0=420 * j, harmonics=8, rolloff=0.7)
    if class_id == 2:  # children_playing: wandering voices + chatter noise
        notes = rng.uniform(500, 1000, size=6)
        return _synth(
            sr,
            duration,
            rng,
            f0=notes,
            harmonics=4,
            vibrato=(30, 6),
            noise=0.5,
            band=(300, 3000),
            am=(3.0, 0.6),
        )
    if class_id == 3:  # dog_bark: short harmonic bursts
        return _synth(
            sr,
            duration,
            rng,
            f0=550 * j,
            harmonics=6,
            noise=0.6,
            band=(400, 2500),
            decay=0.08,
            pulse_rate=2.5 * j,
        )
    if class_id == 4:  # drilling: high whine, fast tremolo
        return _synth(
            sr,
            duration,
            rng,
            f0=1200 * j,
            harmonics=3,
            noise=0.3,
            band=(1000, 3500),
            am=(35.0, 0.5),
        )
    if class_id == 5:  # engine_idling: low buzzy harmonics, slow throb
        return _synth(
            sr,
            duration,
            rng,
            f0=55 * j,
            harmonics=10,
            rolloff=0.8,
            noise=0.3,
            band=(30, 300),
            am=(9.0, 0.5),
        )
    if class_id == 6:  # gun_shot: broadband impulses
        return _synth(
            sr, duration, rng, noise=1.0, band=(100, 3800), decay=0.12, pulse_rate=0.8 * j
        )
    if class_id == 7:  # jackhammer: rapid noisy hits
        return _synth(
            sr,
            duration,
            rng,
            f0=90 * j,
            harmonics=4,
            noise=1.0,
            band=(200, 3000),
            decay=0.02,
            pulse_rate=14 * j,
        )
    if class_id == 8:  # siren: wailing FM tone
        return _synth(sr, duration, rng, f0=900 * j, harmonics=3, vibrato=(350, 0.8 * j))
    if class_id == 9:  # street_music: plucked melody
        notes = rng.choice([262.0, 294.0, 330.0, 392.0, 440.0, 523.0], size=8)
        return _synth(
            sr, duration, rng, f0=notes, harmonics=5, rolloff=1.5, decay=0.2, pulse_rate=4.0
        )
    raise ValueError(f"unknown UrbanSound8K classID {class_id}")


def make_urbansound8k(root: str | Path, clips_per_fold: int = 4, seed: int = 0) -> Path:
    """Write a synthetic UrbanSound8K: ``metadata/UrbanSound8K.csv`` + ``audio/fold1..fold10``.

    ``10 * clips_per_fold`` clips of 1-4 s named ``{fsID}-{classID}-{occurrenceID}-{sliceID}.wav``
    with the real 10 class names/IDs and a class-specific sound each.  Like the real corpus
    the files are heterogeneous: every sample rate in :data:`URBANSOUND8K_SAMPLE_RATES`,
    mono and stereo, and every WAV subtype in :data:`URBANSOUND8K_SUBTYPES` occurs.
    Returns ``root``.
    """
    if clips_per_fold < 1:
        raise ValueError(f"clips_per_fold must be >= 1, got {clips_per_fold}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    total = 10 * clips_per_fold
    # Cycle through every option, then shuffle: each one occurs at least once (total >= 10).
    rates = rng.permutation([URBANSOUND8K_SAMPLE_RATES[k % 7] for k in range(total)])
    subtypes = rng.permutation([URBANSOUND8K_SUBTYPES[k % 5] for k in range(total)])
    channels = rng.permutation([1 + k % 2 for k in range(total)])
    class_ids = rng.permutation([k % 10 for k in range(total)])
    fs_ids = 1000 + rng.choice(199_000, size=total, replace=False)
    rows: list[dict[str, Any]] = []
    for k in range(total):
        fold = 1 + k // clips_per_fold
        class_id, sr = int(class_ids[k]), int(rates[k])
        duration = 4.0 if rng.random() < 0.4 else float(rng.uniform(1.0, 4.0))
        n = int(duration * sr)
        mono = _normalize(_urban_sound(class_id, sr, n / sr, rng), rng.uniform(0.3, 0.9))
        if channels[k] == 2:
            other = np.roll(mono, int(rng.integers(1, 40))) * rng.uniform(0.7, 1.0)
            other += 0.003 * rng.standard_normal(n)
            data: FloatArray = np.stack([mono, other], axis=1)
        else:
            data = mono
        name = f"{fs_ids[k]}-{class_id}-{rng.integers(0, 3)}-{rng.integers(0, 4)}.wav"
        _write_audio(root / "audio" / f"fold{fold}" / name, data, sr, str(subtypes[k]))
        start = round(float(rng.uniform(0.0, 120.0)), 6)
        rows.append(
            {
                "slice_file_name": name,
                "fsID": int(fs_ids[k]),
                "start": start,
                "end": round(start + n / sr, 6),
                "salience": int(rng.integers(1, 3)),
                "fold": fold,
                "classID": class_id,
                "class": URBANSOUND8K_CLASSES[class_id],
            }
        )
    meta = pd.DataFrame(rows, columns=_URBAN_COLUMNS).sort_values("slice_file_name")
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    meta.to_csv(root / "metadata" / "UrbanSound8K.csv", index=False)
    return root


# --------------------------------------------------------------------------------------------
# SOUSA (local layout and Hugging Face layout)
# --------------------------------------------------------------------------------------------

SOUSA_SKILL_TIERS: tuple[str, ...] = ("beginner", "intermediate", "advanced", "professional")
_TIER_ABBR = ("beg", "int", "adv", "pro")
_SR_SOUSA = 44100
_ROW_GROUP = 8

# One cycle = 8 sixteenth notes: (sixteenth, hand, accent, diddle_position, n_grace_notes)
_Stroke = tuple[int, str, bool, int | None, int]
SOUSA_RUDIMENTS: dict[str, list[_Stroke]] = {
    "single_stroke_roll": [(i, "RL"[i % 2], False, None, 0) for i in range(8)],
    "double_stroke_open_roll": [(i, "RRLL"[i % 4], False, i % 2, 0) for i in range(8)],
    "single_paradiddle": [
        (i, "RLRRLRLL"[i], i in (0, 4), {2: 0, 3: 1, 6: 0, 7: 1}.get(i), 0) for i in range(8)
    ],
    "flam": [(i, "RL"[(i // 2) % 2], True, None, 1) for i in (0, 2, 4, 6)],
    "drag": [(i, "RL"[(i // 4) % 2], True, None, 2) for i in (0, 2, 4, 6)],
}
# Per tier: timing error sd (ms), velocity sd, grace spacing sd (ms), drum body pitch (Hz).
_TIER_TIMING_SD = (22.0, 12.0, 6.0, 2.5)
_TIER_VELOCITY_SD = (18.0, 11.0, 6.0, 3.0)
_TIER_BODY_HZ = (150.0, 200.0, 250.0, 300.0)
_SOUNDFONTS = ("generaluser_gs", "fluidr3_gm", "practice_pad", "marching_snare")
_AUG_PRESETS: dict[str, tuple[str, str, float, float, float, int | None, int | None]] = {
    # preset: room_type, mic_type, wet_dry, mic_distance, compression_ratio, bit_depth, rate
    "practice_room": ("small_room", "dynamic", 0.15, 0.5, 2.0, None, None),
    "concert_hall": ("hall", "condenser", 0.45, 3.0, 1.5, None, None),
    "lo_fi": ("garage", "piezo", 0.25, 0.2, 6.0, 12, 22050),
}

_SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("profile_id", pa.string()),
        ("rudiment_slug", pa.string()),
        ("tempo_bpm", pa.int64()),
        ("duration_sec", pa.float64()),
        ("num_cycles", pa.int64()),
        ("skill_tier", pa.string()),
        ("skill_tier_binary", pa.string()),
        ("dominant_hand", pa.string()),
        ("midi_path", pa.string()),
        ("audio_path", pa.string()),
        ("num_strokes", pa.int64()),
        ("num_measures", pa.int64()),
        ("soundfont", pa.string()),
        ("augmentation_preset", pa.string()),
        ("augmentation_group_id", pa.string()),
        ("aug_soundfont", pa.string()),
        ("aug_room_type", pa.string()),
        ("aug_room_wet_dry", pa.float64()),
        ("aug_mic_distance", pa.float64()),
        ("aug_mic_type", pa.string()),
        ("aug_compression_ratio", pa.float64()),
        ("aug_noise_level_db", pa.float64()),
        ("aug_bit_depth", pa.int64()),
        ("aug_sample_rate", pa.int64()),
    ]
)
_SCORE_COLUMNS = (
    "timing_accuracy",
    "timing_consistency",
    "tempo_stability",
    "subdivision_evenness",
    "velocity_control",
    "accent_differentiation",
    "accent_accuracy",
    "hand_balance",
    "weak_hand_index",
    "flam_quality",
    "diddle_quality",
    "roll_sustain",
    "groove_feel_proxy",
    "overall_score",
    "tier_confidence",
)
_EXERCISE_SCHEMA = pa.schema(
    [("sample_id", pa.string())] + [(c, pa.float64()) for c in _SCORE_COLUMNS]
)
_STROKE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("index", pa.int64()),
        ("hand", pa.string()),
        ("stroke_type", pa.string()),
        ("intended_time_ms", pa.float64()),
        ("actual_time_ms", pa.float64()),
        ("timing_error_ms", pa.float64()),
        ("intended_velocity", pa.int64()),
        ("actual_velocity", pa.int64()),
        ("velocity_error", pa.int64()),
        ("is_grace_note", pa.bool_()),
        ("is_accent", pa.bool_()),
        ("diddle_position", pa.int64()),
        ("flam_spacing_ms", pa.float64()),
        ("parent_stroke_index", pa.int64()),
    ]
)
_MEASURE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("index", pa.int64()),
        ("stroke_start", pa.int64()),
        ("stroke_end", pa.int64()),
        ("timing_mean_error_ms", pa.float64()),
        ("timing_std_ms", pa.float64()),
        ("timing_max_error_ms", pa.float64()),
        ("velocity_mean", pa.float64()),
        ("velocity_std", pa.float64()),
        ("velocity_consistency", pa.float64()),
        ("lr_velocity_ratio", pa.float64()),
        ("lr_timing_diff_ms", pa.float64()),
    ]
)


def _sousa_strokes(
    slug: str, tempo: int, num_cycles: int, tier: int, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """Stroke labels for ``num_cycles`` cycles of ``slug`` played by a ``tier`` player."""
    sixteenth_ms = 60000.0 / tempo / 4
    lead_ms = 80.0
    strokes: list[dict[str, Any]] = []
    for cycle in range(num_cycles):
        for pos, hand, accent, diddle, n_grace in SOUSA_RUDIMENTS[slug]:
            intended = lead_ms + (cycle * 8 + pos) * sixteenth_ms
            actual = intended + rng.normal(0.0, _TIER_TIMING_SD[tier])
            parent = len(strokes) + n_grace
            for g in range(n_grace, 0, -1):  # grace notes precede their primary stroke
                ideal = 28.0 * g
                spacing = max(4.0, ideal + rng.normal(0.0, _TIER_TIMING_SD[tier] / 2))
                strokes.append(
                    _stroke_row(
                        len(strokes),
                        "LR"[hand == "L"],
                        "grace",
                        intended - ideal,
                        actual - spacing,
                        40,
                        tier,
                        rng,
                        grace=(spacing, ideal, parent),
                    )
                )
            stroke_type = "accent" if accent else ("diddle" if diddle is not None else "tap")
            strokes.append(
                _stroke_row(
                    len(strokes),
                    hand,
                    stroke_type,
                    intended,
                    actual,
                    115 if accent else 80,
                    tier,
                    rng,
                    diddle=diddle,
                )
            )
    return strokes


def _stroke_row(
    index: int,
    hand: str,
    stroke_type: str,
    intended_ms: float,
    actual_ms: float,
    velocity: int,
    tier: int,
    rng: np.random.Generator,
    *,
    diddle: int | None = None,
    grace: tuple[float, float, int] | None = None,
) -> dict[str, Any]:
    actual_vel = int(np.clip(round(velocity + rng.normal(0.0, _TIER_VELOCITY_SD[tier])), 1, 127))
    actual_ms = max(0.0, actual_ms)
    return {
        "index": index,
        "hand": hand.upper(),
        "stroke_type": stroke_type,
        "intended_time_ms": round(intended_ms, 3),
        "actual_time_ms": round(actual_ms, 3),
        "timing_error_ms": round(
            grace[0] - grace[1] if grace is not None else actual_ms - intended_ms, 3
        ),
        "intended_velocity": velocity,
        "actual_velocity": actual_vel,
        "velocity_error": actual_vel - velocity,
        "is_grace_note": grace is not None,
        "is_accent": stroke_type == "accent",
        "diddle_position": diddle,
        "flam_spacing_ms": round(grace[0], 3) if grace is not None else None,
        "parent_stroke_index": grace[2] if grace is not None else None,
    }


def _sousa_measures(strokes: list[dict[str, Any]], num_cycles: int) -> list[dict[str, Any]]:
    """Per-measure aggregates; one 4/4 measure = two 8-sixteenth cycles."""
    per_cycle = len(strokes) // num_cycles
    measures = []
    for m, first in enumerate(range(0, len(strokes), 2 * per_cycle)):
        chunk = strokes[first : first + 2 * per_cycle]
        err = np.array([s["timing_error_ms"] for s in chunk])
        vel = np.array([s["actual_velocity"] for s in chunk], dtype=np.float64)
        hands = np.array([s["hand"] for s in chunk])
        both = bool(np.any(hands == "L") and np.any(hands == "R"))
        measures.append(
            {
                "index": m,
                "stroke_start": first,
                "stroke_end": first + len(chunk),
                "timing_mean_error_ms": float(np.mean(np.abs(err))),
                "timing_std_ms": float(np.std(err)),
                "timing_max_error_ms": float(np.max(np.abs(err))),
                "velocity_mean": float(vel.mean()),
                "velocity_std": float(vel.std()),
                "velocity_consistency": float(1.0 - vel.std() / vel.mean()),
                "lr_velocity_ratio": (
                    float(vel[hands == "L"].mean() / vel[hands == "R"].mean()) if both else None
                ),
                "lr_timing_diff_ms": (
                    float(np.abs(err[hands == "L"]).mean() - np.abs(err[hands == "R"]).mean())
                    if both
                    else None
                ),
            }
        )
    return measures


def _sousa_scores(
    slug: str, tier: int, strokes: list[dict[str, Any]], rng: np.random.Generator
) -> dict[str, float | None]:
    """Exercise scores (0-100; groove_feel_proxy and tier_confidence 0-1) for one sample."""
    err = np.array([s["timing_error_ms"] for s in strokes])
    base = (45.0, 62.0, 78.0, 90.0)[tier]

    def score(center: float, sd: float = 5.0) -> float:
        return round(float(np.clip(center + rng.normal(0.0, sd), 0.0, 100.0)), 3)

    scores: dict[str, float | None] = {
        "timing_accuracy": score(100.0 - 2.0 * float(np.mean(np.abs(err))), 2.0),
        "timing_consistency": score(100.0 - 2.2 * float(np.std(err)), 2.0),
        "tempo_stability": score(base + 4.0),
        "subdivision_evenness": score(base),
        "velocity_control": score(base - 2.0),
        "accent_differentiation": score(base + 2.0),
        "accent_accuracy": score(base + 5.0),
        "hand_balance": score(base),
        "weak_hand_index": score(50.0, 8.0),
        "flam_quality": score(base) if slug == "flam" else None,
        "diddle_quality": (
            score(base)
            if slug in ("double_stroke_open_roll", "single_paradiddle", "drag")
            else None
        ),
        "roll_sustain": (
            score(base) if slug in ("single_stroke_roll", "double_stroke_open_roll") else None
        ),
    }
    core = [v for k, v in scores.items() if v is not None and k != "weak_hand_index"]
    overall = float(np.mean(core))
    groove = float(np.clip(overall / 100 + rng.normal(0.0, 0.05), 0.0, 1.0))
    scores["groove_feel_proxy"] = round(groove, 4)
    scores["overall_score"] = round(overall, 3)
    scores["tier_confidence"] = round(float(rng.uniform(0.2, 1.0)), 4)
    return scores


def _sousa_audio(
    strokes: list[dict[str, Any]], duration: float, tier: int, rng: np.random.Generator
) -> FloatArray:
    """Render strokes as decaying drum hits whose body pitch depends on the skill tier."""
    sr = _SR_SOUSA
    n = int(round(duration * sr))
    out = 0.002 * rng.standard_normal(n)
    body = _TIER_BODY_HZ[tier] * rng.uniform(0.97, 1.03)
    templates = {
        hand: _synth(
            sr,
            0.2,
            rng,
            f0=body * detune,
            harmonics=3,
            rolloff=1.5,
            noise=0.8,
            band=(1500, 9000),
            decay=0.045,
            fade=0.001,
        )
        for hand, detune in (("R", 1.0), ("L", 0.97))
    }
    for s in strokes:
        hit = templates[s["hand"]] * (s["actual_velocity"] / 127.0) ** 1.5
        start = int(round(s["actual_time_ms"] / 1000.0 * sr))
        stop = min(n, start + len(hit))
        if start < stop:
            out[start:stop] += hit[: stop - start]
    return out


def _vlq(value: int) -> bytes:
    """MIDI variable-length quantity."""
    chunks = [value & 0x7F]
    value >>= 7
    while value:
        chunks.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(chunks))


def _midi_bytes(strokes: list[dict[str, Any]], tempo_bpm: int) -> bytes:
    """A format-0 Standard MIDI File: one snare note (ch. 10, key 38) per stroke."""
    ppq = 480
    ticks_per_ms = tempo_bpm / 60000.0 * ppq
    events: list[tuple[int, int, bytes]] = []  # (tick, order, data): note-offs before note-ons
    for s in strokes:
        on = int(round(s["actual_time_ms"] * ticks_per_ms))
        events.append((on, 1, bytes([0x99, 38, s["actual_velocity"]])))
        events.append((on + 30, 0, bytes([0x89, 38, 0])))
    events.sort(key=lambda e: (e[0], e[1]))
    track = bytearray(_vlq(0) + b"\xff\x51\x03" + int(60_000_000 / tempo_bpm).to_bytes(3, "big"))
    tick = 0
    for when, _, data in events:
        track += _vlq(when - tick) + data
        tick = when
    track += _vlq(0) + b"\xff\x2f\x00"
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, ppq)
    return header + b"MTrk" + struct.pack(">I", len(track)) + bytes(track)


def _sousa_generate(
    n_samples: int, seed: int
) -> tuple[
    list[dict[str, Any]],
    list[dict[str, Any]],
    list[dict[str, Any]],
    list[dict[str, Any]],
    dict[str, list[str]],
    list[tuple[FloatArray, bytes]],
]:
    """Everything both SOUSA layouts need: sample/exercise/stroke/measure rows, profile
    splits and per-sample (audio, midi bytes)."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    rng = np.random.default_rng(seed)
    # 4 profiles per tier: 2 train, 1 val, 1 test (splits are by player profile).
    profiles: list[dict[str, Any]] = []
    roles = ("train", "val", "test", "train")
    for tier in range(4):
        for r, role in enumerate(roles):
            profiles.append(
                {
                    "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                    "num": tier * 4 + r,
                    "tier": tier,
                    "role": role,
                    "hand": "right" if rng.random() < 0.85 else "left",
                }
            )
    # Interleave so the first 12 samples already cover every tier in every split.
    order = [profiles[t * 4 + r] for r in range(4) for t in range(4)]
    splits = {
        f"{role}_profile_ids": [p["id"] for p in profiles if p["role"] == role]
        for role in ("train", "val", "test")
    }
    slugs = list(SOUSA_RUDIMENTS)
    samples, exercises, strokes_all, measures_all = [], [], [], []
    media: list[tuple[FloatArray, bytes]] = []
    for k in range(n_samples):
        prof = order[k % len(order)]
        tier = prof["tier"]
        slug = slugs[int(rng.integers(len(slugs)))]
        tempo = int(rng.integers(80, 161))
        cycle_s = 8 * 60.0 / tempo / 4
        num_cycles = max(1, int(rng.uniform(1.0, 2.6) // cycle_s))
        duration = round(num_cycles * cycle_s + 0.3, 6)
        strokes = _sousa_strokes(slug, tempo, num_cycles, tier, rng)
        measures = _sousa_measures(strokes, num_cycles)
        soundfont = _SOUNDFONTS[int(rng.integers(len(_SOUNDFONTS)))]
        preset = "none" if rng.random() < 0.5 else list(_AUG_PRESETS)[int(rng.integers(3))]
        player = f"{_TIER_ABBR[tier]}{prof['num']:03d}"
        sample_id = f"{player}_{slug}_{tempo}bpm_{soundfont}_{preset}_{k:03d}"
        audio = _sousa_audio(strokes, duration, tier, rng)
        row: dict[str, Any] = {
            "sample_id": sample_id,
            "profile_id": prof["id"],
            "rudiment_slug": slug,
            "tempo_bpm": tempo,
            "duration_sec": duration,
            "num_cycles": num_cycles,
            "skill_tier": SOUSA_SKILL_TIERS[tier],
            "skill_tier_binary": "novice" if tier < 2 else "skilled",
            "dominant_hand": prof["hand"],
            "midi_path": f"midi/{slug}/{sample_id}.mid",
            "audio_path": f"audio/{slug}/{sample_id}.flac",
            "num_strokes": len(strokes),
            "num_measures": len(measures),
            "soundfont": soundfont,
            "augmentation_preset": preset,
            "augmentation_group_id": f"{prof['num']:03d}_{slug}_{tempo}_{k:03d}",
            "aug_soundfont": soundfont,
            "aug_room_type": None,
            "aug_room_wet_dry": None,
            "aug_mic_distance": None,
            "aug_mic_type": None,
            "aug_compression_ratio": None,
            "aug_noise_level_db": None,
            "aug_bit_depth": None,
            "aug_sample_rate": None,
        }
        if preset != "none":
            room, mic, wet, dist, comp, bits, rate = _AUG_PRESETS[preset]
            noise_db = round(float(rng.uniform(-60.0, -40.0)), 3)
            audio = audio + 10 ** (noise_db / 20) * rng.standard_normal(len(audio))
            row.update(
                aug_room_type=room,
                aug_room_wet_dry=wet,
                aug_mic_distance=dist,
                aug_mic_type=mic,
                aug_compression_ratio=comp,
                aug_noise_level_db=noise_db,
                aug_bit_depth=bits,
                aug_sample_rate=rate,
            )
        samples.append(row)
        exercises.append({"sample_id": sample_id, **_sousa_scores(slug, tier, strokes, rng)})
        strokes_all += [{"sample_id": sample_id, **s} for s in strokes]
        measures_all += [{"sample_id": sample_id, **m} for m in measures]
        media.append((_normalize(audio, 0.8), _midi_bytes(strokes, tempo)))
    return samples, exercises, strokes_all, measures_all, splits, media


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def make_sousa(root: str | Path, n_samples: int = 24, seed: int = 0) -> Path:
    """Write a synthetic SOUSA dataset in the local layout written by SOUSA's generator.

    ``audio/{rudiment_slug}/{sample_id}.flac`` (44.1 kHz mono 24-bit FLAC, ~1-3 s),
    ``midi/{rudiment_slug}/{sample_id}.mid``, ``labels/{samples,exercises,strokes,measures}
    .parquet`` (row groups of 8 rows), ``splits.json`` (by player profile) and ``index.json``.
    Five rudiments and all four skill tiers; the stroke pattern follows the rudiment and the
    timing/velocity spread and drum pitch follow the skill tier.  Returns ``root``.
    """
    root = Path(root)
    samples, exercises, strokes, measures, splits, media = _sousa_generate(n_samples, seed)
    for row, (audio, midi) in zip(samples, media, strict=True):
        _write_audio(root / row["audio_path"], audio, _SR_SOUSA, "PCM_24", fmt="FLAC")
        midi_path = root / row["midi_path"]
        midi_path.parent.mkdir(parents=True, exist_ok=True)
        midi_path.write_bytes(midi)
    labels = root / "labels"
    _write_parquet(_table(samples, _SAMPLE_SCHEMA), labels / "samples.parquet", _ROW_GROUP)
    _write_parquet(_table(exercises, _EXERCISE_SCHEMA), labels / "exercises.parquet", _ROW_GROUP)
    _write_parquet(_table(strokes, _STROKE_SCHEMA), labels / "strokes.parquet", _ROW_GROUP)
    _write_parquet(_table(measures, _MEASURE_SCHEMA), labels / "measures.parquet", _ROW_GROUP)
    _write_json(root / "splits.json", splits)
    _write_json(
        root / "index.json",
        {
            "num_samples": len(samples),
            "sample_ids": [r["sample_id"] for r in samples],
            "config": {"audio_format": "flac", "sample_rate": _SR_SOUSA},
        },
    )
    return root


def make_sousa_hf(root: str | Path, n_samples: int = 24, seed: int = 0) -> Path:
    """Write synthetic SOUSA in the Hugging Face layout: ``data/{split}-00000-of-00001.parquet``.

    ``split`` is train / validation / test (assigned by player profile).  Each shard holds the
    samples' label columns merged with the exercise scores, plus an ``audio`` struct column
    ``{bytes: FLAC file bytes, path: "<sample_id>.flac"}`` (the common HF ``Audio`` layout)
    instead of ``audio_path``; row groups of 4 rows.  Same content as :func:`make_sousa` for
    the same ``n_samples`` and ``seed``.  Returns ``root``.
    """
    root = Path(root)
    samples, exercises, _, _, splits, media = _sousa_generate(n_samples, seed)
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    label_fields = [f for f in _SAMPLE_SCHEMA if f.name != "audio_path"]
    schema = pa.schema(label_fields + list(_EXERCISE_SCHEMA)[1:] + [pa.field("audio", audio_type)])
    by_split: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    split_of = {
        pid: name
        for name, key in (
            ("train", "train_profile_ids"),
            ("validation", "val_profile_ids"),
            ("test", "test_profile_ids"),
        )
        for pid in splits[key]
    }
    for row, scores, (audio, _) in zip(samples, exercises, media, strict=True):
        buf = io.BytesIO()
        _write_audio(buf, audio, _SR_SOUSA, "PCM_24", fmt="FLAC")
        merged = {**row, **{k: v for k, v in scores.items() if k != "sample_id"}}
        merged["audio"] = {"bytes": buf.getvalue(), "path": f"{row['sample_id']}.flac"}
        by_split[split_of[row["profile_id"]]].append(merged)
    for name, rows in by_split.items():
        _write_parquet(_table(rows, schema), root / "data" / f"{name}-00000-of-00001.parquet", 4)
    return root


# --------------------------------------------------------------------------------------------
# Folder of per-sample tensors (the LFW blog layout)
# --------------------------------------------------------------------------------------------


def make_tensor_folder(
    root: str | Path,
    n_samples: int = 40,
    num_classes: int = 4,
    shape: tuple[int, ...] = (62, 47),
    seed: int = 0,
    fmt: str = "pt",
    labels: str = "json",
) -> Path:
    """Write one float32 array per sample plus a label mapping, the "data larger than RAM" layout.

    Files are ``image_{idx}.pt`` (``torch.save`` of a tensor; ``fmt="pt"``) or
    ``image_{idx}.npy`` (``fmt="npy"``).  Labels go to ``labels.json`` (``{"image_0": 2, ...}``,
    keyed by file stem; ``labels="json"``) or ``labels.csv`` (columns ``file,label`` where
    ``file`` is the file name, e.g. ``image_0.pt``; ``labels="csv"``).  Classes are balanced
    and each has its own oriented stripe pattern under noise.  Returns ``root``.
    """
    if fmt not in ("pt", "npy"):
        raise ValueError(f"fmt must be 'pt' or 'npy', got {fmt!r}")
    if labels not in ("json", "csv"):
        raise ValueError(f"labels must be 'json' or 'csv', got {labels!r}")
    if num_classes < 1 or n_samples < 1 or not shape:
        raise ValueError("n_samples, num_classes and shape must be non-empty/positive")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0.0, 1.0, s) for s in shape], indexing="ij")
    prototypes = []
    for c in range(num_classes):
        angle = np.pi * c / num_classes
        direction = [np.cos(angle), np.sin(angle)] + [0.5] * (len(shape) - 2)
        coord = sum(d * g for d, g in zip(direction, grids, strict=False))
        prototypes.append(np.sin(2 * np.pi * (2.0 + c) * coord))
    targets = rng.permutation([i % num_classes for i in range(n_samples)])
    if fmt == "pt":
        import torch  # only this layout needs torch
    mapping: dict[str, int] = {}
    for idx, label in enumerate(targets):
        x = (0.8 * prototypes[label] + 0.5 * rng.standard_normal(shape)).astype(np.float32)
        stem = f"image_{idx}"
        if fmt == "pt":
            torch.save(torch.from_numpy(x), root / f"{stem}.pt")
        else:
            np.save(root / f"{stem}.npy", x)
        mapping[stem] = int(label)
    if labels == "json":
        _write_json(root / "labels.json", mapping)
    else:
        files = [f"{stem}.{fmt}" for stem in mapping]
        frame = pd.DataFrame({"file": files, "label": list(mapping.values())})
        frame.to_csv(root / "labels.csv", index=False)
    return root
