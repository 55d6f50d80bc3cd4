"""Helpers for tests/test_distributed.py, run in real torchrun processes.

- :class:`Recorded`: a tiny recipe (``tests.dist_worker:Recorded``) whose model appends the keys
  of every training batch it sees to ``$FLOWS_RECORD/rank{RANK}.jsonl`` (one line per batch).
- ``python -m tests.dist_worker OUT DATA`` (under ``torchrun --nproc-per-node 2``): joins the
  process group, checks that rank 0 alone lists files, runs fixed, stratified, bucketed and
  mixed loaders in lockstep (an all-reduce per batch, as DDP does) and writes every rank's
  batches and loader states to ``OUT/loaders.json``; then trains :class:`Recorded` from Python
  with :func:`flows.training.train.train` and writes each rank's result to ``OUT/result{rank}.json``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from flows import Flow, distributed_position
from flows.storage import io
from flows.training.distributed import setup, teardown
from flows.training.recipe import Recipe, RecipeConfig
from flows.training.tasks import Classification, Task
from flows.training.train import TrainConfig, train

TRAIN_FILES, EVAL_FILES = 42, 10  # 42 = 10 global batches of 4 and one of 2
RECORD_ENV = "FLOWS_RECORD"


class Label:
    """``label`` from a file name like ``007_1.pt``."""

    name = "label"

    def __call__(self, item: dict) -> dict:
        return {**item, "label": int(item["key"].rsplit("_", 1)[1][0])}


class KeyedClassification(Classification):
    """Classification whose model input carries the sample keys, for the recording model."""

    def inputs(self, batch: Any) -> Any:
        return {"audio": batch["audio"], "key": list(batch["key"])}


class RecordingNet(nn.Module):
    """A small MLP with dropout (training draws from torch's RNG) that records its training
    batches' keys, one JSON line per batch, when ``$FLOWS_RECORD`` names a folder."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(12, 2))

    def forward(self, inputs: dict[str, Any]) -> torch.Tensor:
        folder = os.environ.get(RECORD_ENV)
        if self.training and folder:
            with open(Path(folder) / f"rank{os.environ.get('RANK', '0')}.jsonl", "a") as f:
                f.write(json.dumps(inputs["key"]) + "\n")
        return self.net(inputs["audio"])


@dataclass
class RecordedConfig(RecipeConfig):
    epochs: int = 2
    batch_size: int = 2
    lr: float = 0.05


class Recorded(Recipe):
    """42 train and 10 eval vectors, one ``.pt`` file each, named ``{index}_{label}.pt``."""

    name = "recorded"
    Config = RecordedConfig

    def _flow(self, split: str) -> Flow:
        return (Flow.files(f"{self.config.data_dir}/{split}", extensions=[".pt"])
                .read().decode_tensor(to="audio").map(Label()))

    def train_flow(self) -> Flow:
        return self._flow("train").shuffle(self.config.seed).batch(self.config.batch_size)

    def eval_flow(self) -> Flow:
        return self._flow("eval").batch(self.config.batch_size)

    def model(self) -> nn.Module:
        return RecordingNet()

    def task(self) -> Task:
        return KeyedClassification()

    @classmethod
    def generate(cls, root: str | Path, seed: int = 0) -> Path:
        g = np.random.default_rng(seed)
        for split, n in (("train", TRAIN_FILES), ("eval", EVAL_FILES)):
            (Path(root) / split).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x = torch.from_numpy(g.normal(size=(1, 16)).astype(np.float32))
                torch.save(x, Path(root) / split / f"{i:03d}_{int(x.mean() > 0)}.pt")
        return Path(root)


# ---- loaders under a real process group --------------------------------------------------------
def records(n: int, prefix: str = "s") -> list[dict]:
    return [{"key": f"{prefix}{i}", "x": torch.tensor([i]), "label": i % 4,
             "duration": 0.5 + (i % 7) / 2} for i in range(n)]


def flows_by_kind() -> dict[str, Flow]:
    """Per-rank batch sizes; the global batches are twice as large on 2 ranks."""
    base = Flow.items(records(41)).shuffle(seed=2)
    other = Flow.items(records(23, "m")).shuffle(seed=3)
    return {
        "fixed3": base.batch(3),  # global 6: 6 full batches, then 5 split 3 + 2
        "fixed3_drop_last": base.batch(3, drop_last=True),  # the 5 are dropped
        "fixed2": base.batch(2),  # global 4: 10 full, then 1 sample, too few for 2 ranks
        "stratify": base.stratify("label", 4),
        "bucket": base.bucket(max_seconds=6.0),
        "mix": Flow.mix([base.batch(2), other.batch(2)], weights=[0.6, 0.4], seed=5),
    }


def run_loaders(rank: int, world: int) -> dict[str, Any]:
    """Two epochs of every kind, in lockstep; the state after 3 batches of the first epoch."""
    out: dict[str, Any] = {}
    for kind, flow in flows_by_kind().items():
        loader = flow.loader(num_workers=1)  # rank and world size from torch.distributed
        epochs: list[list[list[str]]] = []
        state = None
        for _ in range(2):
            batches = []
            for batch in loader:
                tick = torch.ones(1)
                dist.all_reduce(tick)  # as DDP's gradient all-reduce: hangs if counts differ
                batches.append(list(batch["key"]))
                if len(epochs) == 0 and len(batches) == 3:
                    state = loader.state_dict()
            epochs.append(batches)
        loader.close()
        out[kind] = {"epochs": epochs, "state": state}
    return out


def main(out: Path, data: Path) -> None:
    rank, world = setup(timeout=timedelta(seconds=120))
    assert dist.is_initialized() and distributed_position() == (rank, world) == (
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    listed = {"n": 0}
    for name in ("list_files", "list_files_with_sizes"):
        original = getattr(io, name)

        def counting(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            listed["n"] += 1
            return _original(*args, **kwargs)

        setattr(io, name, counting)
    files = Flow.files(str(data / "train"), extensions=[".pt"])
    mine = {"rank": rank, "world": world, "listings": listed["n"],
            "files": len(files._source()), "loaders": run_loaders(rank, world)}
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        (out / "loaders.json").write_text(json.dumps(everyone))

    # a recipe used from Python, unchanged: train() uses the group set up above
    recipe = Recorded(Recorded.Config(data_dir=str(data)))
    result = train(recipe, TrainConfig(checkpoint_dir=str(out / "checkpoints"), checkpoint_every=3,
                                       progress=False, log_path=str(out / "metrics.jsonl")))
    (out / f"result{rank}.json").write_text(json.dumps({
        "step": result.step, "epoch": result.epoch, "metrics": result.metrics,
        "train_metrics": result.train_metrics, "checkpoint": result.checkpoint}))
    teardown()
    assert not dist.is_initialized()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
