"""What the recipes share: config knobs, the audio chain, label maps, splits, batching, paths,
model choice and a base class. Each recipe module reads top to bottom on top of these."""

from __future__ import annotations

import importlib
import json
import logging
import posixpath
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from torch import nn

from flows.errors import FlowsError
from flows.flow import Flow
from flows.sampling.order import rng, splits
from flows.sources.base import Source
from flows.stages.audio import fit
from flows.stages.base import Stage
from flows.storage import io
from flows.training.models import M5, Outputs, SmallCNN
from flows.training.recipe import Recipe, RecipeConfig
from flows.training.tasks import Classification, Task

# ---- config ------------------------------------------------------------------------------------


def option(default: Any, help: str) -> Any:
    """A config field with the help text its ``flows train`` option shows."""
    return field(default=default, metadata={"help": help})


DEFAULT_RATE = 16_000  # Hz, for files of several sample rates and no --sample-rate
HEADER_BLOCK = 16 * 1024  # bytes read ahead when probing an audio header (not the default 512 KiB)
log = logging.getLogger("flows.recipes")

MODEL_HELP = "smallcnn, m5, or package.module:factory (called with the heads, returns a module)"


@dataclass
class AudioConfig(RecipeConfig):
    """Knobs of every audio recipe (recipes change the defaults and add their own)."""

    sample_rate: int | None = option(None, "resample every clip to this rate (anti-aliased); "
                                     "default: the files' own rate when they share one, else "
                                     f"{DEFAULT_RATE}")
    mono: bool = option(True, "average the channels into one")
    seconds: float | None = option(None, "clip length in seconds: longer clips are cut; unset keeps "
                                      "whole clips")
    pad: bool = option(True, "with --seconds, zero-pad shorter clips (else batches are padded "
                       "to their longest clip); batches carry lengths and attention_mask")
    random_crop: bool = option(False, "training clips longer than --seconds: a random window")
    stratify: bool = option(False, "training batches with about equal counts per class")
    model: str = option("smallcnn", MODEL_HELP)


# ---- paths ---------------------------------------------------------------------------------------


def join(root: str, *parts: str) -> str:
    """Join a local path or an fsspec URL with relative parts."""
    return posixpath.join(root.rstrip("/"), *parts)


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = io.filesystem(url, storage_options)
    return bool(fs.exists(path))


def require(url: str | None, hint: str, storage_options: dict | None = None) -> str:
    """``url`` when it exists, else an error that says how to get the data."""
    if url is None:
        raise FlowsError(f"no data directory given (data_dir). {hint}")
    if not exists(url, storage_options):
        raise FlowsError(f"{url} does not exist. {hint}")
    return url


def read_json(url: str, storage_options: dict | None = None) -> Any:
    with io.open_file(url, storage_options) as f:
        return json.load(f)


# ---- audio ---------------------------------------------------------------------------------------


class Clip(Stage):
    """Cut ``audio`` to at most ``length`` frames (the start, or a random window when ``random``)
    and, with ``pad``, zero-pad it to exactly ``length`` recording the real ``lengths`` and an
    ``attention_mask`` (True on real frames), like variable-length batches have."""

    name = "clip"

    def __init__(self, length: int, pad: bool = True, random: bool = False):
        self.length, self.pad, self.random = length, pad, random

    def __call__(self, item: dict, generator: np.random.Generator | None = None) -> dict:
        audio = item["audio"]
        frames = audio.shape[-1]
        start = 0
        if generator is not None and frames > self.length:
            start = int(generator.integers(0, frames - self.length + 1))
        if not self.pad:
            return {**item, "audio": audio[..., start : start + self.length]}
        real = min(frames - start, self.length)
        return {**item, "audio": fit(audio, self.length, start), "lengths": real,
                "attention_mask": torch.arange(self.length) < real}


