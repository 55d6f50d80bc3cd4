"""Table recipe (users' own audio described by a CSV or Parquet table): path, label, split and
fold columns, paths resolved against a root URL, seeded splits, stratified batches, training
and ``flows train table``."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pandas as pd
import pytest

from flows.training.cli import main
from flows.training.train import TrainConfig, train
from recipes.synthetic import URBANSOUND8K_CLASSES
from recipes.table import TableRecipe


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return TableRecipe.generate(tmp_path_factory.mktemp("table"), clips_per_fold=2)


def everything(flow) -> list[dict]:
    return list(flow.loader(prefetch=0))


def paths(flow) -> list[str]:
    return sorted(p for b in everything(flow) for p in b["path"])


def test_split_column(data: Path) -> None:
    recipe = TableRecipe(TableRecipe.Config(data_dir=str(data), split_column="split", seconds=1.0,
                                            sample_rate=8000, batch_size=8))
    meta = pd.read_csv(data / "metadata.csv")
    assert recipe.classes == sorted(URBANSOUND8K_CLASSES)
    train_batches = everything(recipe.train_flow())
    assert sorted(p for b in train_batches for p in b["path"]) == sorted(
        str(data / p) for p in meta[meta.split == "train"].path)
    assert paths(recipe.eval_flow()) == sorted(str(data / p) for p in meta[meta.split == "test"].path)
    for batch in train_batches:
        n = len(batch["path"])
        assert batch["audio"].shape == (n, 1, 8000) and batch["sample_rate"].tolist() == [8000] * n
        assert [recipe.classes[i] for i in batch["label"]] == batch["label_name"]
        assert batch["split"] == ["train"] * n and batch["fold"].max() <= 8  # columns ride along


def test_fold_column_and_ratio_split(data: Path) -> None:
    folds = TableRecipe(TableRecipe.Config(data_dir=str(data), fold_column="fold", eval_folds=(3, 4),
                                           seconds=0.5, batch_size=64))
    eval_folds = {f for b in everything(folds.eval_flow()) for f in b["fold"].tolist()}
    train_folds = {f for b in everything(folds.train_flow()) for f in b["fold"].tolist()}
    assert eval_folds == {3, 4} and train_folds == set(range(1, 11)) - {3, 4}
    ratio = TableRecipe(TableRecipe.Config(data_dir=str(data), eval_fraction=0.25, seconds=0.5,
                                           batch_size=64, columns="path,fold"))
    train_paths, eval_paths = paths(ratio.train_flow()), paths(ratio.eval_flow())
    assert (len(train_paths), len(eval_paths)) == (15, 5) and not set(train_paths) & set(eval_paths)
    assert set(everything(ratio.eval_flow())[0]) >= {"path", "fold", "label", "audio"}
    assert "split" not in everything(ratio.eval_flow())[0]


def test_parquet_table_with_a_root_url(data: Path, tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.put(str(data / "audio"), "/bucket/audio", recursive=True)
    try:
        meta = pd.read_csv(data / "metadata.csv").rename(columns={"path": "file", "label": "sound"})
        meta.to_parquet(tmp_path / "meta.parquet")
        recipe = TableRecipe(TableRecipe.Config(
            data_dir=str(tmp_path), table="meta.parquet", root="memory://bucket", path_column="file",
            label_column="sound", split_column="split", seconds=0.5, batch_size=64))
        batch = everything(recipe.eval_flow())[0]
        assert all(p.startswith("memory://bucket/audio/fold") for p in batch["path"])
        assert [recipe.classes[i] for i in batch["label"]] == batch["sound"]
    finally:
        fs.rm("/bucket", recursive=True)


def test_trains_and_runs_from_the_cli(data: Path, tmp_path: Path) -> None:
    recipe = TableRecipe(TableRecipe.Config(data_dir=str(data), split_column="split", seconds=1.0,
                                            batch_size=8, epochs=1))
    result = train(recipe, TrainConfig(progress=False))
    assert result.step == 2 and "accuracy" in result.metrics
    code = main(["train", "table", "--data-dir", str(data), "--table", "metadata.csv",
                 "--label-column", "label", "--fold-column", "fold", "--eval-folds", "10",
                 "--seconds", "1", "--epochs", "1", "--checkpoint-dir", str(tmp_path / "run"),
                 "--no-progress"])
    assert code == 0
