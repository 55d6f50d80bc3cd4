"""The shared training loop: exact resume after real signals (SIGKILL in subprocesses, SIGTERM
and SIGINT in process), checkpoint fallback, metrics for every kind of task, logs and plots."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import fsspec
import numpy as np
import pytest
import torch
from torch import nn

from flows import Flow
from flows.errors import FlowsError
from flows.training.checkpoint import CheckpointManager, CheckpointWarning
from flows.training.metrics_log import read_log
from flows.training.recipe import Recipe, RecipeConfig, make_config
from flows.training.tasks import Classification, MultiTask, Regression, SequenceLabels, Task
from flows.training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, PER_EPOCH = 3, 10  # 40 training files in batches of 4


class Label:
    """``label`` from a file name like ``007_1.pt``."""

    name = "label"

    def __call__(self, item: dict) -> dict:
        return {**item, "label": int(item["key"].rsplit("_", 1)[1][0])}


class Jitter:
    """Random noise seeded by (seed, epoch, sample): exercises stage randomness on resume."""

    name = "jitter"
    random = True

    def __call__(self, item: dict, generator: np.random.Generator) -> dict:
        noise = generator.normal(0.0, 0.1, size=tuple(item["audio"].shape)).astype(np.float32)
        return {**item, "audio": item["audio"] + torch.from_numpy(noise)}


class Net(nn.Module):
    """A small MLP with dropout (so training consumes torch's RNG) and the heads of a task."""

    HEADS = {"classify": {"cls": 2}, "sequence": {"seq": 16}, "regress": {"reg": 1},
             "multi": {"cls": 2, "reg": 1}}

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.3))
        self.heads = nn.ModuleDict({k: nn.Linear(12, n) for k, n in self.HEADS[kind].items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        h = self.body(x)
        out = {name: head(h) for name, head in self.heads.items()}
        if self.kind == "multi":
            return out
        (y,) = out.values()
        return y.view(-1, 8, 2) if self.kind == "sequence" else y


@dataclass
class TinyConfig(RecipeConfig):
    epochs: int = EPOCHS
    batch_size: int = 4
    lr: float = 0.05
    task: Literal["classify", "sequence", "regress", "multi"] = "classify"


class Tiny(Recipe):
    """40 train and 12 eval vectors, one ``.pt`` file each, named ``{index}_{label}.pt``.

    (Not ``.npy``: ``np.load`` parses headers with ``ast``, which CPython 3.11 does not do
    safely from several threads at once, python/cpython#106905.)"""

    name = "tiny"
    Config = TinyConfig
    config: TinyConfig
    data_hint = "write it with tests.test_train.Tiny.generate(root)"

    def _flow(self, split: str) -> Flow:
        flow = Flow.files(f"{self.config.data_dir}/{split}", extensions=[".pt"])
        flow = flow.read().decode_tensor(to="audio").map(Label()).map(self._targets)
        return flow

    def _targets(self, item: dict) -> dict:
        x = item["audio"]
        return {**item, "target": float(x.mean()), "labels": (x.view(8, 2).sum(-1) > 0).long()}

    def train_flow(self) -> Flow:
        return self._flow("train").shuffle(self.config.seed).map(Jitter()).batch(4)

    def eval_flow(self) -> Flow:
        return self._flow("eval").batch(4)

    def model(self) -> nn.Module:
        return Net(self.config.task)

    def task(self) -> Task:
        return {"classify": Classification(), "sequence": SequenceLabels(),
                "regress": Regression(),
                "multi": MultiTask({"cls": Classification(), "reg": Regression()})}[self.config.task]

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)

    @classmethod
    def generate(cls, root: str | Path, seed: int = 0) -> Path:
        g = np.random.default_rng(seed)
        for split, n in (("train", 40), ("eval", 12)):
            (Path(root) / split).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x = torch.from_numpy(g.normal(size=(1, 16)).astype(np.float32))
                torch.save(x, Path(root) / split / f"{i:03d}_{int(x.mean() > 0)}.pt")
        return Path(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Tiny.generate(tmp_path_factory.mktemp("tiny"))


def recipe(data: Path, **options) -> Tiny:
    return Tiny(make_config(Tiny, data_dir=str(data), **options))


def quiet(**options) -> TrainConfig:
    return TrainConfig(progress=False, **options)


def assert_same_parameters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs"


def newest(directory: Path | str) -> dict:
    found = CheckpointManager(str(directory)).latest_valid()
    assert found is not None
    return found[1]


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The parameters of an uninterrupted run (in this process)."""
    result = train(recipe(data), quiet(checkpoint_dir=str(tmp_path_factory.mktemp("ref"))))
    assert (result.step, result.epoch, result.interrupted) == (EPOCHS * PER_EPOCH, EPOCHS, None)
    return result.model.state_dict()


def cli_train(data: Path, directory: Path, *options: str) -> subprocess.CompletedProcess:
    """``python -m flows train`` with the tiny recipe, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "flows", "train", "tests.test_train:Tiny", "--data-dir", str(data),
         "--checkpoint-dir", str(directory), "--checkpoint-every", "3", "--no-progress", *options],
        cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_sigkill_at_several_steps_then_resume_is_bit_identical(data, reference, tmp_path):
    """Killed by SIGKILL mid-epoch, on the last batch of an epoch (before its checkpoint) and
    just after an epoch-end checkpoint, each time resumed with another number of workers: the
    final parameters equal the uninterrupted run's."""
    # (workers, kill at step, newest checkpoint left): checkpoints every 3 steps and per epoch
    chain = [(0, 7, 6), (2, 10, 9), (2, 21, 20)]
    for workers, kill_at, left in chain:
        resume = ["--resume"] if kill_at != chain[0][1] else []
        run = cli_train(data, tmp_path, "--num-workers", str(workers), "--stop-after-steps",
                        str(kill_at), "--stop-signal", "SIGKILL", *resume)
        assert run.returncode == -signal.SIGKILL, run.stderr
        assert newest(tmp_path)["step"] == left
    run = cli_train(data, tmp_path, "--num-workers", "0", "--resume")
    assert run.returncode == 0, run.stderr
    assert "resumed from" in run.stderr and "ckpt-0000000020.pt" in run.stderr
    final = newest(tmp_path)
    assert (final["step"], final["epoch"]) == (EPOCHS * PER_EPOCH, EPOCHS)
    assert_same_parameters(final["model"], reference)
    steps = [r["step"] for r in read_log(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == list(range(1, EPOCHS * PER_EPOCH + 1))  # redone steps are not logged twice


def test_sigterm_and_sigint_checkpoint_then_stop_cleanly(data, tmp_path):
    """With accumulation, clipping and evaluation every 3 steps: SIGTERM, then SIGINT, each
    saves a checkpoint at the step it arrives and stops; resuming ends bit-identical."""
    options = dict(accumulate=2, grad_clip=0.5, eval_every=3, checkpoint_every=4)
    expected = train(recipe(data), quiet(checkpoint_dir=str(tmp_path / "ref"), **options))
    assert expected.step == EPOCHS * PER_EPOCH // 2
    directory = str(tmp_path / "run")
    stopped = train(recipe(data), quiet(checkpoint_dir=directory, stop_after_steps=5,
                                        stop_signal="SIGTERM", **options))
    assert (stopped.interrupted, stopped.step) == ("SIGTERM", 5)
    assert stopped.checkpoint is not None and stopped.checkpoint.endswith("ckpt-0000000005.pt")
    stopped = train(recipe(data, num_workers=2),
                    quiet(checkpoint_dir=directory, resume=True, stop_after_steps=11,
                          stop_signal="SIGINT", **options))
    assert (stopped.interrupted, stopped.step, stopped.epoch) == ("SIGINT", 11, 2)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    done = train(recipe(data), quiet(checkpoint_dir=directory, resume=True, **options))
    assert done.interrupted is None and done.resumed_from == stopped.checkpoint
    assert_same_parameters(done.model.state_dict(), expected.model.state_dict())
    assert done.metrics == expected.metrics and done.train_metrics == expected.train_metrics


@pytest.mark.parametrize("where", ["local", "memory"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(data, reference, tmp_path, where):
    directory = str(tmp_path) if where == "local" else f"memory://ckpt-{uuid.uuid4().hex}"
    first = train(recipe(data), quiet(checkpoint_dir=directory, checkpoint_every=2, max_steps=6))
    assert first.step == 6 and first.interrupted is None
    manager = CheckpointManager(directory)
    urls = manager.list()
    assert [u.rsplit("-", 1)[1] for u in urls] == ["0000000006.pt", "0000000004.pt",
                                                    "0000000002.pt"]
    with fsspec.open(urls[0], "rb") as f:
        data_bytes = f.read()
    with fsspec.open(urls[0], "wb") as f:
        f.write(data_bytes[: len(data_bytes) // 2])  # truncated, as by a crash mid-copy
    with pytest.warns(CheckpointWarning, match="ckpt-0000000006.pt"):
        done = train(recipe(data), quiet(checkpoint_dir=directory, resume=True))
    assert done.resumed_from == urls[1]
    assert_same_parameters(done.model.state_dict(), reference)


def test_checkpoint_holds_everything_and_loads_weights_only(data, tmp_path):
    train(recipe(data), quiet(checkpoint_dir=str(tmp_path), max_steps=4, checkpoint_every=2))
    state = newest(tmp_path)  # CheckpointManager loads with weights_only=True
    assert {"model", "optimizer", "scheduler", "scaler", "loaders", "rng", "step", "epoch",
            "metrics"} <= state.keys()
    assert set(state["loaders"]) == {"train"} and state["step"] == 4
    assert {"python", "numpy", "torch"} <= state["rng"][0].keys()


def test_existing_checkpoints_need_resume(data, tmp_path):
    train(recipe(data), quiet(checkpoint_dir=str(tmp_path), max_steps=1))
    with pytest.raises(FlowsError, match="already holds checkpoints"):
        train(recipe(data), quiet(checkpoint_dir=str(tmp_path)))


@pytest.mark.parametrize(("options", "message"), [
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"lr": -1.0}, "lr must be positive"),
    ({"accumulate": 0}, "accumulate must be at least 1"),
    ({"plot": "x.png"}, "plot needs a metrics log"),
])
def test_bad_values_are_one_clear_error(data, options, message):
    recipe_options = {k: v for k, v in options.items() if k in ("epochs", "lr")}
    train_options = {k: v for k, v in options.items() if k not in recipe_options}
    with pytest.raises(FlowsError, match=message):
        train(recipe(data, **recipe_options), quiet(**train_options))


@pytest.mark.parametrize(("task", "keys"), [
    ("classify", {"loss", "accuracy"}),
    ("sequence", {"loss", "accuracy", *(f"accuracy_{p}" for p in range(8))}),
    ("regress", {"loss", "mae", "mse", "rmse"}),
    ("multi", {"loss", "cls/accuracy", "reg/mae", "reg/mse", "reg/rmse"}),
])
def test_metrics_for_every_kind_of_task(data, task, keys):
    result = train(recipe(data, task=task, epochs=1), quiet(amp=task == "classify"))
    assert set(result.metrics) == keys and set(result.train_metrics) == keys
    assert all(np.isfinite(v) for v in result.metrics.values())


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_metrics_log_per_step_and_epoch_and_plot(data, tmp_path, suffix):
    log = tmp_path / f"metrics.{suffix}"
    train(recipe(data, epochs=2), quiet(log_path=str(log), eval_every=4, plot=str(tmp_path / "c.png")))
    records = read_log(log)
    kinds = [r["kind"] for r in records]
    assert kinds.count("step") == 2 * PER_EPOCH and kinds.count("epoch") == 2
    assert kinds.count("eval") == 2 + 4  # epoch ends; steps 4, 8, 12, 16 (20 ends epoch 2)
    step = next(r for r in records if r["kind"] == "step")
    assert {"loss", "accuracy", "lr", "samples_per_s"} <= step.keys()
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_device_is_chosen_and_batches_reach_it(data):
    result = train(recipe(data, epochs=1), quiet())
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert next(result.model.parameters()).device.type == expected
    assert not torch.are_deterministic_algorithms_enabled()  # restored after training


def test_checkpoints_on_s3(data, reference, s3_bucket, s3_options):
    """The checkpoint directory can be any fsspec URL: here S3 (a local moto server)."""
    directory = f"{s3_bucket}/runs/{uuid.uuid4().hex}"
    config = dict(checkpoint_dir=directory, checkpoint_storage_options=s3_options,
                  checkpoint_every=4)
    stopped = train(recipe(data), quiet(stop_after_steps=13, stop_signal="SIGTERM", **config))
    assert stopped.checkpoint == f"{directory}/ckpt-0000000013.pt"
    done = train(recipe(data), quiet(resume=True, **config))
    assert done.resumed_from == stopped.checkpoint
    assert_same_parameters(done.model.state_dict(), reference)


def test_a_checkpoint_of_another_model_is_refused(data, tmp_path):
    train(recipe(data), quiet(checkpoint_dir=str(tmp_path), max_steps=1))
    with pytest.raises(FlowsError, match="does not fit this model"):
        train(recipe(data, task="sequence"), quiet(checkpoint_dir=str(tmp_path), resume=True))
