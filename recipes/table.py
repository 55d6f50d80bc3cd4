"""Your own audio, described by a metadata table (CSV or Parquet).

Layout: a table with a path column (relative paths are resolved against ``root``: a local
folder or any fsspec URL, by default ``data_dir``, else the table's folder), a label column and
optionally a split column (``train``/``test`` values) or a fold column. Without either the split
is a seeded ``eval_fraction`` (or k-fold with ``folds``/``fold``). Classes are the label
column's distinct values in sorted order; every other column rides along into the batches
(choose them with ``columns``). **Segments**: with ``start_column`` and ``end_column`` (or
``duration_column``), in ``time_unit`` seconds or frames, each row is that part of its file
and only that part is read — several rows may share one file (lhotse supervisions, SpeechBrain
CSVs, hand-written annotations).

    recipe = TableRecipe(TableRecipe.Config(table="s3://bucket/meta.parquet",
                                            root="s3://bucket/audio", label_column="species",
                                            fold_column="fold", eval_folds="5"))

    flows train table --table meta.csv --data-dir ./clips --label-column species --seconds 3
    flows train table --table calls.csv --data-dir ./recordings --label-column species \
        --start-column start --end-column end --seconds 2
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from flows.flow import Flow
from flows.recipe import register
from flows.sources import Table
from recipes import synthetic
from recipes.common import (
    AudioConfig,
    ClassesRecipe,
    ClassIndex,
    as_names,
    audio_chain,
    batches,
    class_names,
    fixed_length,
    join,
    option,
    split,
)


@dataclass
class TableConfig(AudioConfig):
    table: str = option("metadata.csv", "the CSV or Parquet table: a path below data_dir or a URL")
    root: str | None = option(None, "where relative paths point (default: data_dir)")
    path_column: str = option("path", "the column of audio paths")
    label_column: str = option("label", "the column of class labels")
    columns: str | None = option(None, "the columns to keep, comma separated (default: all)")
    split_column: str | None = option(None, "a column naming each row's split")
    train_split: str = option("train", "--split-column value of the training rows")
    eval_split: str = option("test", "--split-column value of the evaluation rows")
    fold_column: str | None = option(None, "a column numbering each row's fold")
    train_folds: tuple[int, ...] | None = option(None, "training folds (default: all but --eval-folds)")
    eval_folds: tuple[int, ...] = option((1,), "evaluation folds")
    eval_fraction: float = option(0.2, "without split or fold column: held-out fraction (seeded)")
    folds: int = option(0, "without split or fold column, more than 1: seeded k-fold "
                        "cross-validation, evaluating on --fold")
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

    @property
    def url(self) -> str:
        table, data_dir = self.config.table, self.config.data_dir
        absolute = "://" in table or table.startswith("/")
        return table if absolute or data_dir is None else join(data_dir, table)

    @cached_property
    def classes(self) -> list[str]:
        label = self.config.label_column
        return class_names(self._table([label]).column(label))

    def _table(self, columns: list[str]) -> Table:
        return Table(self.url, columns, storage_options=self.config.storage_options)

    def _rows(self, train: bool) -> Flow:
        """The table's train or eval rows, each with ``path`` resolved."""
        c = self.config
        columns = None
        if c.columns is not None:
            columns = list(dict.fromkeys([*as_names(c.columns), c.label_column]))
            extra = (c.split_column, c.fold_column, c.start_column, c.end_column, c.duration_column)
            columns += [x for x in extra if x and x not in columns]
        where: dict[str, str | list[int]] | None = None
        if c.split_column is not None:
            where = {c.split_column: c.train_split if train else c.eval_split}
        elif c.fold_column is not None:
            held_out = [int(f) for f in c.eval_folds]
            every = sorted(int(f) for f in set(self._table([c.fold_column]).column(c.fold_column)))
            train_folds = [int(f) for f in (c.train_folds or every) if f not in held_out]
            where = {c.fold_column: train_folds if train else held_out}
        root = c.root or c.data_dir or posixpath.dirname(self.url)
        flow = Flow.table(self.url, columns, where, c.path_column, root, c.storage_options)
        if where is None:
            flow = split(flow, train, c.eval_fraction, c.seed, c.folds, c.fold)
        return flow

    @property
    def segment(self) -> dict | None:
        """The decode options naming each row's part of its file (None: whole files)."""
        c = self.config
        if c.start_column is None:
            return None
        return {"start": c.start_column, "end": c.end_column, "duration": c.duration_column,
                "unit": c.time_unit}

    def part(self, train: bool) -> Flow:
        c = self.config
        flow = self._rows(train).map(ClassIndex(c.label_column, self.classes, "label"))
        flow = audio_chain(flow, c, train, segment=self.segment)
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
