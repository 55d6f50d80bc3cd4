"""UrbanSound8K recipe on synthetic copies: predefined folds, heterogeneous audio to 8 kHz
mono 32000 samples (anti-aliased), class names from the CSV, the tutorial's optimizer and
schedule, 10-fold cross-validation, fsspec URLs, training and ``flows train urbansound8k``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from flows.training.cli import main
from flows.training.models import M5
from flows.training.train import TrainConfig, train
from recipes.synthetic import URBANSOUND8K_CLASSES
from recipes.urbansound8k import UrbanSound8K, cross_validation


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return UrbanSound8K.generate(tmp_path_factory.mktemp("us8k"), clips_per_fold=2)


def everything(flow) -> list[dict]:
    return list(flow.loader(prefetch=0))


def rows(data: Path) -> pd.DataFrame:
    return pd.read_csv(data / "metadata" / "UrbanSound8K.csv")


def test_folds_audio_and_labels(data: Path) -> None:
    recipe = UrbanSound8K(UrbanSound8K.Config(data_dir=str(data), batch_size=8))
    meta = rows(data)
    train_batches, eval_batches = everything(recipe.train_flow()), everything(recipe.eval_flow())
    train_names = [n for b in train_batches for n in b["slice_file_name"]]
    eval_names = [n for b in eval_batches for n in b["slice_file_name"]]
    assert sorted(train_names) == sorted(meta[meta.fold <= 9].slice_file_name)
    assert sorted(eval_names) == sorted(meta[meta.fold == 10].slice_file_name)
    for batch in train_batches + eval_batches:
        n = len(batch["slice_file_name"])
        assert batch["audio"].shape == (n, 1, 32_000) and batch["audio"].dtype == torch.float32
        assert batch["sample_rate"].tolist() == [8000] * n
        assert batch["classID"].dtype == torch.long
        assert [URBANSOUND8K_CLASSES[i] for i in batch["classID"]] == batch["class"]
    assert recipe.class_names == list(URBANSOUND8K_CLASSES)
    assert recipe.label_maps() == {"classID": list(URBANSOUND8K_CLASSES)}


def test_resampling_is_anti_aliased(tmp_path: Path) -> None:
    """A 44.1 kHz stereo clip with 1 kHz and 5 kHz tones: at 8 kHz the 5 kHz tone (above the new
    Nyquist frequency) must vanish, not fold over to 3 kHz as the tutorial's decimation does."""
    rate = 44_100
    t = np.arange(2 * rate) / rate
    tones = 0.4 * np.sin(2 * np.pi * 1000 * t) + 0.4 * np.sin(2 * np.pi * 5000 * t)
    (tmp_path / "audio" / "fold1").mkdir(parents=True)
    sf.write(tmp_path / "audio" / "fold1" / "1-0-0-0.wav", np.stack([tones, tones], 1), rate,
             subtype="PCM_24")
    (tmp_path / "metadata").mkdir()
    pd.DataFrame([{"slice_file_name": "1-0-0-0.wav", "fsID": 1, "start": 0.0, "end": 2.0,
                   "salience": 1, "fold": 1, "classID": 0, "class": "air_conditioner"}]).to_csv(
        tmp_path / "metadata" / "UrbanSound8K.csv", index=False)
    recipe = UrbanSound8K(UrbanSound8K.Config(data_dir=str(tmp_path), train_folds=(1,)))
    audio = everything(recipe.train_flow())[0]["audio"][0, 0, 4000:12000].numpy()
    spectrum = np.abs(np.fft.rfft(audio))  # 1 Hz bins over one second
    assert spectrum[1000] > 1000 * spectrum[2900:3100].max()
    naive = np.abs(np.fft.rfft(tones[::5][:8820]))  # every 5th sample: 8820 Hz, no low-pass
    assert naive[3820] > 0.5 * naive[1000]  # 5 kHz folded over to 8820 - 5000 Hz


def test_optimizer_scheduler_and_model(data: Path) -> None:
    recipe = UrbanSound8K(UrbanSound8K.Config(data_dir=str(data)))
    model = recipe.model()
    assert isinstance(model, M5)
    optimizer = recipe.optimizer(model)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["weight_decay"] == 1e-4
    scheduler = recipe.scheduler(optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert (scheduler.step_size, scheduler.gamma) == (20, 0.1)


def test_cross_validation_uses_the_given_folds(data: Path) -> None:
    config = UrbanSound8K.Config(data_dir=str(data), batch_size=64)
    meta = rows(data)
    held_out: list[str] = []
    for k, recipe in enumerate(cross_validation(config), start=1):
        assert recipe.config.eval_folds == (k,)
        evaluated, trained = recipe.eval_flow().source, recipe.train_flow().source
        assert evaluated is not None and trained is not None
        names = evaluated.column("slice_file_name").tolist()
        assert sorted(names) == sorted(meta[meta.fold == k].slice_file_name)
        held_out += names
        assert set(trained.column("fold").tolist()) == set(range(1, 11)) - {k}
    assert sorted(held_out) == sorted(meta.slice_file_name)  # each clip held out exactly once


def test_any_fsspec_url(data: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.put(str(data), "/us8k", recursive=True)
    try:
        config = UrbanSound8K.Config(data_dir="memory://us8k", eval_folds=(1, 2), batch_size=64)
        remote = everything(UrbanSound8K(config).eval_flow())
        local = everything(UrbanSound8K(dataclasses.replace(config, data_dir=str(data))).eval_flow())
        assert torch.equal(remote[0]["audio"], local[0]["audio"])
        assert remote[0]["path"][0].startswith("memory://us8k/audio/fold")
    finally:
        fs.rm("/us8k", recursive=True)


def test_trains_end_to_end(data: Path, tmp_path: Path) -> None:
    config = UrbanSound8K.Config(data_dir=str(data), epochs=1, train_folds=(1,), eval_folds=(10,))
    result = train(UrbanSound8K(config), TrainConfig(progress=False))  # M5: slow on CPU, 2 clips
    assert result.step == 1 and 0.0 <= result.metrics["accuracy"] <= 1.0
    code = main(["train", "urbansound8k", "--data-dir", str(data), "--epochs", "1",
                 "--train-folds", "1", "2", "--eval-folds", "3", "--model", "smallcnn",
                 "--checkpoint-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 0
