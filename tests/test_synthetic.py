"""Tests for recipes.synthetic: exact layouts, schemas, heterogeneity, determinism, learnability."""

from __future__ import annotations

import io
import json
import re
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from recipes.synthetic import (
    SOUSA_SKILL_TIERS,
    URBANSOUND8K_CLASSES,
    URBANSOUND8K_SAMPLE_RATES,
    URBANSOUND8K_SUBTYPES,
    make_sousa,
    make_sousa_hf,
    make_tensor_folder,
    make_urbansound8k,
    make_yesno,
)

REAL_YESNO = Path(__file__).resolve().parents[1].parent / "shared/data/yesno/waves_yesno"
YESNO_NAME = re.compile(r"^[01](_[01]){7}\.wav$")


def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file's content; WAVs as format + samples, since libsndfile stamps the time of
    writing into the PEAK chunk of float WAVs."""

    def content(p: Path) -> bytes:
        if p.suffix != ".wav":
            return p.read_bytes()
        data, rate = sf.read(p, dtype="float64", always_2d=True)
        return f"{sf.info(p).subtype}/{rate}/{data.shape}".encode() + data.tobytes()

    return {str(p.relative_to(root)): content(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _labels(name: str) -> list[int]:
    return [int(b) for b in Path(name).stem.split("_")]


# --------------------------------------------------------------------------------------------
# YESNO
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def yesno(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_yesno(tmp_path_factory.mktemp("yesno"))


def test_yesno_layout_names_and_format(yesno: Path) -> None:
    assert yesno.name == "waves_yesno"
    assert (yesno / "README").is_file()
    wavs = sorted(yesno.glob("*.wav"))
    assert len(wavs) == 60 and {p.name for p in yesno.iterdir()} == {"README"} | {
        p.name for p in wavs
    }
    for wav in wavs:
        assert YESNO_NAME.match(wav.name), wav.name
        assert len(_labels(wav.name)) == 8
        info = sf.info(wav)
        assert (info.samplerate, info.channels, info.subtype, info.format) == (
            8000,
            1,
            "PCM_16",
            "WAV",
        )
        assert 4.9 <= info.duration <= 7.0
    all_labels = np.array([_labels(p.name) for p in wavs])
    assert 0.3 < all_labels.mean() < 0.7, "both words are common"


def test_yesno_words_are_acoustically_distinct(yesno: Path) -> None:
    """A crude learnability check: the high-band energy of a file tracks its number of yes-es."""
    ratios, yes_counts = [], []
    for wav in sorted(yesno.glob("*.wav")):
        x, sr = sf.read(wav)
        spec = np.abs(np.fft.rfft(x)) ** 2
        freqs = np.fft.rfftfreq(len(x), 1 / sr)
        ratios.append(spec[freqs > 2000].sum() / spec.sum())
        yes_counts.append(sum(_labels(wav.name)))
    assert np.corrcoef(ratios, yes_counts)[0, 1] > 0.8


def test_yesno_is_deterministic(tmp_path: Path) -> None:
    a = _tree_bytes(make_yesno(tmp_path / "a", n_files=6, seed=3))
    b = _tree_bytes(make_yesno(tmp_path / "b", n_files=6, seed=3))
    c = _tree_bytes(make_yesno(tmp_path / "c", n_files=6, seed=4))
    assert a == b
    assert a != c
    with pytest.raises(ValueError):
        make_yesno(tmp_path / "d", n_files=257)


@pytest.mark.skipif(not REAL_YESNO.is_dir(), reason="real YESNO corpus not available")
def test_synthetic_yesno_mimics_the_real_corpus(yesno: Path) -> None:
    real = sorted(REAL_YESNO.glob("*.wav"))
    assert len(real) == 60 and (REAL_YESNO / "README").is_file()
    real_infos = [sf.info(p) for p in real]
    assert all(YESNO_NAME.match(p.name) for p in real)
    signature = {(i.samplerate, i.channels, i.subtype, i.format) for i in real_infos}
    assert signature == {(8000, 1, "PCM_16", "WAV")}
    fake_infos = [sf.info(p) for p in sorted(yesno.glob("*.wav"))]
    assert {(i.samplerate, i.channels, i.subtype, i.format) for i in fake_infos} == signature
    real_durations = [i.duration for i in real_infos]
    lo, hi = min(real_durations) - 0.1, max(real_durations) + 0.1
    assert all(lo <= i.duration <= hi for i in fake_infos)


# --------------------------------------------------------------------------------------------
# UrbanSound8K
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def urbansound(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_urbansound8k(tmp_path_factory.mktemp("us8k"), clips_per_fold=4)


def test_urbansound8k_layout_and_metadata(urbansound: Path) -> None:
    meta = pd.read_csv(urbansound / "metadata" / "UrbanSound8K.csv")
    assert list(meta.columns) == [
        "slice_file_name",
        "fsID",
        "start",
        "end",
        "salience",
        "fold",
        "classID",
        "class",
    ]
    assert len(meta) == 40
    assert sorted(meta["fold"].unique()) == list(range(1, 11))
    assert (meta.groupby("fold").size() == 4).all()
    assert sorted(p.name for p in (urbansound / "audio").iterdir()) == sorted(
        f"fold{i}" for i in range(1, 11)
    )
    assert meta["slice_file_name"].is_unique
    for row in meta.to_dict("records"):
        fs_id, class_id, occurrence, slice_id = row["slice_file_name"][:-4].split("-")
        assert (int(fs_id), int(class_id)) == (row["fsID"], row["classID"])
        assert occurrence.isdigit() and slice_id.isdigit()
        assert row["class"] == URBANSOUND8K_CLASSES[row["classID"]]
        assert row["salience"] in (1, 2)
        info = sf.info(urbansound / "audio" / f"fold{row['fold']}" / row["slice_file_name"])
        assert info.duration <= 4.0 + 1e-9
        assert row["end"] - row["start"] == pytest.approx(info.duration, abs=1e-5)
    assert set(meta["classID"]) == set(range(10))
    files = sorted((urbansound / "audio").rglob("*.wav"))
    assert len(files) == 40


def test_urbansound8k_is_heterogeneous_like_the_real_corpus(urbansound: Path) -> None:
    infos = [sf.info(p) for p in sorted((urbansound / "audio").rglob("*.wav"))]
    assert {i.samplerate for i in infos} == set(URBANSOUND8K_SAMPLE_RATES)
    assert {i.channels for i in infos} == {1, 2}
    assert {i.subtype for i in infos} == set(URBANSOUND8K_SUBTYPES)
    assert {"PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT"} <= {i.subtype for i in infos}
    assert {i.format for i in infos} == {"WAV"}


def test_urbansound8k_classes_sound_different(urbansound: Path) -> None:
    """Spectral centroid below 4 kHz (after downmix) separates e.g. engine idling from drilling."""
    meta = pd.read_csv(urbansound / "metadata" / "UrbanSound8K.csv")
    centroid: dict[str, list[float]] = {}
    for row in meta.to_dict("records"):
        x, sr = sf.read(urbansound / "audio" / f"fold{row['fold']}" / row["slice_file_name"])
        x = x.mean(axis=1) if x.ndim == 2 else x
        power = np.abs(np.fft.rfft(x)) ** 2
        freqs = np.fft.rfftfreq(len(x), 1 / sr)
        band = freqs < 4000  # what a model sees after resampling to 8 kHz
        value = (power[band] * freqs[band]).sum() / power[band].sum()
        centroid.setdefault(row["class"], []).append(float(value))
    assert max(centroid["engine_idling"]) < min(centroid["drilling"])
    assert max(centroid["air_conditioner"]) < min(centroid["siren"])


def test_urbansound8k_is_deterministic(tmp_path: Path) -> None:
    a = _tree_bytes(make_urbansound8k(tmp_path / "a", clips_per_fold=1, seed=5))
    b = _tree_bytes(make_urbansound8k(tmp_path / "b", clips_per_fold=1, seed=5))
    assert a == b
    assert len([k for k in a if k.endswith(".wav")]) == 10


# --------------------------------------------------------------------------------------------
# SOUSA (local + Hugging Face layouts)
# --------------------------------------------------------------------------------------------

SAMPLE_TYPES = {
    "sample_id": pa.string(),
    "profile_id": pa.string(),
    "rudiment_slug": pa.string(),
    "tempo_bpm": pa.int64(),
    "duration_sec": pa.float64(),
    "num_cycles": pa.int64(),
    "skill_tier": pa.string(),
    "skill_tier_binary": pa.string(),
    "dominant_hand": pa.string(),
    "midi_path": pa.string(),
    "audio_path": pa.string(),
    "num_strokes": pa.int64(),
    "num_measures": pa.int64(),
    "soundfont": pa.string(),
    "augmentation_preset": pa.string(),
    "augmentation_group_id": pa.string(),
    "aug_soundfont": pa.string(),
    "aug_room_type": pa.string(),
    "aug_mic_type": pa.string(),
    "aug_room_wet_dry": pa.float64(),
    "aug_mic_distance": pa.float64(),
    "aug_compression_ratio": pa.float64(),
    "aug_noise_level_db": pa.float64(),
    "aug_bit_depth": pa.int64(),
    "aug_sample_rate": pa.int64(),
}
SCORES_0_100 = [
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
    "overall_score",
]
NULLABLE_SCORES = ["flam_quality", "diddle_quality", "roll_sustain"]


@pytest.fixture(scope="module")
def sousa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sousa(tmp_path_factory.mktemp("sousa"), n_samples=24)


def _midi_is_valid(data: bytes) -> bool:
    if data[:4] != b"MThd" or struct.unpack(">I", data[4:8])[0] != 6:
        return False
    track_len = struct.unpack(">I", data[18:22])[0]
    return data[14:18] == b"MTrk" and len(data) == 22 + track_len and data.endswith(b"\xff\x2f\x00")


def test_sousa_samples_table_and_media_layout(sousa: Path) -> None:
    table = pq.read_table(sousa / "labels" / "samples.parquet")
    assert {f.name: f.type for f in table.schema} == SAMPLE_TYPES
    assert pq.ParquetFile(sousa / "labels" / "samples.parquet").num_row_groups > 1
    df = table.to_pandas()
    assert len(df) == 24 and df["sample_id"].is_unique
    assert set(df["skill_tier"]) == set(SOUSA_SKILL_TIERS)
    assert df["rudiment_slug"].nunique() >= 3
    assert set(df["skill_tier_binary"]) == {"novice", "skilled"}
    assert set(df["dominant_hand"]) <= {"right", "left"}
    assert df["aug_bit_depth"].isna().any()
    for row in df.itertuples(index=False):
        assert row.audio_path == f"audio/{row.rudiment_slug}/{row.sample_id}.flac"
        assert row.midi_path == f"midi/{row.rudiment_slug}/{row.sample_id}.mid"
        info = sf.info(sousa / row.audio_path)
        assert (info.samplerate, info.channels, info.subtype, info.format) == (
            44100,
            1,
            "PCM_24",
            "FLAC",
        )
        assert 1.0 <= info.duration <= 3.0
        assert info.duration == pytest.approx(row.duration_sec, abs=1e-3)
        assert _midi_is_valid((sousa / row.midi_path).read_bytes())
    assert len(list((sousa / "audio").rglob("*.flac"))) == 24
    assert len(list((sousa / "midi").rglob("*.mid"))) == 24


def test_sousa_exercise_scores(sousa: Path) -> None:
    table = pq.read_table(sousa / "labels" / "exercises.parquet")
    expected = ["sample_id"] + SCORES_0_100 + ["groove_feel_proxy", "tier_confidence"]
    assert sorted(table.schema.names) == sorted(expected)
    assert all(table.schema.field(c).type == pa.float64() for c in expected[1:])
    df = table.to_pandas()
    for col in SCORES_0_100:
        values = df[col].dropna()
        assert ((values >= 0) & (values <= 100)).all(), col
    for col in ("groove_feel_proxy", "tier_confidence"):
        assert ((df[col] >= 0) & (df[col] <= 1)).all(), col
    for col in NULLABLE_SCORES:
        assert df[col].isna().any() and df[col].notna().any(), col
    non_null = [c for c in expected[1:] if c not in NULLABLE_SCORES]
    assert df[non_null].notna().all().all()


def test_sousa_strokes_and_measures_match_the_samples(sousa: Path) -> None:
    samples = pd.read_parquet(sousa / "labels" / "samples.parquet").set_index("sample_id")
    for name, count_col in (("strokes", "num_strokes"), ("measures", "num_measures")):
        path = sousa / "labels" / f"{name}.parquet"
        assert pq.ParquetFile(path).num_row_groups > 1
        df = pd.read_parquet(path)
        assert not df.duplicated(["sample_id", "index"]).any()
        counts = df.groupby("sample_id").size()
        assert counts.sort_index().tolist() == samples[count_col].sort_index().tolist()
    strokes = pd.read_parquet(sousa / "labels" / "strokes.parquet")
    grace = strokes[strokes["is_grace_note"]]
    assert len(grace) and grace["parent_stroke_index"].notna().all()
    # The skill tier drives the timing spread (what a skill model has to hear).
    tiers = strokes.join(samples["skill_tier"], on="sample_id")
    spread = tiers[~tiers["is_grace_note"]].groupby("skill_tier")["timing_error_ms"].std()
    assert spread["beginner"] > spread["intermediate"] > spread["advanced"]
    assert spread["advanced"] > spread["professional"]


def test_sousa_splits_are_by_profile_and_index_lists_samples(sousa: Path) -> None:
    splits = json.loads((sousa / "splits.json").read_text())
    assert set(splits) == {"train_profile_ids", "val_profile_ids", "test_profile_ids"}
    sets = [set(splits[k]) for k in ("train_profile_ids", "val_profile_ids", "test_profile_ids")]
    assert all(sets)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    samples = pd.read_parquet(sousa / "labels" / "samples.parquet")
    assert set(samples["profile_id"]) <= sets[0] | sets[1] | sets[2]
    index = json.loads((sousa / "index.json").read_text())
    assert index["num_samples"] == 24
    assert index["sample_ids"] == samples["sample_id"].tolist()


def test_sousa_hf_layout(sousa: Path, tmp_path: Path) -> None:
    root = make_sousa_hf(tmp_path / "hf", n_samples=24)
    assert sorted(p.name for p in (root / "data").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet",
    ]
    local = pd.read_parquet(sousa / "labels" / "samples.parquet").set_index("sample_id")
    splits = json.loads((sousa / "splits.json").read_text())
    split_keys = {
        "train": "train_profile_ids",
        "validation": "val_profile_ids",
        "test": "test_profile_ids",
    }
    seen: list[str] = []
    for split, key in split_keys.items():
        path = root / "data" / f"{split}-00000-of-00001.parquet"
        table = pq.read_table(path)
        assert table.num_rows > 0
        assert table.schema.field("audio").type == pa.struct(
            [("bytes", pa.binary()), ("path", pa.string())]
        )
        assert set(SAMPLE_TYPES) - {"audio_path"} <= set(table.schema.names)
        assert {"overall_score", "flam_quality", "tier_confidence"} <= set(table.schema.names)
        if table.num_rows > 4:
            assert pq.ParquetFile(path).num_row_groups > 1
        df = table.to_pandas()
        assert set(df["profile_id"]) <= set(splits[key])
        for row in df.itertuples(index=False):
            audio = row.audio
            assert audio["path"] == f"{row.sample_id}.flac"
            data, sr = sf.read(io.BytesIO(audio["bytes"]))
            assert sr == 44100 and data.ndim == 1
            assert len(data) / sr == pytest.approx(local.loc[row.sample_id, "duration_sec"], 1e-3)
        seen += df["sample_id"].tolist()
    assert sorted(seen) == sorted(local.index)


def test_sousa_is_deterministic(tmp_path: Path) -> None:
    a = _tree_bytes(make_sousa(tmp_path / "a", n_samples=5, seed=9))
    b = _tree_bytes(make_sousa(tmp_path / "b", n_samples=5, seed=9))
    assert a == b
    ha = _tree_bytes(make_sousa_hf(tmp_path / "ha", n_samples=5, seed=9))
    hb = _tree_bytes(make_sousa_hf(tmp_path / "hb", n_samples=5, seed=9))
    assert ha == hb


# --------------------------------------------------------------------------------------------
# Tensor folder
# --------------------------------------------------------------------------------------------


def _load(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    import torch

    tensor = torch.load(path, weights_only=True)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    return tensor.numpy()


@pytest.mark.parametrize("fmt,labels", [("pt", "json"), ("npy", "csv"), ("pt", "csv")])
def test_tensor_folder_layout_labels_and_classes(tmp_path: Path, fmt: str, labels: str) -> None:
    root = make_tensor_folder(tmp_path / "t", n_samples=24, num_classes=3, fmt=fmt, labels=labels)
    files = sorted(root.glob(f"image_*.{fmt}"))
    assert len(files) == 24
    assert {p.name for p in root.iterdir()} == {p.name for p in files} | {f"labels.{labels}"}
    if labels == "json":
        mapping = json.loads((root / "labels.json").read_text())
    else:
        frame = pd.read_csv(root / "labels.csv")
        assert list(frame.columns) == ["file", "label"]
        assert all((root / f).is_file() for f in frame["file"])
        mapping = {Path(f).stem: int(y) for f, y in zip(frame["file"], frame["label"], strict=True)}
    assert set(mapping) == {f"image_{i}" for i in range(24)}
    assert sorted(mapping.values()) == sorted([i % 3 for i in range(24)])
    xs = {p.stem: _load(p) for p in files}
    assert all(x.shape == (62, 47) and x.dtype == np.float32 for x in xs.values())
    # Learnable: a nearest-centroid classifier fit on half the samples labels the rest.
    stems = sorted(xs, key=lambda s: int(s.split("_")[1]))
    fit, held = stems[::2], stems[1::2]
    centroids = {c: np.mean([xs[s] for s in fit if mapping[s] == c], axis=0) for c in range(3)}
    hits = [
        min(centroids, key=lambda c: float(((xs[s] - centroids[c]) ** 2).sum())) == mapping[s]
        for s in held
    ]
    assert np.mean(hits) >= 0.9


def test_tensor_folder_is_deterministic_and_checks_arguments(tmp_path: Path) -> None:
    for fmt in ("npy", "pt"):
        a = make_tensor_folder(tmp_path / f"a{fmt}", n_samples=6, seed=2, fmt=fmt)
        b = make_tensor_folder(tmp_path / f"b{fmt}", n_samples=6, seed=2, fmt=fmt)
        for p in sorted(a.iterdir()):
            if fmt == "npy" or p.suffix != ".pt":
                assert p.read_bytes() == (b / p.name).read_bytes()
            else:
                assert np.array_equal(_load(p), _load(b / p.name))
    with pytest.raises(ValueError):
        make_tensor_folder(tmp_path / "x", fmt="png")
    with pytest.raises(ValueError):
        make_tensor_folder(tmp_path / "y", labels="yaml")