def audio_chain(flow: Flow, config: AudioConfig, train: bool, embedded: str | None = None,
                extra: Sequence[Callable] = (), segment: dict[str, Any] | None = None,
                sample_rate: int | None = None) -> Flow:
    """The audio chain: read -> decode -> downmix -> resample to ``sample_rate`` (default
    ``config.sample_rate``) -> ``extra`` stages -> clip to ``config.seconds``.

    ``embedded`` names a field holding the encoded audio (a Hugging Face ``{bytes, path}``
    column) instead of reading each record's ``path``; ``segment`` holds the
    :meth:`~flows.flow.Flow.decode_audio` options naming the part of each file to use."""
    rate = sample_rate or config.sample_rate
    if rate is None:
        raise FlowsError("no sample rate: set sample_rate (--sample-rate)")
    part = segment or {}
    flow = flow.decode_audio(embedded, **part) if embedded else flow.read().decode_audio(**part)
    if config.mono:
        flow = flow.downmix()
    flow = flow.resample(rate)
    for stage in extra:
        flow = flow.map(stage)
    if config.seconds:
        length = round(config.seconds * rate)
        flow = flow.map(Clip(length, config.pad, random=train and config.random_crop))
    return flow


def native_rate(source: Source, storage_options: dict | None = None, probe: int = 100) -> int:
    """The sample rate shared by the files at the records' ``path``, read from the headers of up
    to ``probe`` files spread evenly over ``source`` (unreadable ones are left to the pipeline's
    error handling); when they differ, :data:`DEFAULT_RATE`
    with a warning naming the rates found. (Every clip is resampled to the rate chosen, so a file
    outside the probe at another rate is still converted.)"""
    n = len(source)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, min(n, probe))}) if n else []
    rates: Counter[int] = Counter()
    unreadable: list[str] = []  # left to the pipeline: an error there, or skipped and counted
    for i in picks:
        path = source[i]["path"]
        try:
            with io.open_file(path, storage_options, block_size=HEADER_BLOCK) as f:
                rates[soundfile.info(f).samplerate] += 1
        except Exception as e:  # noqa: BLE001 - one line naming the file
            unreadable.append(f"{path}: {type(e).__name__}: {e}")
    if picks and not rates:
        raise FlowsError(f"cannot read the audio header of {unreadable[0]}")
    if len(rates) == 1:
        rate = next(iter(rates))
        log.info("sample rate: %d Hz, the files' own (%d files probed; --sample-rate resamples)",
                 rate, len(picks))
        return rate
    found = ", ".join(f"{r} Hz: {k}" for r, k in sorted(rates.items()))
    warnings.warn(f"the files have several sample rates ({found} of {len(picks)} probed): "
                  f"resampling every clip to {DEFAULT_RATE} Hz; choose with --sample-rate",
                  stacklevel=2)
    return DEFAULT_RATE


def chosen_rate(config: AudioConfig, files: Callable[[], Source]) -> int:
    """``config.sample_rate``, else the rate the files of ``files()`` share (see :func:`native_rate`;
    ``files`` is only called then)."""
    return config.sample_rate or native_rate(files(), config.storage_options)


def fixed_length(config: AudioConfig) -> bool:
    """Whether the chain gives every clip the same length (else batches are padded per batch)."""
    return bool(config.seconds) and config.pad


# ---- batches -------------------------------------------------------------------------------------


def batches(flow: Flow, config: RecipeConfig, train: bool, stratify: str | None = None,
            variable: bool = False) -> Flow:
    """Training: reshuffled every epoch (seeded), optionally class-stratified on the record field
    ``stratify``; evaluation: in order. ``variable`` pads audio per batch and adds ``lengths``
    and ``attention_mask``."""
    size = config.batch_size
    if not train:
        return flow.batch(size, variable=variable)
    flow = flow.shuffle(config.seed)
    if stratify is not None:
        return flow.stratify(stratify, size, variable=variable)
    return flow.batch(size, variable=variable)


def split(flow: Flow, train: bool, eval_fraction: float, seed: int, folds: int = 0,
          fold: int = 0, stratify: str | None = None) -> Flow:
    """The train or eval part of ``flow``'s records (see :func:`split_indices`), stratified by
    the record field ``stratify`` when given."""
    if flow.source is None:
        raise FlowsError("only a flow with a source can be split")
    labels = flow.source.column(stratify) if stratify is not None else None
    parts = split_indices(len(flow.source), eval_fraction, seed, folds, fold, labels)
    return flow.select(parts[0] if train else parts[1])


