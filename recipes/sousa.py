"""SOUSA: synthetic snare-drum rudiment performances with skill tiers and performance scores.

Two layouts, detected from ``data_dir``:

- local (written by SOUSA's generator): ``labels/samples.parquet``, ``labels/exercises.parquet``,
  ``splits.json`` (player profile ids per split) and ``audio/{rudiment_slug}/{sample_id}.flac``;
- Hugging Face: ``data/{split}-NNNNN-of-NNNNN.parquet`` shards holding the same columns and the
  audio embedded as an ``audio`` ``{bytes, path}`` struct (streamed by row group).

``target`` is a class column (``skill_tier``, ``rudiment_slug``, ...: field ``{column}_id``), a
score column (regression normalised to [0, 1]: field ``{column}_norm``) or several, comma
separated (multi-task, one head each). Rows whose target is null (e.g. ``flam_quality`` outside
flams) are left out. Audio is resampled 44.1 -> 16 kHz; whole clips are batched with ``lengths``
and ``attention_mask`` (or cut to ``seconds``, padded when ``pad``); training batches are
stratified on the first class target.

    recipe = Sousa(Sousa.Config(data_dir="output/dataset", target="skill_tier,overall_score"))
    recipe.label_maps()   # {"skill_tier_id": ["beginner", "intermediate", "advanced", "professional"]}

    flows train sousa --data-dir output/dataset --target overall_score --seconds 5
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from flows.errors import FlowsError
from flows.flow import Flow
from flows.sources.items import Items
from flows.sources.table import Table
from flows.stages.base import Stage
from flows.storage import io
from flows.training.models import Outputs
from flows.training.recipe import register
from flows.training.tasks import Classification, MultiTask, Regression, Task
from recipes import synthetic
from recipes.common import (
    AudioConfig,
    BaseRecipe,
    Concat,
    as_names,
    audio_chain,
    batches,
    class_names,
    exists,
    fixed_length,
    join,
    option,
    read_json,
    require,
)

SKILL_TIERS = ("beginner", "intermediate", "advanced", "professional")
CLASS_ORDER = {"skill_tier": SKILL_TIERS, "skill_tier_binary": ("novice", "skilled")}
SCORE_SCALE = {  # scores are 0-100 except these two (0-1); other numbers use their min and max
    **{c: 100.0 for c in (
        "timing_accuracy", "timing_consistency", "tempo_stability", "subdivision_evenness",
        "velocity_control", "accent_differentiation", "accent_accuracy", "hand_balance",
        "weak_hand_index", "flam_quality", "diddle_quality", "roll_sustain", "overall_score")},
    "groove_feel_proxy": 1.0,
    "tier_confidence": 1.0,
}
METADATA = ("sample_id", "profile_id", "rudiment_slug", "skill_tier", "tempo_bpm", "duration_sec")
HF_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


@dataclass
class SousaConfig(AudioConfig):
    target: str | Sequence[str] = option("skill_tier", "a class or score column, or several "
                                         "for multi-task: skill_tier,overall_score")
    layout: Literal["auto", "local", "hf"] = option("auto", "local (labels/, audio/) or hf "
                                                   "(data/{split}-*.parquet); auto detects it")
    train_split: str = option("train", "train, validation or test")
    eval_split: str = option("validation", "train, validation or test")
    stratify: bool = True  # on the first class target
    sample_rate: int | None = 16_000


@dataclass(frozen=True)
class Target:
    """One prediction target: a class column (``classes`` by index) or a number scaled from
    [low, high] to [0, 1]."""

    column: str
    classes: tuple[str, ...] | None = None
    low: float = 0.0
    high: float = 1.0

    @property
    def field(self) -> str:
        return f"{self.column}_id" if self.classes is not None else f"{self.column}_norm"

    def value(self, raw: object) -> int | torch.Tensor:
        if self.classes is not None:
            return self.classes.index(str(raw))
        scaled = (float(raw) - self.low) / (self.high - self.low or 1.0)  # type: ignore[arg-type]
        return torch.tensor(min(max(scaled, 0.0), 1.0))

    @classmethod
    def of(cls, column: str, values: pd.Series) -> Target:
        """The target for ``column`` given all its values (every split)."""
        if pd.api.types.is_numeric_dtype(values):
            if column in SCORE_SCALE:
                return cls(column, None, 0.0, SCORE_SCALE[column])
            return cls(column, None, float(values.min()), float(values.max()))
        return cls(column, tuple(CLASS_ORDER.get(column) or class_names(values.dropna())))


class AddTargets(Stage):
    """Add each target's field: a class index (int) or a normalised score (float tensor)."""

    name = "targets"

    def __init__(self, targets: tuple[Target, ...]):
        self.targets = targets

    def __call__(self, item: dict) -> dict:
        return {**item, **{t.field: t.value(item[t.column]) for t in self.targets}}


def read_parquet(url: str, columns: list[str] | None, storage_options: dict | None) -> pd.DataFrame:
    with io.open_file(url, storage_options) as f:
        return pq.read_table(f, columns=columns).to_pandas()


def parquet_columns(url: str, storage_options: dict | None) -> list[str]:
    with io.open_file(url, storage_options) as f:
        return list(pq.ParquetFile(f).schema_arrow.names)


