"""Your own audio, described by a metadata table (CSV or Parquet).

Layout: a table with a path column, a label column and optionally a class id column, a split
column (``train``/``test`` values) or a fold column. ``table`` and ``root`` (where relative
paths in the path column point) are both resolved the same way: a relative path is below
``data_dir``; an absolute path or a URL is taken as it is. ``root`` defaults to ``data_dir``
(else the table's folder). Without a split or fold column the split is a seeded
``eval_fraction`` (or k-fold with ``folds``/``fold``), stratified by class. Classes: a numeric
label column keeps its values as class indices; with ``id_column`` the index is that column
and the names come from the label column; otherwise the label column's distinct values in
natural order ("2" before "10"). Every other column rides along into the batches (choose them
with ``columns``). **Segments**: with ``start_column`` and ``end_column`` (or
``duration_column``), in ``time_unit`` seconds or frames, each row is that part of its file
and only that part is read — several rows may share one file (lhotse supervisions, SpeechBrain
CSVs, hand-written annotations).

    recipe = TableRecipe(TableRecipe.Config(table="s3://bucket/meta.parquet",
                                            root="s3://bucket/audio", label_column="species",
                                            fold_column="fold", eval_folds="5"))

    flows train table --data-dir ./clips --table meta.csv --label-column species --seconds 3
    flows train table --data-dir ./recordings --table calls.csv --label-column species \
        --start-column start --end-column end --seconds 2
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flows.errors import FlowsError
from flows.flow import Flow
from flows.sources.table import Table, join_root
from flows.training.recipe import register
from recipes import synthetic
from recipes.common import (
    AudioConfig,
    ClassesRecipe,
    ClassIndex,
    as_names,
    audio_chain,
    batches,
    chosen_rate,
    class_names,
    exists,
    fixed_length,
    option,
    require_values,
    split,
)

RESOLVED = "a path relative to --data-dir, an absolute path or a URL"


@dataclass
class TableConfig(AudioConfig):
    table: str = option("metadata.csv", f"the CSV or Parquet table: {RESOLVED}")
    root: str | None = option(None, f"where the path column's relative paths point: {RESOLVED} "
                              "(default: --data-dir)")
    path_column: str = option("path", "the column of audio paths")
    label_column: str = option("label", "the column of class labels (integers are kept as the "
                               "class indices)")
    id_column: str | None = option(None, "a column of integer class ids matching "
                                   "--label-column's names: used as the class indices")
    columns: str | None = option(None, "the columns to keep, comma separated (default: all)")
    split_column: str | None = option(None, "a column naming each row's split")
    train_split: str = option("train", "--split-column value of the training rows")
    eval_split: str = option("test", "--split-column value of the evaluation rows")
    fold_column: str | None = option(None, "a column numbering each row's fold")
    train_folds: tuple[int, ...] | None = option(None, "training folds (default: all but --eval-folds)")
    eval_folds: tuple[int, ...] = option((1,), "evaluation folds")
    eval_fraction: float = option(0.2, "without split or fold column: held-out fraction (seeded, "
                                  "stratified by class)")
    folds: int = option(0, "without split or fold column, more than 1: seeded k-fold "
                        "cross-validation (stratified by class), evaluating on --fold")
    fold: int = option(0, "the held-out fold (0-based) with --folds")
    start_column: str | None = option(None, "segments: the column where each row's part of its file "
                                      "starts (lhotse, SpeechBrain and annotation tables)")
    end_column: str | None = option(None, "segments: the column where each part ends")
    duration_column: str | None = option(None, "segments: the column of each part's length (instead "
                                         "of --end-column)")
    time_unit: str = option("seconds", "segments: 'seconds' or 'frames' (of the file's own rate)")
    stratify: bool = True


@register
class TableRecipe(ClassesRecipe):
    name = "table"
    Config = TableConfig
    config: TableConfig
    data_hint = ("Give --table (a CSV or Parquet file with a path and a label column) and "
                 "--data-dir or --root for relative paths.")

    def resolve(self, path: str) -> str:
        """``path`` below ``data_dir`` when relative, else as it is."""
        return join_root(self.config.data_dir or None, path)

    @cached_property
    def url(self) -> str:
        """The table's URL (checked to exist)."""
        url = self.resolve(self.config.table)
        if not exists(url, self.config.storage_options):
            raise FlowsError(f"table {url} does not exist (--table is {RESOLVED})")
        return url

    @property
    def root(self) -> str:
        c = self.config
        return self.resolve(c.root) if c.root else c.data_dir or posixpath.dirname(self.url)

    @cached_property
    def class_index(self) -> dict[str, int]:
        """``{label: class index}``: a numeric label column's own values, the id column's, or
        the labels' position in natural order."""
        c = self.config
        labels = self._column(c.label_column)
        if c.id_column is not None:
            ids = self._column(c.id_column)
            if not np.issubdtype(ids.dtype, np.integer):
                raise FlowsError(f"table {self.url}: --id-column {c.id_column} holds "
                                 f"{ids.dtype} values, not integers")
            pairs = pd.DataFrame({"id": ids, "label": labels}).drop_duplicates()
            names = {c.id_column: "id", c.label_column: "label"}
            for column, field in names.items():
                twice = pairs[pairs[field].duplicated(keep=False)].sort_values(field)
                if len(twice):
                    raise FlowsError(f"table {self.url}: {column} {twice.iloc[0][field]!r} goes "
                                     "with several values of the other column "
                                     f"({' and '.join(names)} must match one to one)")
            index = {str(label): int(i) for i, label in zip(pairs["id"], pairs["label"], strict=True)}
        elif np.issubdtype(labels.dtype, np.integer):
            index = {str(v): int(v) for v in set(labels.tolist())}
        else:
            return {name: i for i, name in enumerate(class_names(labels))}
        negative = [v for v in index.values() if v < 0]
        if negative:
            raise FlowsError(f"table {self.url}: class index {negative[0]} is negative")
        return index

    @cached_property
    def classes(self) -> list[str]:
        """Class names by index (an index no row uses is named by its number)."""
        names = [str(i) for i in range(max(self.class_index.values(), default=-1) + 1)]
        for name, i in self.class_index.items():
            names[i] = name
        return names

    def present_classes(self) -> list[str]:
        return list(self.class_index)

    def class_hint(self) -> str:
        return f"Is --label-column {self.config.label_column} the column of classes?"

    @cached_property
    def metadata(self) -> Table:
        """The table's columns the recipe itself reads (label, id, split, fold, path: as
        configured), read once; its records carry the resolved ``path``."""
        c = self.config
        wanted = (c.label_column, c.id_column, c.split_column, c.fold_column, c.path_column)
        columns = list(dict.fromkeys(x for x in wanted if x is not None))
        return Table(self.url, columns, None, c.path_column, self.root, c.storage_options)

    def _column(self, name: str) -> np.ndarray:
        return self.metadata.column(name)

    @cached_property
    def wheres(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The train and eval rows by the split or fold column (None: a seeded split), both
        checked before either part is built."""
        return self._where(train=True), self._where(train=False)

    def _where(self, train: bool) -> dict[str, Any] | None:
        """The rows of the train or eval part by the split or fold column (None: a seeded split);
        an empty part is refused, naming the values the column holds."""
        c = self.config
        part = "train" if train else "eval"
        if c.split_column is not None:
            wanted = c.train_split if train else c.eval_split
            require_values(self.url, c.split_column, self._column(c.split_column), [wanted], part,
                           f"--{part}-split")
            return {c.split_column: wanted}
        if c.fold_column is not None:
            every = sorted({int(f) for f in self._column(c.fold_column)})
            held_out = [int(f) for f in c.eval_folds]
            if train:
                folds = [int(f) for f in (c.train_folds or every) if int(f) not in held_out]
                option = "--train-folds" if c.train_folds else "all but --eval-folds"
            else:
                folds, option = held_out, "--eval-folds"
            require_values(self.url, c.fold_column, every, folds, part, option)
            return {c.fold_column: folds}
        return None

    def _rows(self, train: bool) -> Flow:
        """The table's train or eval rows, each with ``path`` resolved."""
        c = self.config
        columns = None
        if c.columns is not None:
            columns = list(dict.fromkeys([*as_names(c.columns), c.label_column]))
            extra = (c.split_column, c.fold_column, c.start_column, c.end_column, c.duration_column)
            columns += [x for x in extra if x and x not in columns]
        where = self.wheres[0 if train else 1]
        flow = Flow.table(self.url, columns, where, c.path_column, self.root, c.storage_options)
        if where is None:
            flow = split(flow, train, c.eval_fraction, c.seed, c.folds, c.fold, c.label_column)
        return flow

    @property
    def segment(self) -> dict | None:
        """The decode options naming each row's part of its file (None: whole files)."""
        c = self.config
        if c.start_column is None:
            return None
        return {"start": c.start_column, "end": c.end_column, "duration": c.duration_column,
                "unit": c.time_unit}

    @cached_property
    def sample_rate(self) -> int:
        """``config.sample_rate``, else the files' own rate when they share one."""
        return chosen_rate(self.config, lambda: self.metadata)

    def part(self, train: bool) -> Flow:
        c = self.config
        flow = self._rows(train).map(ClassIndex(c.label_column, self.class_index, "label"))
        flow = audio_chain(flow, c, train, segment=self.segment, sample_rate=self.sample_rate)
        return batches(flow, c, train, stratify=c.label_column if c.stratify else None,
                       variable=not fixed_length(c))

    @classmethod
    def generate(cls, root: str | Path, seed: int = 0, clips_per_fold: int = 4) -> Path:
        """Synthetic clips with ``root/metadata.csv`` (path, label, fold, split: folds 1-8 are
        "train", 9-10 "test"): the synthetic UrbanSound8K re-described by a table; returns root."""
        root = synthetic.make_urbansound8k(root, clips_per_fold=clips_per_fold, seed=seed)
        meta = pd.read_csv(root / "metadata" / "UrbanSound8K.csv")
        paths = [f"audio/fold{f}/{n}" for f, n in zip(meta["fold"], meta["slice_file_name"], strict=True)]
        pd.DataFrame({
            "path": paths,
            "label": meta["class"],
            "fold": meta["fold"],
            "split": ["train" if f <= 8 else "test" for f in meta["fold"]],
        }).to_csv(root / "metadata.csv", index=False)
        return root
