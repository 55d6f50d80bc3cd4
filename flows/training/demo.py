"""``flows demo``: exact resume, shown end to end on a fresh machine with no data.

1. generate a small synthetic dataset in the recipe's exact layout (YESNO by default);
2. train it uninterrupted (the reference) and, side by side, the same run that sends itself
   SIGKILL mid-epoch: a real process killed by a real signal, no chance to save anything;
3. resume the killed run from its newest checkpoint, with another number of workers;
4. compare the final parameters of the two runs bit for bit.

Each run is a real ``python -m flows train`` subprocess.
"""

from __future__ import annotations

import functools
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flows.errors import FlowsError
from flows.training.checkpoint import CheckpointManager
from flows.training.metrics_log import format_metrics, read_log
from flows.training.recipe import get_recipe, make_config


@dataclass
class DemoResult:
    """What the demo found: ``identical`` is the point."""

    identical: bool
    steps: int  # optimizer steps of the whole run
    killed_at: int
    resumed_from: int  # the step of the checkpoint the resumed run started from
    tensors: int
    values: int
    seconds: dict[str, float]  # wall time of each phase


def run_demo(workdir: str | Path | None = None, recipe: str = "yesno", epochs: int = 3,
             kill_at: int | None = None, workers: int = 2, resume_workers: int = 0,
             echo: Callable[[str], Any] | None = None) -> DemoResult:
    """Run the demo (see the module docstring) in ``workdir`` (default: a temporary folder,
    removed afterwards), printing each phase and the runs' progress with ``echo`` (default:
    print, flushed at once)."""
    echo = echo or functools.partial(print, flush=True)
    start = time.perf_counter()
    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="flows-demo-"))
    try:
        return _demo(root, recipe, epochs, kill_at, workers, resume_workers, echo, start)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _demo(root: Path, name: str, epochs: int, kill_at: int | None, workers: int,
          resume_workers: int, echo: Callable[[str], Any], start: float) -> DemoResult:
    cls = get_recipe(name)
    seconds: dict[str, float] = {}
    echo(f"flows demo: train {cls.name}, kill it mid-epoch with SIGKILL, resume, and compare "
         f"with an uninterrupted run (in {root})")
    tick = time.perf_counter()
    try:
        data = cls.generate(root / "data", seed=0)
    except NotImplementedError as e:
        raise FlowsError(f"recipe {cls.name!r} cannot generate synthetic data") from e
    seconds["data"] = time.perf_counter() - tick
    kinds = Counter(p.suffix or "other" for p in Path(data).rglob("*") if p.is_file())
    files = ", ".join(f"{n} {suffix}" for suffix, n in kinds.most_common())
    echo(f"  data       {sum(kinds.values())} files ({files}) generated in {data} "
         f"({seconds['data']:.1f} s)")

    per_epoch = len(cls(make_config(cls, data_dir=str(data))).train_flow().loader())
    total = per_epoch * epochs
    kill_at = kill_at or per_epoch * (epochs // 2) + max(1, per_epoch // 2)
    if not 0 < kill_at < total:
        raise FlowsError(f"cannot kill at step {kill_at}: the run has {total} steps")
    every = max(1, per_epoch // 3)
    command = [sys.executable, "-m", "flows", "train", name, "--data-dir", str(data),
               "--epochs", str(epochs), "--checkpoint-every", str(every), "--no-progress"]

    def run(run_dir: str, log: str, *options: str) -> subprocess.Popen:
        """Start ``flows train`` checkpointing into ``run_dir``, its output into ``log``."""
        with open(root / log, "w") as out:
            return subprocess.Popen([*command, "--checkpoint-dir", str(root / run_dir), *options],
                                    stdout=out, stderr=subprocess.STDOUT)

    echo(f"  training   the reference ({total} steps) and the run to kill at step {kill_at}, "
         "side by side (two subprocesses) ...")
    tick = time.perf_counter()
    reference = run("reference", "reference.log", "--num-workers", str(workers))
    try:
        killed = run("interrupted", "interrupted.log", "--num-workers", str(workers),
                     "--stop-after-steps", str(kill_at), "--stop-signal", "SIGKILL")
        progress = _progress(root, {"reference": ("reference", total),
                                         "run to kill": ("interrupted", kill_at)}, tick)
        _watch(killed, progress, echo)
        _wait(killed, root / "interrupted.log", -signal.SIGKILL)
        seconds["interrupted"] = time.perf_counter() - tick
        _watch(reference, progress, echo)
        _wait(reference, root / "reference.log", 0)
        seconds["reference"] = time.perf_counter() - tick
    finally:
        if reference.poll() is None:  # the other run failed: stop this one too
            reference.kill()
            reference.wait()
    newest = _newest(root / "interrupted")
    echo(f"  reference  {epochs} epochs x {per_epoch} steps, {workers} workers, never "
         f"interrupted ({seconds['reference']:.1f} s)")
    echo(f"  killed     by SIGKILL at step {kill_at} (epoch {(kill_at - 1) // per_epoch + 1}, "
         f"step {(kill_at - 1) % per_epoch + 1} of {per_epoch}); newest checkpoint: step {newest['step']} "
         f"({seconds['interrupted']:.1f} s, side by side with the reference)")

    echo(f"  resuming   from step {newest['step']} with {resume_workers} workers ...")
    tick = time.perf_counter()
    resumed = run("interrupted", "resumed.log", "--num-workers", str(resume_workers), "--resume")
    _watch(resumed, _progress(root, {"resumed run": ("interrupted", total)}, tick), echo)
    _wait(resumed, root / "resumed.log", 0)
    seconds["resumed"] = time.perf_counter() - tick
    final, expected = _newest(root / "interrupted"), _newest(root / "reference")
    echo(f"  resumed    from step {newest['step']} with {resume_workers} workers, ran to step "
         f"{final['step']} ({seconds['resumed']:.1f} s)")

    a, b = final["model"], expected["model"]
    identical = (final["step"] == expected["step"] and a.keys() == b.keys()
                 and all(torch.equal(a[k], b[k]) for k in a))
    values = sum(t.numel() for t in a.values())
    scores = format_metrics(expected["metrics"]["eval"])
    seconds["total"] = time.perf_counter() - start
    verdict = "bit-identical to" if identical else "DIFFERENT from"
    echo(f"  result     resumed parameters are {verdict} the uninterrupted run's "
         f"({len(a)} tensors, {values:,} values); eval {scores}")
    echo(f"  total      {seconds['total']:.1f} s")
    return DemoResult(identical, int(final["step"]), kill_at, int(newest["step"]), len(a),
                      values, seconds)


def _progress(root: Path, runs: dict[str, tuple[str, int]], start: float) -> Callable[[], str]:
    """A line with the step each run (``{name: (its checkpoint directory under root, its last
    step)}``) has logged so far."""
    def line() -> str:
        steps = ", ".join(f"{name} at step {_logged_step(root / run / 'metrics.jsonl')}/{last}"
                          for name, (run, last) in runs.items())
        return f"  ...        {steps} ({time.perf_counter() - start:.0f} s)"
    return line


def _logged_step(log: Path) -> int:
    """The last training step in a run's metrics log (0 before the first)."""
    if not log.exists():
        return 0
    with warnings.catch_warnings():  # a last line being written is dropped: no need to say so
        warnings.simplefilter("ignore")
        records = read_log(log, "jsonl")
    steps = [int(r["step"]) for r in records if r["kind"] == "step"]
    return steps[-1] if steps else 0


def _watch(process: subprocess.Popen, progress: Callable[[], str], echo: Callable[[str], Any],
           every: float = 5.0) -> None:
    """Wait until ``process`` has exited, echoing ``progress()`` every ``every`` seconds while
    it changes."""
    last = ""
    while process.poll() is None:
        try:
            process.wait(timeout=every)
        except subprocess.TimeoutExpired:
            line = progress()
            if line.split(" (")[0] != last:
                echo(line)
                last = line.split(" (")[0]


def _wait(process: subprocess.Popen, log: Path, expected: int) -> None:
    """Wait for a training subprocess; raise with its output if it exits otherwise."""
    code = process.wait()
    if code != expected:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise FlowsError(f"the {log.stem} run exited with {code}, not {expected}:\n{tail}")


def _newest(directory: Path) -> dict[str, Any]:
    found = CheckpointManager(str(directory)).latest_valid()
    if found is None:
        raise FlowsError(f"no checkpoint in {directory}")
    return found[1]
