"""A folder of per-sample tensors (the "data larger than RAM" LFW blog post).

Layout: ``{data_dir}/{id}.pt`` (``torch.save`` of a tensor) or ``{id}.npy``, one per sample, and
a label mapping ``id -> label``: ``labels.json`` (``{"image_0": 3, ...}``), ``labels.csv``
(columns ``file,label``; ``file`` with or without its extension) or, from Python, a dict.
Labels are class indices or class names (indexed in natural order). Seeded 80/20 split,
stratified by class; samples are read one by one from disk (any fsspec URL), so memory does not
grow with their number.

    recipe = TensorFolder(TensorFolder.Config(data_dir="/content/data"))
    for batch in recipe.train_flow().loader(num_workers=4): ...   # tensor (B, 62, 47), label (B,)

    flows train tensor_folder --data-dir /content/data --labels labels.json
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from flows.errors import FlowsError
from flows.flow import Flow
from flows.sources.items import Items
from flows.sources.table import join_root
from flows.storage import io
from flows.training.recipe import RecipeConfig, register
from recipes import synthetic
from recipes.common import (
    MODEL_HELP,
    ClassesRecipe,
    batches,
    class_names,
    exists,
    join,
    option,
    read_json,
    require,
    split,
)

EXTENSIONS = (".pt", ".npy")


@dataclass
class TensorFolderConfig(RecipeConfig):
    labels: str | dict[str, Any] = option("auto", "the label mapping: a JSON or CSV file in "
                                          "data_dir or a URL (from Python also a dict); auto "
                                          "finds labels.json or labels.csv")
    eval_fraction: float = option(0.2, "held-out fraction (seeded)")
    stratify: bool = option(False, "training batches with about equal counts per class")
    dims: int = option(2, "SmallCNN convolutions: 2 for (H, W) samples, 1 for (T,) or (C, T)")
    model: str = option("smallcnn", MODEL_HELP)
    batch_size: int = 64
    epochs: int = 5


def stem(name: str) -> str:
    """``image_0`` from ``image_0.pt``, ``dir/image_0.npy`` or ``image_0``."""
    base = posixpath.basename(name)
    return base.rsplit(".", 1)[0] if base.endswith(EXTENSIONS) else base


@register
class TensorFolder(ClassesRecipe):
    name = "tensor_folder"
    input_key = "tensor"
    Config = TensorFolderConfig
    config: TensorFolderConfig
    data_hint = ("Point --data-dir at a folder of .pt/.npy files with labels.json or labels.csv, "
                 "or write a synthetic one with recipes.tensor_folder.TensorFolder.generate(root).")

    @cached_property
    def mapping(self) -> dict[str, Any]:
        """``{sample id: label}`` from the configured dict, JSON or CSV."""
        labels = self.config.labels
        if isinstance(labels, Mapping):
            return {stem(k): v for k, v in labels.items()}
        root, options = self.config.data_dir or "", self.config.storage_options
        if labels == "auto":
            found = [u for u in (join(root, "labels.json"), join(root, "labels.csv")) if exists(u, options)]
            if not found:
                raise FlowsError(f"no labels.json or labels.csv in {root}. {self.data_hint}")
            labels = found[0]
        url = join_root(self.config.data_dir or None, labels)
        if url.endswith(".json"):
            return {stem(k): v for k, v in read_json(url, options).items()}
        with io.open_file(url, options) as f:
            frame = pd.read_csv(f)
        files, values = frame.iloc[:, 0].tolist(), frame.iloc[:, 1].tolist()
        return {stem(str(k)): v for k, v in zip(files, values, strict=True)}

    @cached_property
    def classes(self) -> list[str]:
        """Class names by index: the indices themselves when labels are ints."""
        values = list(self.mapping.values())
        if all(isinstance(v, int) for v in values):
            return [str(i) for i in range(max(values) + 1)]
        return class_names(values)

    def present_classes(self) -> list[str]:
        return class_names(self.mapping.values())

    def records(self) -> list[dict[str, Any]]:
        """One ``{path, key, label}`` per file (the label mapping is read once, the tensors never)."""
        root = require(self.config.data_dir, self.data_hint, self.config.storage_options)
        index = {name: i for i, name in enumerate(self.classes)}
        rows = []
        for path in io.list_files(root, EXTENSIONS, storage_options=self.config.storage_options):
            key = stem(path)
            if key not in self.mapping:
                raise FlowsError(f"{path} has no label in the label mapping")
            rows.append({"path": path, "key": key, "label": index[str(self.mapping[key])]})
        return rows

    def part(self, train: bool) -> Flow:
        c = self.config
        flow = Flow.from_source(Items(self.records()), storage_options=c.storage_options)
        flow = split(flow, train, c.eval_fraction, c.seed, stratify="label").read().decode_tensor()
        return batches(flow, c, train, stratify="label" if c.stratify else None)


    def model_options(self) -> dict[str, Any]:
        return {"dims": self.config.dims} if self.config.model == "smallcnn" else {}

    @classmethod
    def generate(cls, root: str | Path, seed: int = 0, n_samples: int = 40, **options: Any) -> Path:
        """Synthetic per-sample tensors and a label mapping under ``root`` (options: num_classes,
        shape, fmt "pt"/"npy", labels "json"/"csv"); returns root."""
        return synthetic.make_tensor_folder(root, n_samples=n_samples, seed=seed, **options)
