"""Tensor-folder recipe (the LFW blog): .pt/.npy files with JSON, CSV or dict labels, a seeded
80/20 split, memory that does not grow with the number of samples, training and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from flows.training.cli import main
from flows.training.train import TrainConfig, train
from recipes.tensor_folder import TensorFolder


def everything(flow) -> list[dict]:
    return list(flow.loader(prefetch=0))


@pytest.mark.parametrize(("fmt", "labels"), [("pt", "json"), ("npy", "csv")])
def test_split_and_labels(tmp_path: Path, fmt: str, labels: str) -> None:
    root = TensorFolder.generate(tmp_path, n_samples=40, fmt=fmt, labels=labels)
    recipe = TensorFolder(TensorFolder.Config(data_dir=str(root), batch_size=8))
    train_batches, eval_batches = everything(recipe.train_flow()), everything(recipe.eval_flow())
    train_keys = [k for b in train_batches for k in b["key"]]
    eval_keys = [k for b in eval_batches for k in b["key"]]
    assert (len(train_keys), len(eval_keys)) == (32, 8)
    assert sorted(train_keys + eval_keys) == sorted(f"image_{i}" for i in range(40))
    truth = (json.loads((root / "labels.json").read_text()) if labels == "json" else
             {line.split(",")[0][:-len(fmt) - 1]: int(line.split(",")[1])
              for line in (root / "labels.csv").read_text().splitlines()[1:]})
    for batch in train_batches + eval_batches:
        assert batch["tensor"].shape[1:] == (62, 47) and batch["tensor"].dtype == torch.float32
        assert batch["label"].tolist() == [truth[k] for k in batch["key"]]
    assert recipe.label_maps() == {"label": ["0", "1", "2", "3"]}
    output = recipe.model()(recipe.task().inputs(train_batches[0]))
    assert output.shape == (8, 4)


def test_dict_of_class_names(tmp_path: Path) -> None:
    root = TensorFolder.generate(tmp_path, n_samples=10, num_classes=2)
    names = {k: ["cat", "dog"][v] for k, v in json.loads((root / "labels.json").read_text()).items()}
    recipe = TensorFolder(TensorFolder.Config(data_dir=str(root), labels=names))
    assert recipe.classes == ["cat", "dog"]
    for batch in everything(recipe.train_flow()):
        assert [["cat", "dog"][i] for i in batch["label"]] == [names[k] for k in batch["key"]]


def rss() -> int:
    """This process's resident memory in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def growth(root: Path) -> int:
    """How far resident memory rises above where it was over one pass of the training flow."""
    loader = TensorFolder(TensorFolder.Config(data_dir=str(root), batch_size=16)).train_flow().loader()
    start = peak = rss()
    for _ in loader:
        peak = max(peak, rss())
    return peak - start


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_memory_does_not_grow_with_the_number_of_samples(tmp_path: Path) -> None:
    shape = (64, 64)  # 16 KiB per sample: holding 2000 of them would take 32 MiB
    small = TensorFolder.generate(tmp_path / "small", n_samples=200, shape=shape, fmt="npy")
    large = TensorFolder.generate(tmp_path / "large", n_samples=2000, shape=shape, fmt="npy")
    growth(small)  # warm up: first-time allocations of the loader, numpy and torch
    floor = 1 << 20
    small_growth, large_growth = growth(small), growth(large)
    ratio = max(large_growth, floor) / max(small_growth, floor)
    assert ratio < 3.0, (small_growth, large_growth)  # holding every sample: about 10
    assert large_growth < 8 << 20


def test_trains_and_runs_from_the_cli(tmp_path: Path) -> None:
    root = TensorFolder.generate(tmp_path / "data", n_samples=64)
    recipe = TensorFolder(TensorFolder.Config(data_dir=str(root), batch_size=16, epochs=3, lr=3e-3))
    result = train(recipe, TrainConfig(progress=False))
    assert result.metrics["accuracy"] >= 0.5  # 4 classes: chance is 0.25
    code = main(["train", "tensor_folder", "--data-dir", str(root), "--labels", "labels.json",
                 "--epochs", "1", "--checkpoint-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 0
