"""Folder recipe (users' own audio): labels from parent folders, a regex or a callable;
heterogeneous audio to one rate and length; seeded splits and k-fold; stratified batches;
fsspec URLs, training and ``flows train folder``."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import fsspec
import pytest
import torch

from flows.errors import FlowsError
from flows.training.cli import main
from flows.training.train import TrainConfig, train
from recipes.folder import Folder

CLASSES = ["air_conditioner", "car_horn", "children_playing", "dog_bark"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Folder.generate(tmp_path_factory.mktemp("folder"), clips_per_class=4)


def everything(flow) -> list[dict]:
    return list(flow.loader(prefetch=0))


def test_parent_folder_labels_and_audio(data: Path) -> None:
    recipe = Folder(Folder.Config(data_dir=str(data), sample_rate=8000, seconds=1.5, batch_size=4))
    assert recipe.classes == CLASSES
    batches = everything(recipe.train_flow()) + everything(recipe.eval_flow())
    assert sum(len(b["key"]) for b in batches) == 16
    for batch in batches:
        n = len(batch["key"])
        assert batch["audio"].shape == (n, 1, 12_000) and batch["sample_rate"].tolist() == [8000] * n
        assert [k.split("/")[0] for k in batch["key"]] == batch["label_name"]
        assert [CLASSES[i] for i in batch["label"]] == batch["label_name"]
        assert batch["attention_mask"].sum(1).tolist() == batch["lengths"].tolist()


def test_stratified_training_batches(data: Path) -> None:
    recipe = Folder(Folder.Config(data_dir=str(data), eval_fraction=0.25, batch_size=4, seconds=0.5))
    first = everything(recipe.train_flow())[0]
    assert sorted(first["label_name"]) == CLASSES  # 3 of each class in training: 1 per batch


def test_regex_and_callable_labels(data: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for wav in data.glob("*/*.wav"):
        shutil.copy(wav, flat / f"{wav.parent.name}_{wav.name}")  # dog_bark_1234-3-0-1.wav
    by_regex = Folder(Folder.Config(data_dir=str(flat), label=r"^(?P<label>[a-z_]+?)_\d"))
    assert by_regex.classes == CLASSES
    by_callable = Folder(Folder.Config(data_dir=str(flat), label=lambda name: name.split("-")[1]))
    assert by_callable.classes == ["0", "1", "2", "3"]  # the classID inside the name
    with pytest.raises(FlowsError, match="does not match"):
        _ = Folder(Folder.Config(data_dir=str(flat), label=r"^cat")).classes


def test_k_fold_holds_each_file_out_once(data: Path) -> None:
    held_out: Counter[str] = Counter()
    for fold in range(4):
        recipe = Folder(Folder.Config(data_dir=str(data), folds=4, fold=fold, seconds=0.5))
        source = recipe.eval_flow().source
        assert source is not None and len(source) == 4
        held_out.update(source.column("key").tolist())
    assert len(held_out) == 16 and set(held_out.values()) == {1}


def test_fsspec_url_and_variable_length(data: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.put(str(data), "/clips", recursive=True)
    try:
        recipe = Folder(Folder.Config(data_dir="memory://clips", mono=True, batch_size=16,
                                      eval_fraction=0.25))
        batch = everything(recipe.train_flow())[0]
        assert batch["key"][0].split("/")[0] in CLASSES
        assert batch["audio"].shape[-1] == max(batch["lengths"].tolist())  # whole clips, padded
        assert len(set(batch["lengths"].tolist())) > 1
    finally:
        fs.rm("/clips", recursive=True)


def test_trains_and_runs_from_the_cli(data: Path, tmp_path: Path) -> None:
    recipe = Folder(Folder.Config(data_dir=str(data), seconds=1.0, batch_size=4, epochs=1))
    result = train(recipe, TrainConfig(progress=False))
    assert result.step == 4 and torch.isfinite(torch.tensor(result.metrics["loss"]))  # 13 files
    code = main(["train", "folder", "--data-dir", str(data), "--seconds", "1", "--sample-rate",
                 "8000", "--folds", "4", "--fold", "1", "--epochs", "1", "--checkpoint-dir",
                 str(tmp_path / "run"), "--no-progress"])
    assert code == 0
