"""Your own audio: a folder of files, labelled by their parent folder's name or by their name.

Layout: ``{data_dir}/**/*.wav`` (also .flac, .ogg, .mp3; local or any fsspec URL). The label is
the parent folder's name (``dogs/a.wav`` -> "dogs"), or what a regex finds in the file name
(its group named ``label``, else its first group, else the whole match), or — from Python — what a
callable returns for the file name. Classes are indexed in sorted order. Split: a seeded
``eval_fraction``, or k-fold cross-validation with ``folds`` and ``fold``.

    recipe = Folder(Folder.Config(data_dir="s3://bucket/clips", label=r"^(\\w+?)_\\d+",
                                  sample_rate=16000, seconds=2.0))
    for batch in recipe.train_flow().loader(): ...   # audio, label, label_name, key, path

    flows train folder --data-dir ./clips --sample-rate 16000 --seconds 2 --folds 5 --fold 0
"""

from __future__ import annotations

import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from flows.errors import FlowsError
from flows.flow import Flow
from flows.recipe import register
from flows.sources import Files, Items
from recipes import synthetic
from recipes.common import (
    AudioConfig,
    ClassesRecipe,
    as_names,
    audio_chain,
    batches,
    class_names,
    fixed_length,
    option,
    require,
    split,
)


@dataclass
class FolderConfig(AudioConfig):
    label: str | Callable[[str], Any] = option(
        "parent", "parent: the parent folder's name; else a regex on the file name (its group "
        "'label', else its first group, else the match); from Python also a callable")
    extensions: str = option(".wav,.flac,.ogg,.mp3", "audio file extensions, comma separated")
    eval_fraction: float = option(0.2, "held-out fraction (seeded)")
    folds: int = option(0, "more than 1: seeded k-fold cross-validation, evaluating on --fold")
    fold: int = option(0, "the held-out fold (0-based) with --folds")
    stratify: bool = True


def label_of(path: str, rule: str | Callable[[str], Any]) -> str:
    """The label of the file at ``path`` by ``rule`` (see the module docstring)."""
    name = posixpath.basename(path)
    if callable(rule):
        return str(rule(name))
    if rule == "parent":
        return posixpath.basename(posixpath.dirname(path))
    match = re.search(rule, name)
    if match is None:
        raise FlowsError(f"label regex {rule!r} does not match the file name {name!r}")
    if "label" in match.groupdict():
        return match.group("label")
    return match.group(1) if match.groups() else match.group(0)


@register
class Folder(ClassesRecipe):
    name = "folder"
    Config = FolderConfig
    config: FolderConfig
    data_hint = "Point --data-dir at a folder of audio files (one sub-folder per class by default)."

    @cached_property
    def listing(self) -> list[dict[str, Any]]:
        """``{path, key, label_name}`` of every audio file, sorted; ``key`` is the path below
        data_dir."""
        root = require(self.config.data_dir, self.data_hint, self.config.storage_options)
        files = Files(root, as_names(self.config.extensions),
                      storage_options=self.config.storage_options)
        return [{**files[i], "label_name": label_of(files[i]["path"], self.config.label)}
                for i in range(len(files))]

    @cached_property
    def classes(self) -> list[str]:
        return class_names(row["label_name"] for row in self.listing)

    def records(self) -> list[dict[str, Any]]:
        """The listing with each file's class index as ``label``."""
        index = {name: i for i, name in enumerate(self.classes)}
        return [{**row, "label": index[row["label_name"]]} for row in self.listing]

    def part(self, train: bool) -> Flow:
        c = self.config
        flow = Flow.from_source(Items(self.records()), storage_options=c.storage_options)
        flow = audio_chain(split(flow, train, c.eval_fraction, c.seed, c.folds, c.fold), c, train)
        return batches(flow, c, train, stratify="label" if c.stratify else None,
                       variable=not fixed_length(c))


    @classmethod
    def generate(cls, root: str | Path, seed: int = 0, clips_per_class: int = 4,
                 classes: int = 4) -> Path:
        """A labelled folder, ``root/{class name}/{clip}.wav``: the synthetic UrbanSound8K clips
        (mixed rates, channels and sample formats) of the first ``classes`` classes; returns root."""
        with tempfile.TemporaryDirectory() as tmp:
            source = synthetic.make_urbansound8k(tmp, clips_per_fold=clips_per_class, seed=seed)
            for wav in sorted((source / "audio").glob("fold*/*.wav")):
                class_id = int(wav.name.split("-")[1])
                if class_id < classes:
                    target = Path(root) / synthetic.URBANSOUND8K_CLASSES[class_id] / wav.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(wav, target)
        return Path(root)