def split_indices(n: int, eval_fraction: float, seed: int, folds: int = 0, fold: int = 0,
                  labels: Sequence[Any] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) indices: a seeded ``eval_fraction`` split (as ``Flow.split``), or with
    ``folds`` > 1 fold number ``fold`` (0-based) of a seeded k-fold partition as the eval part.

    With ``labels`` (one per index) the split is stratified: the indices are ordered class by
    class (seeded order within each class) and dealt out evenly, so each class's share of the
    eval part is ``eval_fraction`` (or 1/``folds``) give or take one sample."""
    if folds > 1 and not 0 <= fold < folds:
        raise FlowsError(f"fold must be in 0..{folds - 1}, got {fold}")
    if labels is None:
        if folds > 1:
            parts = np.array_split(rng(seed, "folds").permutation(n), folds)
            rest = np.concatenate([p for i, p in enumerate(parts) if i != fold])
            return np.sort(rest), np.sort(parts[fold])
        train, held_out = splits(n, [1.0 - eval_fraction, eval_fraction], seed)
        return train, held_out
    order = _class_order(np.asarray([str(v) for v in labels]), seed)
    position = np.arange(n)
    if folds > 1:
        held = position % folds == fold
    else:  # position i is held out when round(i * fraction) steps up at i + 1
        held = np.floor((position + 1) * eval_fraction + 0.5) > np.floor(position * eval_fraction + 0.5)
    return np.sort(order[~held]), np.sort(order[held])


def _class_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """All indices, class by class in natural order, in a seeded random order within each class."""
    permutation = rng(seed, "stratified split").permutation(len(labels))
    return np.concatenate([permutation[labels[permutation] == name]
                           for name in class_names(labels)] or [np.arange(0)])


def shown(values: Sequence[Any], limit: int = 20) -> str:
    """``"1, 2, 3"``: the first ``limit`` values and how many more there are."""
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return ", ".join(str(v) for v in values[:limit]) + more


def require_values(table: str, column: str, present: Iterable[Any], wanted: Sequence[Any],
                   part: str, option: str) -> None:
    """Refuse a ``part`` ("train", "eval") of ``table`` that selects no row: none of the
    ``wanted`` values (given by ``option``) is among those the ``column`` holds."""
    found = class_names(present)
    if not {str(w) for w in wanted} & set(found):
        asked = " ".join(str(w) for w in wanted) or "(none)"
        raise FlowsError(f"table {table}: no rows for the {part} split: column {column} has no "
                         f"value in {option} {asked}; its values: {shown(found)}")


def as_names(value: str | Sequence[str]) -> list[str]:
    """Names from ``"a,b,c"`` or a sequence."""
    items = value.split(",") if isinstance(value, str) else value
    return [v.strip() for v in items if v.strip()]


# ---- labels ----------------------------------------------------------------------------------------


def natural_key(text: str) -> tuple:
    """Sort key putting ``"2"`` before ``"10"`` and ``"fold2"`` before ``"fold10"``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", text) if part)


def class_names(values: Iterable[Any]) -> list[str]:
    """Distinct values as strings, in natural order (``"2"`` before ``"10"``): position = class index."""
    return sorted({str(v) for v in values}, key=natural_key)


class ClassIndex(Stage):
    """Set ``item[to]`` to the class index of ``item[column]`` among ``names`` (or by the mapping
    ``{name: index}``), and ``item[to + "_name"]`` to the class name."""

    name = "class_index"

    def __init__(self, column: str, names: Sequence[str] | Mapping[str, int], to: str = "label"):
        self.column, self.to = column, to
        self.index = dict(names) if isinstance(names, Mapping) else {n: i for i, n in enumerate(names)}

    def __call__(self, item: dict) -> dict:
        value = str(item[self.column])
        if value not in self.index:
            raise FlowsError(f"{self.column}={value!r} is not one of the known classes")
        return {**item, self.to: self.index[value], f"{self.to}_name": value}


