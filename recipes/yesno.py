"""YESNO (OpenSLR 1): 60 recordings of 8 spoken words, each "yes" or "no".

Layout: ``{data_dir}/waves_yesno/{w0}_{w1}_..._{w7}.wav`` (8 kHz mono; 1 = yes, 0 = no) — the
words are the file name. Task: predict the 8-word sequence (per-word accuracy), on a seeded
80/20 split (48 train / 12 test files) as in the tutorial.

    recipe = YesNo(YesNo.Config(data_dir="data/yesno", download=True))
    batch = next(iter(recipe.train_flow().loader()))   # audio (B, 1, T), labels (B, 8), key, ...

    flows train yesno --data-dir data/yesno --download

Each utterance has its leading and trailing silence trimmed and is then time-normalised to
``seconds`` (an anti-aliased resampling of the time axis), so word ``k`` lands in the ``k``-th
eighth of every clip; the default model pools its features into 8 positions: output (B, 8, 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import soxr
import torch

from flows.errors import FlowsError
from flows.flow import Flow
from flows.stages.base import Stage
from flows.training.download import download_and_extract
from flows.training.models import Outputs
from flows.training.recipe import register
from flows.training.tasks import SequenceLabels, Task
from recipes import synthetic
from recipes.common import (
    AudioConfig,
    BaseRecipe,
    audio_chain,
    batches,
    exists,
    fixed_length,
    join,
    option,
    split,
)

URL = "http://www.openslr.org/resources/1/waves_yesno.tar.gz"
SHA256 = "c3f49e0cca421f96b75b41640749167b52118f232498667ca7a5f9416aef8e73"
WORDS = ("no", "yes")
NAME = re.compile(r"^[01](_[01]){7}\.wav$")


@dataclass
class YesNoConfig(AudioConfig):
    download: bool = option(False, "fetch, verify and extract the archive when data_dir lacks it")
    url: str = option(URL, "the archive's URL")
    sha256: str = option(SHA256, "the archive's SHA-256")
    eval_fraction: float = option(0.2, "held-out fraction of the files (seeded: 48/12)")
    trim_silence: bool = option(True, "cut leading and trailing silence")
    sample_rate: int = 8000
    seconds: float | None = option(4.8, "time-normalise every (trimmed) utterance to this length")
    epochs: int = 10
    batch_size: int = 8
    lr: float = 3e-3


class WordLabels(Stage):
    """``labels``: the 8 words of the file name as a LongTensor (1 = yes, 0 = no)."""

    name = "word_labels"

    def __call__(self, item: dict) -> dict:
        name = item["key"].rsplit("/", 1)[-1]
        if not NAME.match(name):
            raise FlowsError(f"{item['path']}: not a YESNO file name like 1_0_1_1_1_0_1_0.wav")
        return {**item, "labels": torch.tensor([int(w) for w in name[:-4].split("_")])}


class TrimSilence(Stage):
    """Cut leading and trailing frames quieter than ``threshold`` x the loudest (20 ms frames)."""

    name = "trim_silence"

    def __init__(self, threshold: float = 0.1, frame_seconds: float = 0.02):
        self.threshold, self.frame_seconds = threshold, frame_seconds

    def __call__(self, item: dict) -> dict:
        audio = item["audio"]
        hop = max(1, round(self.frame_seconds * item["sample_rate"]))
        frames = audio.shape[-1] // hop
        if frames == 0:
            return item
        energy = audio[..., : frames * hop].reshape(-1, frames, hop).pow(2).mean(dim=(0, 2))
        loud = torch.nonzero(energy > self.threshold * energy.max()).flatten()
        if loud.numel() == 0:  # digital silence: nothing to trim to
            return item
        return {**item, "audio": audio[..., int(loud[0]) * hop : (int(loud[-1]) + 1) * hop]}


class Stretch(Stage):
    """Resample the time axis so the clip spans ``length`` frames (anti-aliased, via soxr)."""

    name = "stretch"

    def __init__(self, length: int):
        self.length = length

    def __call__(self, item: dict) -> dict:
        audio = item["audio"].numpy().T  # frames x channels
        out = soxr.resample(audio, audio.shape[0], self.length, quality="HQ")
        return {**item, "audio": torch.from_numpy(np.ascontiguousarray(out.T))}


@register
class YesNo(BaseRecipe):
    name = "yesno"
    Config = YesNoConfig
    config: YesNoConfig
    data_hint = ("Point --data-dir at a folder holding waves_yesno/ (or at waves_yesno itself); "
                 "add --download to fetch the official archive there, or write a synthetic "
                 "copy with recipes.yesno.YesNo.generate(root).")

    @cached_property
    def folder(self) -> str:
        """The ``waves_yesno`` folder, downloaded and extracted first when asked to."""
        root, options = self.config.data_dir, self.config.storage_options
        if root is None:
            raise FlowsError(f"no data directory given (data_dir). {self.data_hint}")
        if root.rstrip("/").endswith("waves_yesno") and exists(root, options):
            return root
        folder = join(root, "waves_yesno")
        if not exists(folder, options):
            if not self.config.download:
                raise FlowsError(f"{folder} does not exist. {self.data_hint}")
            download_and_extract(self.config.url, root, self.config.sha256)
        return folder

    def flow(self) -> Flow:
        """All 60 files, sorted by name, with their ``labels``."""
        return (Flow.files(self.folder, extensions=[".wav"],
                           storage_options=self.config.storage_options)
                .map(WordLabels()))

    def _part(self, train: bool) -> Flow:
        c = self.config
        flow = split(self.flow(), train, c.eval_fraction, c.seed)
        extra: list[Stage] = [TrimSilence()] if c.trim_silence else []
        if c.seconds:
            extra.append(Stretch(round(c.seconds * c.sample_rate)))
        flow = audio_chain(flow, c, train, extra=extra)
        return batches(flow, c, train, variable=not fixed_length(c))

    def train_flow(self) -> Flow:
        return self._part(train=True)

    def eval_flow(self) -> Flow:
        return self._part(train=False)

    def outputs(self) -> Outputs:
        return len(WORDS)

    def model_options(self) -> dict[str, Any]:
        return {"sequence": 8}

    def task(self) -> Task:
        return SequenceLabels("labels")

    def label_maps(self) -> dict[str, list[str]]:
        return {"labels": list(WORDS)}

    @classmethod
    def generate(cls, root: str | Path, seed: int = 0, n_files: int = 60) -> Path:
        """A synthetic YESNO under ``root/waves_yesno``; returns ``root`` (the data_dir)."""
        synthetic.make_yesno(root, n_files=n_files, seed=seed)
        return Path(root)
