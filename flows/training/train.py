"""The training loop every recipe shares, resumable exactly after any interruption.

    result = train(recipe, TrainConfig(checkpoint_dir="runs/yesno", resume=True))

The recipe says *what* to train (flows, model, task, optimizer, scheduler; data, epochs, batch
size, learning rate, seed and workers in its config); :class:`TrainConfig` says *how*
(checkpoints, evaluation, precision, clipping, accumulation, device, logs).

Checkpoints hold the model, optimizer, scheduler, grad scaler, the train loader's position
(under ``loaders["train"]``), every RNG, the step, epoch and metrics. They are written every
``checkpoint_every`` steps, at each epoch end, and when SIGTERM or SIGINT arrives (then training
stops cleanly; an evaluation the signal cut short is recorded as pending and runs first thing on
resume). Resuming from one continues exactly: with deterministic algorithms on, a run
killed at any step and resumed (with any number of workers) ends with the same parameters,
bit for bit, as a run never interrupted. That holds because

- everything is seeded from the recipe's seed before the model is built;
- the loader position is taken between batches, after the optimizer step that ends an
  accumulation group; mid-epoch checkpoints are never taken after an epoch's last batch, and
  epoch-end checkpoints hold the start of the next epoch, so the epoch count and the loader
  always agree;
- evaluation builds a fresh eval loader each time and restores the RNGs afterwards.

Failures stop training with one line (:class:`~flows.errors.FlowsError`) before they cost
anything: a checkpoint directory that cannot be written (checked with a probe file before the
model is built), a non-finite loss (naming the batch's samples, before the optimizer step), and
non-finite weights (never checkpointed). Samples that fail to read or decode stop training
too, unless ``on_error="skip"``: then they are counted and reported at each epoch end.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`train` joins the process group itself
(:func:`flows.training.distributed.setup`: gloo on CPU, nccl on CUDA), wraps the model in
DistributedDataParallel, adds metric sums over ranks, makes ranks agree on stopping, and only
rank 0 writes checkpoints and logs. Rank 0's loader position stands for every rank's (it counts
global batches); checkpoints also hold every rank's RNG state and the training sums of all ranks,
so a mid-epoch checkpoint resumes on any number of ranks that makes the same global batches
(``global_batch_size``), and is refused with a clear message otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from flows.errors import FlowsError
from flows.execution.apply import OnError
from flows.execution.threads import training_threads
from flows.flow import Flow
from flows.nodes.to_device import to_device
from flows.training.checkpoint import CheckpointManager, capture_rng, restore_rng
from flows.training.distributed import (
    Ranks,
    check_plans,
    global_plans,
    newest_on_every_rank,
    per_rank_batch_size,
    setup,
    with_batch_size,
)
from flows.training.evaluate import evaluate
from flows.training.metrics_log import LogFormat, MetricsLog, format_metrics, plot_log
from flows.training.recipe import Recipe, RecipeConfig
from flows.training.tasks import Sums, add_sums, count_samples, finalize

__all__ = ["TrainConfig", "TrainResult", "pick_device", "seed_everything", "train"]

log = logging.getLogger("flows.train")

StopSignal = Literal["SIGKILL", "SIGTERM", "SIGINT"]


def _option(default: Any, help: str) -> Any:
    """A dataclass field with the help text its command-line option shows."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """How to train; each field is also a ``flows train`` option (``--checkpoint-every``)."""

    checkpoint_dir: str | None = _option(None, "checkpoint directory: a path or any fsspec URL")
    checkpoint_every: int = _option(0, "also checkpoint every N optimizer steps (0: epoch ends)")
    keep: int = _option(3, "checkpoints to keep")
    resume: bool = _option(False, "continue from the newest valid checkpoint")
    checkpoint_storage_options: dict | None = _option(
        None, "fsspec options for the checkpoint directory, as JSON")
    eval_every: int = _option(0, "also evaluate every N optimizer steps (0: epoch ends)")
    max_steps: int | None = _option(None, "stop after N optimizer steps in all")
    global_batch_size: int | None = _option(
        None, "samples per batch over all ranks: sets the recipe's batch size to this divided "
              "by the number of ranks (keep it when resuming on another number of ranks)")
    accumulate: int = _option(1, "micro-batches per optimizer step (gradient accumulation)")
    grad_clip: float | None = _option(None, "clip the gradient norm to this value")
    amp: bool = _option(False, "mixed precision: float16 on GPUs, bfloat16 on CPU")
    device: str | None = _option(None, "cuda, mps or cpu (default: the first available)")
    deterministic: bool = _option(True, "deterministic algorithms (exact resume)")
    on_error: OnError = _option(
        "raise", "a sample that fails to read or decode: raise (stop with one line naming it) "
                 "or skip (leave it out, count it, report the count at each epoch end)")
    log_path: str | None = _option(None, "metrics log, JSONL or .csv (a local path)")
    log_format: LogFormat | None = _option(None, "jsonl or csv (default: from the extension)")
    log_every: int = _option(1, "log training metrics every N steps")
    plot: str | None = _option(None, "draw the loss and metric curves into this PNG at the end")
    progress: bool = _option(True, "progress bars")
    stop_after_steps: int | None = _option(
        None, "send this process --stop-signal after N steps (to try out resuming)")
    stop_signal: StopSignal = _option("SIGKILL", "the signal --stop-after-steps sends")


@dataclass
class TrainResult:
    """What :func:`train` did."""

    model: torch.nn.Module
    step: int  # optimizer steps done in all
    epoch: int  # epochs completed
    metrics: dict[str, float]  # the last evaluation
    train_metrics: dict[str, float]  # the last completed training epoch
    checkpoint: str | None  # the newest checkpoint written (or resumed from)
    resumed_from: str | None
    interrupted: str | None  # the signal that stopped training early, if one did
    seconds: float
    #: samples skipped on error (``on_error="skip"``): "train" in all epochs so far, "eval" in
    #: the last evaluation
    skipped: dict[str, int] = field(default_factory=lambda: {"train": 0, "eval": 0})
    best: dict[str, Any] | None = None  # the evaluation of lowest loss: {epoch, step, metrics}


def train(recipe: Recipe, config: TrainConfig | None = None) -> TrainResult:
    """Train ``recipe`` as ``config`` says; see the module docstring."""
    config = config or TrainConfig()
    _check(recipe.config, config)
    rank, world = setup(config.device)  # under torchrun: join its process group
    ranks = Ranks(rank, world, pick_device(config.device))
    if config.global_batch_size is not None:
        recipe = with_batch_size(recipe, per_rank_batch_size(config.global_batch_size, world))
    with _deterministic(config.deterministic), _StopSignals() as stop:
        return _Run(recipe, config, stop, ranks).fit()


def pick_device(name: str | None = None) -> torch.device:
    """``name``, else the first available of CUDA (this process's ``LOCAL_RANK``), MPS, CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check(rc: RecipeConfig, config: TrainConfig) -> None:
    """Reject bad option values with one clear message."""
    floors = [("epochs", rc.epochs, 1), ("batch_size", rc.batch_size, 1),
              ("num_workers", rc.num_workers, 0), ("keep", config.keep, 1),
              ("checkpoint_every", config.checkpoint_every, 0),
              ("eval_every", config.eval_every, 0), ("max_steps", config.max_steps, 1),
              ("accumulate", config.accumulate, 1), ("log_every", config.log_every, 1),
              ("stop_after_steps", config.stop_after_steps, 1),
              ("global_batch_size", config.global_batch_size, 1)]
    for name, value, floor in floors:
        if value is not None and value < floor:
            raise FlowsError(f"{name} must be at least {floor}, got {value}")
    for name, number in (("lr", rc.lr), ("grad_clip", config.grad_clip)):
        if number is not None and not number > 0:
            raise FlowsError(f"{name} must be positive, got {number}")
    if config.resume and not config.checkpoint_dir:
        raise FlowsError("resume needs a checkpoint directory")
    if config.plot and not config.log_path:
        raise FlowsError("plot needs a metrics log (log_path)")
    if config.stop_signal not in ("SIGKILL", "SIGTERM", "SIGINT"):
        raise FlowsError(f"stop_signal must be SIGKILL, SIGTERM or SIGINT, not {config.stop_signal!r}")
    if config.on_error not in ("raise", "skip"):
        raise FlowsError(f"on_error must be 'raise' or 'skip', not {config.on_error!r}")


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic algorithms (and no cuDNN autotuning) while training, if ``enabled``. Ops
    without a deterministic version (some CUDA backward passes) warn rather than fail."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS determinism
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


class _StopSignals:
    """While active (in the main thread), SIGINT and SIGTERM ask training to checkpoint and stop
    after the current step; a second one interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


_END = object()


class _Run:
    """One call of :func:`train`: the objects being trained and where training stands."""

    def __init__(self, recipe: Recipe, config: TrainConfig, stop: _StopSignals, ranks: Ranks):
        self.recipe, self.config, self.stop, self.ranks = recipe, config, stop, ranks
        rc = recipe.config
        self.device = ranks.device
        self.rank, self.world = ranks.rank, ranks.world
        self.checkpoints = (CheckpointManager(config.checkpoint_dir, config.keep,
                                              config.checkpoint_storage_options)
                            if config.checkpoint_dir else None)
        if self.checkpoints is not None and self.rank == 0:
            self.checkpoints.check()  # before anything is built: no epoch lost to a typo
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        seed_everything(rc.seed)
        self.model = recipe.model().to(self.device)
        self.net: torch.nn.Module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.task = recipe.task()
        self.optimizer = recipe.optimizer(self.model)
        self.scheduler = recipe.scheduler(self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=config.amp and self.device.type == "cuda")
        self.train_loader = self._placed(recipe.train_flow()).loader(num_workers=rc.num_workers,
                                                                     on_error=config.on_error)
        eval_flow = recipe.eval_flow()
        self.eval_flow = self._placed(eval_flow) if eval_flow is not None else None
        self.step = 0  # optimizer steps done
        self.epoch = 0  # epochs completed
        self.batch = 0  # batches into the current epoch (for the progress bar)
        self.running: dict[str, tuple[float, float]] = {}  # this epoch's training sums
        self.metrics: dict[str, float] = {}
        self.train_metrics: dict[str, float] = {}
        # the epoch (as logged) of an evaluation a stop signal cut short: it runs on resume
        self.pending_eval: int | None = None
        self.resumed_position: dict[str, Any] | None = None  # the loader state resumed from
        # samples skipped on error: all ranks' in all epochs done, the last evaluation's; all
        # ranks' in this epoch before a resume (held by rank 0); this rank's loader count when
        # this epoch (or its part since resuming) started (the loader counts across epochs)
        self.skipped = {"train": 0, "eval": 0}
        self.skipped_carried = 0
        self.skipped_start = 0
        self.best: dict[str, Any] | None = None  # the evaluation of lowest loss so far
        self.checkpoint: str | None = None
        self.resumed_from: str | None = None
        self.interrupted: str | None = None
        if self.rank == 0:
            params = sum(p.numel() for p in self.model.parameters())
            log.info("training %s on %s: %s parameters, %d epochs of %d batches",
                     recipe.name, self.device, f"{params:,}", rc.epochs, len(self.train_loader))
        if config.resume:
            self._resume()
        elif self.checkpoints is not None and (held := self.checkpoints.list()):
            raise FlowsError(
                f"{config.checkpoint_dir} already holds checkpoints (newest {held[0]}): continue "
                f"with --resume, or choose another checkpoint directory")
        self.log = (MetricsLog(config.log_path, config.log_format, keep_through=self.step)
                    if config.log_path and self.rank == 0 else None)

    def _placed(self, flow: Flow) -> Flow:
        """Pinned batches when training on a GPU, for non-blocking copies."""
        return flow.pin() if self.device.type == "cuda" else flow

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        threads = torch.get_num_threads()
        torch.set_num_threads(training_threads())  # half the cores: the other half for the workers
        try:
            return self._fit()
        finally:
            self.train_loader.close()  # no loader thread may outlive the run
            torch.set_num_threads(threads)

    def _fit(self) -> TrainResult:
        start = time.perf_counter()
        epochs = self.recipe.config.epochs
        if self.pending_eval is not None:
            self._run_pending_eval()
        batches = iter(self.train_loader) if not self.interrupted else iter(())
        while not self.interrupted and self.epoch < epochs and not self._reached_max_steps():
            if self._train_epoch(batches):
                skipped = self._loader_skipped()  # exact once the epoch's batches are done
                # start the next epoch before the epoch-end checkpoint, so that it holds the
                # loader at the start of an epoch: torchdata's Loader, restored at the end of
                # one, goes on but keeps reporting that end as its state
                batches = iter(self.train_loader)
                self._end_epoch(skipped)
            if self.interrupted or self._reached_max_steps():
                break
        if self.interrupted and self.rank == 0:
            log.warning("stopped by %s at step %d; checkpoint %s; continue with --resume",
                        self.interrupted, self.step, self.checkpoint)
        if self.config.plot and self.log is not None:
            log.info("plotted %s", plot_log(self.log.path, self.config.plot))
        return TrainResult(self.model, self.step, self.epoch, self.metrics, self.train_metrics,
                           self.checkpoint, self.resumed_from, self.interrupted,
                           time.perf_counter() - start, skipped=dict(self.skipped), best=self.best)

    def _run_pending_eval(self) -> None:
        """The evaluation a stop signal cut short, with the weights of the step it was due at;
        then the checkpoint is written again, saying it is done (so it runs only once)."""
        epoch = self.pending_eval
        assert epoch is not None and self.resumed_position is not None
        self._evaluate(epoch)
        if self.pending_eval is not None:  # stopped again: the checkpoint still says pending
            return
        if self.rank == 0:
            log.info("epoch %d/%d (step %d): eval %s (pending since the stop)", epoch,
                     self.recipe.config.epochs, self.step, format_metrics(self.metrics))
        self._save(self.resumed_position, self.skipped_start)

    def _loader_skipped(self) -> int:
        """This rank's train loader's count of samples skipped on error (across epochs)."""
        return self.train_loader.skipped if self.config.on_error == "skip" else 0

    def _reached_max_steps(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def _train_epoch(self, it: Iterator[Any]) -> bool:
        """Train on the (rest of the) epoch's batches. False if it stopped early, checkpointed: a
        signal or max_steps. A one-batch lookahead tells the epoch's last batch."""
        config, accumulate = self.config, self.config.accumulate
        with tqdm(total=len(self.train_loader), initial=self.batch, unit="batch", leave=False,
                  desc=f"epoch {self.epoch + 1}/{self.recipe.config.epochs}", dynamic_ncols=True,
                  disable=not config.progress or self.rank != 0) as bar:
            group: dict[str, tuple[float, float]] = {}  # the current optimizer step's sums
            micro, tick = 0, time.perf_counter()
            batch = next(it, _END)
            while batch is not _END:
                position = self.train_loader.state_dict()  # just after `batch`
                skipped = self._loader_skipped()  # as of `batch`, too
                upcoming = next(it, _END)
                last = upcoming is _END
                micro += 1
                boundary = micro == accumulate or last
                add_sums(group, self._forward_backward(batch, sync=boundary))
                self.batch += 1
                bar.update()
                batch = upcoming
                if not boundary:
                    continue
                self._optimizer_step()
                now = time.perf_counter()
                rate = group["loss"][1] / max(now - tick, 1e-9)
                bar.set_postfix(loss=f"{self.running['loss'][0] / self.running['loss'][1]:.4f}",
                                samples_s=f"{rate:.0f}")
                self._stop_hook()
                if config.log_path and self.step % config.log_every == 0:
                    lr = self.optimizer.param_groups[0]["lr"]
                    total = self._gather_sums(group)  # all ranks' samples: rate is the job's
                    rate = total["loss"][1] / max(now - tick, 1e-9)
                    self._log("step", {**finalize(total), "lr": lr, "samples_per_s": rate},
                              self.epoch + 1)
                micro, tick, group = 0, now, {}
                if last:  # the epoch end evaluates and checkpoints
                    break
                if config.eval_every and self.step % config.eval_every == 0:
                    self._evaluate(self.epoch + 1)  # left pending if a stop signal came
                if self._stop_requested() or self._reached_max_steps():
                    self._save(position, skipped)
                    return False
                if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    self._save(position, skipped)
            return True

    def _forward_backward(self, batch: Any, sync: bool) -> Sums:
        """Forward and backward one micro-batch; its loss and metric sums."""
        batch = to_device(batch, self.device)
        n = float(count_samples(batch))
        no_sync = getattr(self.net, "no_sync", None)
        with no_sync() if no_sync is not None and not sync else contextlib.nullcontext():
            with self._autocast():
                output = self.net(self.task.inputs(batch))
                loss = self.task.loss(output, batch)
            self.scaler.scale(loss / self.config.accumulate).backward()
        value = loss.item()
        if not math.isfinite(value):  # before the optimizer step: the weights are still good
            raise FlowsError(
                f"non-finite loss ({value}) at step {self.step + 1}, epoch {self.epoch + 1}, "
                f"batch {self.batch + 1}; the batch's samples: {_sample_names(batch)}. Stopped "
                f"before the weights changed; newest checkpoint: {self.checkpoint or 'none'}")
        with torch.no_grad():
            sums = {"loss": (value * n, n), **self.task.metrics(output, batch)}
        add_sums(self.running, sums)
        return sums

    def _optimizer_step(self) -> None:
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and self.recipe.schedule_every == "step":
            self.scheduler.step()
        self.step += 1

    def _autocast(self) -> torch.autocast:
        dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.config.amp)

    def _stop_hook(self) -> None:
        """``stop_after_steps``: send this process a real signal, as a preemption would."""
        if self.step == self.config.stop_after_steps:
            log.warning("step %d: sending myself %s", self.step, self.config.stop_signal)
            os.kill(os.getpid(), signal.Signals[self.config.stop_signal])

    def _stop_requested(self) -> bool:
        """Whether a stop signal arrived (on any rank: ranks agree, so they stop together)."""
        if self.stop.signum is not None and self.interrupted is None:
            self.interrupted = signal.Signals(self.stop.signum).name
        stopping = self.ranks.any(self.interrupted is not None)
        if stopping and self.interrupted is None:
            self.interrupted = "SIGTERM"  # sent to another rank
        return stopping

    def _end_epoch(self, skipped: int) -> None:
        """Close the epoch: its metrics, the scheduler, evaluation, a checkpoint. ``skipped``:
        this rank's train loader count of samples skipped on error, at the epoch's end."""
        self.epoch += 1
        self.batch = 0
        self.train_metrics = finalize(self._gather_sums(self.running))
        self.running = {}
        epoch_skipped = self.ranks.sum(skipped - self.skipped_start) + self.skipped_carried
        self.skipped["train"] += epoch_skipped
        self.skipped_start, self.skipped_carried = skipped, 0
        self._log("epoch", {**self.train_metrics, **self._skip_field(epoch_skipped)}, self.epoch)
        if self.scheduler is not None and self.recipe.schedule_every == "epoch":
            self.scheduler.step()
        self._evaluate(self.epoch)
        if self.rank == 0:
            scores = format_metrics(self.metrics)
            if self.pending_eval == self.epoch:
                scores = "pending (the stop cut it short; it runs on --resume)"
            skips = (f" | skipped {epoch_skipped} training, {self.skipped['eval']} evaluation "
                     "samples" if self.config.on_error == "skip" else "")
            log.info("epoch %d/%d (step %d): train %s%s%s", self.epoch, self.recipe.config.epochs,
                     self.step, format_metrics(self.train_metrics),
                     f" | eval {scores}" if scores else "", skips)
        self._save(self.train_loader.state_dict(), skipped)

    def _skip_field(self, n: int) -> dict[str, int]:
        """A log record's count of samples skipped on error (when skipping)."""
        return {"skipped": n} if self.config.on_error == "skip" else {}

    def _evaluate(self, epoch: int) -> None:
        """Score the eval flow from its start with the model in eval mode; the RNGs are restored
        afterwards, so evaluating never changes what training does next. A stop signal before
        or during it leaves it pending: the checkpoint says so, and resuming runs it."""
        if self.eval_flow is None:
            return
        if self._stop_requested():
            self.pending_eval, self.metrics = epoch, {}
            return
        with self.eval_flow.loader(num_workers=self.recipe.config.num_workers,
                                   on_error=self.config.on_error) as loader:
            sums = evaluate(self.model, self.task, loader, self.device, self._autocast,
                            stopping=lambda: self.world == 1 and self.stop.signum is not None)
            skipped = loader.skipped if self.config.on_error == "skip" else 0
        if sums is None:  # stopping: no time for the rest
            self._stop_requested()
            self.pending_eval, self.metrics = epoch, {}
            return
        self.metrics = finalize(self._gather_sums(sums))
        self.skipped["eval"] = self.ranks.sum(skipped)
        self.pending_eval = None
        self._log("eval", {**self.metrics, **self._skip_field(self.skipped["eval"])}, epoch)
        if "loss" in self.metrics and (self.best is None
                                       or self.metrics["loss"] < self.best["metrics"]["loss"]):
            self.best = {"epoch": epoch, "step": self.step, "metrics": self.metrics}

    def _gather_sums(self, sums: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        """Metric sums added over ranks."""
        if self.world == 1:
            return sums
        total: dict[str, tuple[float, float]] = {}
        for part in self.ranks.gather(sums):
            add_sums(total, part)
        return total

    def _log(self, kind: str, values: Mapping[str, float], epoch: int) -> None:
        if self.log is not None:
            self.log.write({"kind": kind, "step": self.step, "epoch": epoch, **values})

    # ---- checkpoints ----------------------------------------------------------------------
    def _save(self, loader_state: dict[str, Any], skipped: int) -> None:
        """Checkpoint at the current step, with the train loader at ``loader_state`` (where this
        rank's loader had skipped ``skipped`` samples on error in all)."""
        if self.checkpoints is None:
            return
        rngs: list[Any] = [capture_rng()]
        running = self.running
        epoch_skipped = skipped - self.skipped_start
        if self.world > 1:  # every rank's RNGs; the epoch's training sums added over ranks
            parts = self.ranks.gather((capture_rng(), self.running, epoch_skipped))
            rngs, running = [part[0] for part in parts], {}
            for part in parts:
                add_sums(running, part[1])
            epoch_skipped = sum(part[2] for part in parts)
        if self.rank != 0:
            # wait until rank 0 has written it: once one rank exits, torchrun stops the others
            self.ranks.barrier()
            return
        weights = self.model.state_dict()
        state = {
            "recipe": self.recipe.name,
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "model": weights,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "loaders": {"train": loader_state},  # rank 0's: global batches, so every rank's
            "world_size": self.world,
            "plans": global_plans(self.train_loader),
            "rng": rngs,
            "running": running,
            "metrics": {"eval": self.metrics, "train": self.train_metrics, "best": self.best},
            "pending_eval": self.pending_eval,
            # samples skipped on error: epochs done, this epoch so far (all ranks); the count
            # inside loader_state, which every rank's loader holds after resuming
            "skipped": {"done": self.skipped["train"], "epoch": epoch_skipped + self.skipped_carried,
                        "position": skipped},
        }
        _check_finite(weights, self.step, self.checkpoint)
        self.checkpoint = self.checkpoints.save(state, self.step)
        self.ranks.barrier()

    def _resume(self) -> None:
        assert self.checkpoints is not None
        found = newest_on_every_rank(self.checkpoints, self.rank)
        if found is None:
            log.info("no checkpoint in %s yet: starting from scratch", self.config.checkpoint_dir)
            return
        url, state = found
        if state["recipe"] != self.recipe.name:
            raise FlowsError(f"checkpoint {url} is from recipe {state['recipe']!r}, not "
                             f"{self.recipe.name!r}")
        check_plans(url, state, global_plans(self.train_loader), self.world)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0]
            raise FlowsError(f"checkpoint {url} does not fit this model (changed options?): "
                             f"{first}") from e
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.train_loader.load_state_dict(state["loaders"]["train"])
        self.resumed_position = state["loaders"]["train"]
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        # the sums of all ranks so far: held by rank 0 alone, they are added once at epoch end
        self.running = dict(state["running"]) if self.rank == 0 else {}
        self.metrics, self.train_metrics = state["metrics"]["eval"], state["metrics"]["train"]
        self.pending_eval = state.get("pending_eval")
        skipped = state.get("skipped", {"done": 0, "epoch": 0, "position": 0})
        self.skipped["train"], self.skipped_start = skipped["done"], skipped["position"]
        self.skipped_carried = skipped["epoch"] if self.rank == 0 else 0
        self.best = state["metrics"].get("best")
        rngs = state["rng"]
        restore_rng(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        self.checkpoint = self.resumed_from = url
        if self.rank == 0:
            log.info("resumed from %s (step %d, epoch %d)", url, self.step, self.epoch)
            saved_world = state.get("world_size", 1)
            if saved_world != self.world:
                log.info("the checkpoint was written by %d rank(s); continuing on %d",
                         saved_world, self.world)



def _sample_names(batch: Any, most: int = 64) -> str:
    """The ``key`` (else ``path``) of each sample in a batch, for messages."""
    names = batch.get("key", batch.get("path")) if isinstance(batch, Mapping) else None
    if not isinstance(names, (list, tuple)):
        return "unknown (the batch has no key or path field)"
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(str(n) for n in names[:most]) + more


def _check_finite(weights: Mapping[str, Any], step: int, newest: str | None) -> None:
    """Refuse to checkpoint weights (or buffers) of a model's ``state_dict`` that are NaN or
    infinite."""
    bad = [name for name, t in weights.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise FlowsError(f"step {step}: non-finite weights ({', '.join(bad[:8])}) though every "
                         f"loss was finite; not checkpointing them; newest checkpoint: "
                         f"{newest or 'none'}")
