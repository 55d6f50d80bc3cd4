"""Tasks: what a model's output means — its loss and its metrics.

Metrics are returned as sums with a count, so the training loop can add them over batches and
ranks before dividing: ``{"accuracy": (correct, n)}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

Sums = dict[str, tuple[float, float]]


@dataclass
class Task:
    """Base task: ``inputs`` picks the model input from a batch (``input_key``, keyword-only in
    every task, e.g. ``Classification("label", input_key="tensor")``); ``loss`` and ``metrics``
    score the output against the batch."""

    input_key: str = field(default="audio", kw_only=True)

    def inputs(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return batch[self.input_key]

    def loss(self, output: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, output: Any, batch: Mapping[str, Any]) -> Sums:
        raise NotImplementedError


@dataclass
class Classification(Task):
    """Single-label classification: cross-entropy, accuracy."""

    target: str = "label"

    def loss(self, output, batch):
        return F.cross_entropy(output, batch[self.target])

    def metrics(self, output, batch):
        correct = (output.argmax(-1) == batch[self.target]).sum().item()
        return {"accuracy": (float(correct), float(len(batch[self.target])))}


@dataclass
class SequenceLabels(Task):
    """Several binary or categorical labels per sample (YESNO's 8 words): output (B, positions,
    classes); per-position accuracy."""

    target: str = "labels"

    def loss(self, output, batch):
        return F.cross_entropy(output.flatten(0, 1), batch[self.target].flatten())

    def metrics(self, output, batch):
        hits = output.argmax(-1) == batch[self.target]
        sums: Sums = {"accuracy": (float(hits.sum().item()), float(hits.numel()))}
        for p in range(hits.shape[1]):
            sums[f"accuracy_{p}"] = (float(hits[:, p].sum().item()), float(hits.shape[0]))
        return sums


@dataclass
class Regression(Task):
    """Regression of one target in [0, 1] (or any scale): MSE loss, MAE and RMSE."""

    target: str = "target"

    def loss(self, output, batch):
        return F.mse_loss(output.reshape(-1), batch[self.target].float())

    def metrics(self, output, batch):
        err = output.reshape(-1).float() - batch[self.target].float()
        n = float(err.numel())
        return {"mae": (err.abs().sum().item(), n), "mse": ((err**2).sum().item(), n)}


@dataclass
class MultiTask(Task):
    """Several heads: the model returns ``{head: output}``; the loss is the weighted sum."""

    heads: dict[str, Task] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def loss(self, output, batch):
        return sum(self.weights.get(h, 1.0) * t.loss(output[h], batch) for h, t in self.heads.items())

    def metrics(self, output, batch):
        return {f"{h}/{k}": v for h, t in self.heads.items() for k, v in t.metrics(output[h], batch).items()}


def finalize(sums: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Divide summed metrics by their counts; ``mse`` also yields ``rmse``."""
    out = {k: s / max(n, 1.0) for k, (s, n) in sums.items()}
    for k in [k for k in out if k.endswith("mse")]:
        out[k[:-3] + "rmse"] = out[k] ** 0.5
    return out


def add_sums(total: Sums, sums: Mapping[str, tuple[float, float]]) -> None:
    """Add ``sums`` into ``total``, key by key."""
    for key, (s, n) in sums.items():
        s0, n0 = total.get(key, (0.0, 0.0))
        total[key] = (s0 + float(s), n0 + float(n))


def count_samples(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor or list."""
    if isinstance(batch, Mapping):
        return count_samples(next(iter(batch.values()))) if batch else 0
    return len(batch) if isinstance(batch, (torch.Tensor, list, tuple)) else 0
