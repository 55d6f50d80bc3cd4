"""UrbanSound8K: 8732 labelled clips (<= 4 s) of 10 urban sound classes in 10 predefined folds.

Layout: ``{data_dir}/metadata/UrbanSound8K.csv`` (slice_file_name, fsID, start, end, salience,
fold, classID, class) and ``{data_dir}/audio/fold1`` ... ``fold10``. The clips are heterogeneous
(8 to 96 kHz, mono or stereo, 8 to 32-bit): each is decoded, downmixed, resampled with an
anti-aliasing filter (default 8 kHz, where the tutorial decimated naively) and padded/trimmed to
4 s = 32000 samples. The folds are never mixed: train on folds 1-9 and test on fold 10 by
default, or run the authors' 10-fold cross-validation with :func:`cross_validation`.

    recipe = UrbanSound8K(UrbanSound8K.Config(data_dir="data/UrbanSound8K"))
    for batch in recipe.train_flow().loader(num_workers=4): ...   # audio (B, 1, 32000), classID

    flows train urbansound8k --data-dir s3://bucket/UrbanSound8K --train-folds 1-8 --eval-folds 9
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from flows.flow import Flow
from flows.stages.base import Stage
from flows.storage import io
from flows.training.models import Outputs
from flows.training.recipe import register
from flows.training.tasks import Classification, Task
from recipes import synthetic
from recipes.common import (
    AudioConfig,
    BaseRecipe,
    audio_chain,
    batches,
    fixed_length,
    join,
    option,
    require,
    require_values,
)

FOLDS = range(1, 11)


@dataclass
class UrbanSound8KConfig(AudioConfig):
    train_folds: tuple[int, ...] = option(tuple(range(1, 10)), "folds to train on")
    eval_folds: tuple[int, ...] = option((10,), "folds to evaluate on")
    weight_decay: float = option(1e-4, "Adam weight decay")
    step_size: int = option(20, "StepLR: multiply the learning rate by --gamma every N epochs")
    gamma: float = option(0.1, "StepLR factor")
    sample_rate: int = 8000
    seconds: float | None = 4.0  # 32000 samples at 8 kHz
    model: str = "m5"
    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.01


class FoldPath(Stage):
    """``path``: ``{root}/audio/fold{fold}/{slice_file_name}`` of a metadata row."""

    name = "fold_path"

    def __init__(self, root: str):
        self.root = root

    def __call__(self, row: dict) -> dict:
        return {**row, "path": join(self.root, "audio", f"fold{row['fold']}", row["slice_file_name"])}


@register
class UrbanSound8K(BaseRecipe):
    name = "urbansound8k"
    Config = UrbanSound8KConfig
    config: UrbanSound8KConfig
    data_hint = ("UrbanSound8K is distributed at https://urbansounddataset.weebly.com/urbansound8k.html "
                 "(after accepting its licence): point --data-dir at the folder holding metadata/ "
                 "and audio/, or write a synthetic copy with "
                 "recipes.urbansound8k.UrbanSound8K.generate(root).")

    @cached_property
    def metadata(self) -> str:
        """The metadata CSV's URL (data_dir checked to exist)."""
        return join(require(self.config.data_dir, self.data_hint, self.config.storage_options),
                    "metadata", "UrbanSound8K.csv")

    @cached_property
    def table(self) -> pd.DataFrame:
        """The CSV's fold, classID and class columns, read once."""
        with io.open_file(self.metadata, self.config.storage_options) as f:
            return pd.read_csv(f, usecols=["fold", "classID", "class"])

    @cached_property
    def class_names(self) -> list[str]:
        """Class names by classID, from the CSV."""
        pairs = self.table[["classID", "class"]].drop_duplicates()
        return [str(n) for n in pairs.sort_values("classID")["class"]]

    @cached_property
    def folds(self) -> list[int]:
        """The folds the metadata holds."""
        return sorted({int(v) for v in self.table["fold"]})

    def _part(self, folds: Sequence[int], train: bool) -> Flow:
        c = self.config
        part = "train" if train else "eval"
        require_values(self.metadata, "fold", self.folds, folds, part, f"--{part}-folds")
        flow = (Flow.table(self.metadata, where={"fold": [int(f) for f in folds]},
                           storage_options=c.storage_options)
                .map(FoldPath(c.data_dir or "")))
        flow = audio_chain(flow, c, train)
        return batches(flow, c, train, stratify="classID" if c.stratify else None,
                       variable=not fixed_length(c))

    def train_flow(self) -> Flow:
        return self._part(self.config.train_folds, train=True)

    def eval_flow(self) -> Flow:
        return self._part(self.config.eval_folds, train=False)

    def outputs(self) -> Outputs:
        return len(self.class_names)

    def task(self) -> Task:
        return Classification("classID")

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.config.lr,
                                weight_decay=self.config.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(optimizer, self.config.step_size, self.config.gamma)

    def label_maps(self) -> dict[str, list[str]]:
        return {"classID": self.class_names}

    @classmethod
    def generate(cls, root: str | Path, seed: int = 0, clips_per_fold: int = 4) -> Path:
        """A synthetic UrbanSound8K under ``root`` (metadata/ and audio/fold1..10); returns root."""
        return synthetic.make_urbansound8k(root, clips_per_fold=clips_per_fold, seed=seed)


def cross_validation(config: UrbanSound8KConfig) -> Iterator[UrbanSound8K]:
    """The authors' 10-fold protocol: recipe ``k`` evaluates on fold ``k`` and trains on the 9
    others (average the 10 scores)."""
    for k in FOLDS:
        others = tuple(f for f in FOLDS if f != k)
        yield UrbanSound8K(dataclasses.replace(config, train_folds=others, eval_folds=(k,)))