@register
class Sousa(BaseRecipe):
    name = "sousa"
    Config = SousaConfig
    config: SousaConfig
    data_hint = ("Generate SOUSA with its generator (github.com/zakkeown/SOUSA), download the "
                 "Hugging Face copy, or write a synthetic copy with "
                 "recipes.sousa.Sousa.generate(root) (or generate(root, layout='hf')).")

    # ---- where the data is -------------------------------------------------------------------
    @cached_property
    def root(self) -> str:
        return require(self.config.data_dir, self.data_hint, self.config.storage_options)

    @cached_property
    def layout(self) -> str:
        if self.config.layout != "auto":
            return self.config.layout
        local = exists(join(self.root, "labels", "samples.parquet"), self.config.storage_options)
        return "local" if local else "hf"

    @cached_property
    def all_shards(self) -> list[str]:
        """Every Parquet shard of the Hugging Face layout."""
        return io.list_files(join(self.root, "data"), [".parquet"],
                             storage_options=self.config.storage_options)

    def shards(self, split: str) -> list[str]:
        """The Hugging Face Parquet shards of ``split``."""
        name = HF_SPLITS.get(split, split)
        found = [f for f in self.all_shards if posixpath.basename(f).startswith(f"{name}-")]
        if not found:
            raise FlowsError(f"no {name}-*.parquet shards under {join(self.root, 'data')}")
        return found

    # ---- targets -------------------------------------------------------------------------------
    @cached_property
    def targets(self) -> tuple[Target, ...]:
        columns = as_names(self.config.target)
        frame = self.labels if self.layout == "local" else pd.concat(
            [read_parquet(s, columns, self.config.storage_options) for s in self.all_shards])
        return tuple(Target.of(c, frame[c]) for c in columns)

    @cached_property
    def labels(self) -> pd.DataFrame:
        """Local layout: every sample row joined with the exercise scores the targets need."""
        extra = as_names(self.config.target)
        options = self.config.storage_options
        samples_url = join(self.root, "labels", "samples.parquet")
        scores_url = join(self.root, "labels", "exercises.parquet")
        in_samples, in_scores = parquet_columns(samples_url, options), parquet_columns(scores_url, options)
        missing = [c for c in extra if c not in in_samples and c not in in_scores]
        if missing:
            raise FlowsError(f"SOUSA has no column(s) {missing}; classes: {in_samples}, "
                             f"scores: {in_scores}")
        wanted = [*METADATA, "audio_path", *(c for c in extra if c in in_samples)]
        frame = read_parquet(samples_url, list(dict.fromkeys(wanted)), options)
        scores = [c for c in extra if c not in in_samples]
        if scores:
            frame = frame.merge(read_parquet(scores_url, ["sample_id", *scores], options),
                                on="sample_id", how="left")
        return frame

    # ---- flows -----------------------------------------------------------------------------------
    def records(self, split: str) -> Flow:
        """The rows of ``split`` whose targets are all known, as a flow of records."""
        columns = [t.column for t in self.targets]
        options = self.config.storage_options
        if self.layout == "local":
            frame = self.labels
            key = {"validation": "val"}.get(split, split)
            profiles = read_json(join(self.root, "splits.json"), options)[f"{key}_profile_ids"]
            frame = frame[frame["profile_id"].isin(profiles)].dropna(subset=columns)
            frame = frame.assign(path=[join(self.root, p) for p in frame["audio_path"]])
            rows = frame[list(dict.fromkeys([*METADATA, *columns, "path"]))].to_dict("records")
            return Flow.from_source(Items(rows), storage_options=options)
        wanted = list(dict.fromkeys([*METADATA, *columns, "audio"]))
        source = Concat([Table(s, wanted, storage_options=options) for s in self.shards(split)])
        known = np.all([pd.notna(source.column(c)) for c in columns], axis=0)
        return Flow.from_source(source, storage_options=options).select(np.flatnonzero(known))

    def _part(self, split: str, train: bool) -> Flow:
        c = self.config
        flow = self.records(split).map(AddTargets(self.targets))
        flow = audio_chain(flow, c, train, embedded="audio" if self.layout == "hf" else None)
        classes = [t.column for t in self.targets if t.classes is not None]
        stratify = classes[0] if c.stratify and classes else None
        return batches(flow, c, train, stratify=stratify, variable=not fixed_length(c))

    def train_flow(self) -> Flow:
        return self._part(self.config.train_split, train=True)

    def eval_flow(self) -> Flow:
        return self._part(self.config.eval_split, train=False)

    # ---- model and task ----------------------------------------------------------------------------
    def outputs(self) -> Outputs:
        sizes = {t.column: len(t.classes) if t.classes is not None else 1 for t in self.targets}
        return next(iter(sizes.values())) if len(sizes) == 1 else sizes

    def task(self) -> Task:
        heads: dict[str, Task] = {
            t.column: Classification(t.field) if t.classes is not None else Regression(t.field)
            for t in self.targets}
        return next(iter(heads.values())) if len(heads) == 1 else MultiTask(heads)

    def label_maps(self) -> dict[str, list[str]]:
        return {t.field: list(t.classes) for t in self.targets if t.classes is not None}

    @classmethod
    def generate(cls, root: str | Path, seed: int = 0, n_samples: int = 24,
                 layout: str = "local") -> Path:
        """A synthetic SOUSA under ``root`` in the ``local`` or ``hf`` layout; returns root."""
        make = synthetic.make_sousa if layout == "local" else synthetic.make_sousa_hf
        return make(root, n_samples=n_samples, seed=seed)
