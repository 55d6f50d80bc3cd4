"""Your own audio: a folder of files, labelled by their parent folder's name or by their name.

Layout: ``{data_dir}/**/*.wav`` (also .flac, .ogg, .mp3; local or any fsspec URL). The label is
the parent folder's name (``dogs/a.wav`` -> "dogs"), or what a regex finds in the file name
(its group named ``label``, else its first group, else the whole match), or — from Python — what a
callable returns for the file name. Classes are indexed in natural order ("2" before "10"); a
single class is refused. Split: a seeded ``eval_fraction`` or k-fold cross-validation with
``folds`` and ``fold``, both stratified by class; or a field of the file name (``split_by``, a
regex or a callable like ``label``) whose ``eval_values`` are held out.

    recipe = Folder(Folder.Config(data_dir="s3://bucket/clips", label=r"^(\\w+?)_\\d+",
                                  sample_rate=16000, seconds=2.0))
    for batch in recipe.train_flow().loader(): ...   # audio, label, label_name, key, path

    flows train folder --data-dir ./clips --seconds 2 --folds 5 --fold 0
    flows train folder --data-dir ./clips --split-by '_(\\d+)\\.wav$' --eval-values 0-4
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
from flows.sources.files import Files
from flows.sources.items import Items
from flows.training.recipe import register
from recipes import synthetic
from recipes.common import (
    AudioConfig,
    ClassesRecipe,
    as_names,
    audio_chain,
    batches,
    chosen_rate,
    class_names,
    fixed_length,
    option,
    require,
    shown,
    split,
)


@dataclass
class FolderConfig(AudioConfig):
    label: str | Callable[[str], Any] = option(
        "parent", "parent: the parent folder's name; else a regex on the file name (its group "
        "'label', else its first group, else the match); from Python also a callable")
    extensions: str = option(".wav,.flac,.ogg,.mp3", "audio file extensions, comma separated")
    eval_fraction: float = option(0.2, "held-out fraction (seeded, stratified by class)")
    folds: int = option(0, "more than 1: seeded k-fold cross-validation (stratified by class), "
                        "evaluating on --fold")
    fold: int = option(0, "the held-out fold (0-based) with --folds")
    split_by: str | Callable[[str], Any] | None = option(
        None, "split by a field of the file name: a regex (its group 'split', else its first "
        "group, else the match); from Python also a callable. Needs --eval-values")
    eval_values: str | None = option(None, "the --split-by values held out, comma separated; "
                                     "a-b is a range of integers (e.g. 0-4)")
    train_values: str | None = option(None, "the --split-by values trained on (default: all "
                                      "but --eval-values)")
    stratify: bool = True


def name_field(path: str, rule: str | Callable[[str], Any], group: str) -> str:
    """What ``rule`` finds in the file name of ``path``: a callable's result, or a regex's group
    named ``group``, else its first group, else the whole match."""
    name = posixpath.basename(path)
    if callable(rule):
        return str(rule(name))
    match = re.search(rule, name)
    if match is None:
        raise FlowsError(f"{group} regex {rule!r} does not match the file name {name!r}")
    if group in match.groupdict():
        return match.group(group)
    return match.group(1) if match.groups() else match.group(0)


def label_of(path: str, rule: str | Callable[[str], Any]) -> str:
    """The label of the file at ``path`` by ``rule`` (see the module docstring)."""
    if rule == "parent":
        return posixpath.basename(posixpath.dirname(path))
    return name_field(path, rule, "label")


def values(text: str) -> set[str]:
    """``"0-4,7,test"`` -> ``{"0", "1", "2", "3", "4", "7", "test"}``."""
    found: set[str] = set()
    for item in as_names(text):
        low, dash, high = item.partition("-")
        if dash and low.isdigit() and high.isdigit():
            found.update(str(v) for v in range(int(low), int(high) + 1))
        else:
            found.add(_canonical(item))
    return found


def _canonical(value: str) -> str:
    """Integers compare by value: ``"03"`` is ``"3"``."""
    return str(int(value)) if value.isdigit() else value


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

    def class_hint(self) -> str:
        rule = self.config.label
        how = ("each file's folder name" if rule == "parent" else
               "a callable" if callable(rule) else f"the regex {rule!r}")
        return (f"The labels came from {how} (--label): give --label a regex on the file name, "
                "or put each class's files in a sub-folder of their own.")

    def part(self, train: bool) -> Flow:
        c = self.config
        flow = Flow.from_source(Items(self.records()), storage_options=c.storage_options)
        if c.split_by is not None:
            flow = flow.select(self.by_name[0 if train else 1])
        else:
            flow = split(flow, train, c.eval_fraction, c.seed, c.folds, c.fold, stratify="label")
        flow = audio_chain(flow, c, train, sample_rate=self.sample_rate)
        return batches(flow, c, train, stratify="label" if c.stratify else None,
                       variable=not fixed_length(c))

    @cached_property
    def by_name(self) -> tuple[list[int], list[int]]:
        """(train, eval) positions in the listing by the ``split_by`` field of the file names
        (found once for both parts)."""
        c = self.config
        if c.split_by is None or c.eval_values is None:
            raise FlowsError("split_by (--split-by) needs eval_values (--eval-values)")
        held = values(c.eval_values)
        kept = values(c.train_values) if c.train_values is not None else None
        fields = [_canonical(name_field(row["path"], c.split_by, "split")) for row in self.listing]
        parts: tuple[list[int], list[int]] = ([], [])
        for i, value in enumerate(fields):
            if value in held:
                parts[1].append(i)
            elif kept is None or value in kept:
                parts[0].append(i)
        found = shown(class_names(fields))
        if not parts[1]:
            raise FlowsError(f"{self.name}: no file has a --split-by value in --eval-values "
                             f"{c.eval_values}; the values found: {found}")
        if not parts[0]:
            which = (f"in --train-values {c.train_values}" if c.train_values is not None
                     else f"outside --eval-values {c.eval_values}")
            raise FlowsError(f"{self.name}: no file has a --split-by value {which}: none is left "
                             f"to train on; the values found: {found}")
        return parts

    @cached_property
    def sample_rate(self) -> int:
        """``config.sample_rate``, else the files' own rate when they share one."""
        return chosen_rate(self.config, lambda: Items(self.listing))

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