def save_label_maps(maps: Mapping[str, Sequence[str]], path: str | Path) -> Path:
    """Write ``{target: [class names by index]}`` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: list(v) for k, v in maps.items()}, indent=2) + "\n")
    return path


# ---- sources -----------------------------------------------------------------------------------------


class Concat(Source):
    """Several sources one after another (e.g. the Parquet shards of one split)."""

    name = "concat"

    def __init__(self, sources: Sequence[Source]):
        self.sources = list(sources)
        self.starts = np.cumsum([0] + [len(s) for s in self.sources])

    def _locate(self, index: int) -> tuple[Source, int]:
        part = int(np.searchsorted(self.starts, index, side="right") - 1)
        return self.sources[part], index - int(self.starts[part])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> Any:
        source, inner = self._locate(index)
        return source[inner]

    def key(self, index: int) -> str:
        source, inner = self._locate(index)
        return source.key(inner)

    def column(self, name: str) -> np.ndarray:
        return np.concatenate([s.column(name) for s in self.sources])

    def blocks(self) -> np.ndarray | None:
        inner = [s.blocks() for s in self.sources]
        if all(b is None for b in inner):
            return None
        starts = [start + (b[:-1] if b is not None else np.zeros(1, np.int64))
                  for start, b in zip(self.starts[:-1], inner, strict=True)]
        return np.concatenate([*starts, self.starts[-1:]]).astype(np.int64)


# ---- models and the recipe base class ------------------------------------------------------------------


def build_model(spec: str, outputs: Outputs, **options: Any) -> nn.Module:
    """``"smallcnn"`` or ``"m5"`` (``options`` passed on), or ``"package.module:factory"``: any
    callable returning an ``nn.Module``, called with ``outputs``."""
    if spec == "smallcnn":
        return SmallCNN(outputs, **options)
    if spec == "m5":
        return M5(outputs, **options)
    module, _, attribute = spec.partition(":")
    if not attribute:
        raise FlowsError(f"model must be 'smallcnn', 'm5' or 'package.module:factory', got {spec!r}")
    factory: Callable[[Outputs], nn.Module] = getattr(importlib.import_module(module), attribute)
    return factory(outputs)


class BaseRecipe(Recipe):
    """A recipe whose model is ``config.model`` with the heads ``outputs()``, or any
    ``nn.Module`` passed as ``model=``; subclasses list their classes in ``label_maps()``."""

    def __init__(self, config: RecipeConfig, model: nn.Module | None = None):
        super().__init__(config)
        self.custom_model = model

    def outputs(self) -> Outputs:
        """The default model's heads (see :mod:`flows.training.models`)."""
        raise NotImplementedError

    def model_options(self) -> dict[str, Any]:
        """Extra keyword arguments for the built-in models."""
        return {}

    def model(self) -> nn.Module:
        if self.custom_model is not None:
            return self.custom_model
        spec = getattr(self.config, "model", "smallcnn")
        return build_model(spec, self.outputs(), **self.model_options())

    def label_maps(self) -> dict[str, list[str]]:
        """``{label field: class names by index}``."""
        return {}

    def export_label_maps(self, path: str | Path) -> Path:
        """Write :meth:`label_maps` as JSON."""
        return save_label_maps(self.label_maps(), path)


class ClassesRecipe(BaseRecipe):
    """A single-label classification recipe over ``classes``: records carry ``label`` (a class
    index) and the model reads ``input_key``; the subclass builds each side with ``part(train)``."""

    input_key = "audio"

    @property
    def classes(self) -> list[str]:
        """Class names by index."""
        raise NotImplementedError

    def part(self, train: bool) -> Flow:
        """The train (``train=True``) or eval flow."""
        raise NotImplementedError

    def train_flow(self) -> Flow:
        return self.part(train=True)

    def eval_flow(self) -> Flow:
        return self.part(train=False)

    def model(self) -> nn.Module:
        """The model; refused when the data has fewer than two classes (nothing to learn)."""
        present = self.present_classes()
        if len(present) < 2:
            found = f"the single class {present[0]!r}" if present else "no class"
            raise FlowsError(f"{self.name}: the data has {found}; a classifier needs at least "
                             f"two. {self.class_hint()}".strip())
        return super().model()

    def present_classes(self) -> list[str]:
        """The classes the data has (``classes`` may also name indices no sample uses)."""
        return self.classes

    def class_hint(self) -> str:
        """Told to users whose data has a single class: how to give it several."""
        return ""

    def outputs(self) -> Outputs:
        return len(self.classes)

    def task(self) -> Task:
        return Classification("label", input_key=self.input_key)

    def label_maps(self) -> dict[str, list[str]]:
        return {"label": self.classes}
