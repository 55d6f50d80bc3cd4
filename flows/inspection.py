"""Look at a recipe's data and pipeline before training on it.

:func:`describe` runs each split's per-sample stages once (no batching, no shuffling) and
reports sample counts, class counts (from the task's target fields), durations, sample rates
and channels as read from disk (just after decoding), and plots the class balance, the
histograms and a few waveforms with their spectrograms. :func:`bench` times the train flow
stage by stage: each stage prefix over the same samples, then the batched flow.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flows.audio import DecodeAudio
from flows.errors import FlowsError
from flows.flow import Flow
from flows.recipe import Recipe
from flows.sampling import Order
from flows.stages import stage_name
from flows.tasks import MultiTask, Task
from flows.train import count_samples


@dataclass
class _Probe:
    """A stage placed just after decoding: notes each sample's rate, channels and length, and
    keeps the first ``keep`` waveforms."""

    keep: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    rates: Counter = field(default_factory=Counter)
    channels: Counter = field(default_factory=Counter)
    durations: list[float] = field(default_factory=list)
    examples: list[tuple[str, torch.Tensor, int]] = field(default_factory=list)
    name: str = "probe"

    def __call__(self, item: dict) -> dict:
        audio, rate = item["audio"], int(item["sample_rate"])
        with self.lock:
            self.rates[rate] += 1
            self.channels[int(audio.shape[0])] += 1
            self.durations.append(audio.shape[-1] / rate)
            if len(self.examples) < self.keep:
                self.examples.append((str(item.get("key", item.get("path", ""))), audio, rate))
        return item


@dataclass
class SplitSummary:
    """What :func:`describe` found in one split."""

    name: str
    samples: int = 0
    classes: dict[str, Counter] = field(default_factory=dict)  # target field -> value counts
    values: dict[str, list[float]] = field(default_factory=dict)  # continuous targets
    probe: _Probe | None = None  # None when the flow decodes no audio


@dataclass
class Description:
    """The report of :func:`describe`; ``str()`` gives the text, ``plots`` the PNG files."""

    recipe: str
    splits: list[SplitSummary]
    plots: list[Path]

    def __str__(self) -> str:
        lines = [f"recipe {self.recipe}"]
        for split in self.splits:
            lines.append(f"{split.name}: {split.samples} samples")
            for target, counts in split.classes.items():
                total = sum(counts.values())
                shares = "  ".join(f"{k}: {n} ({n / total:.0%})" for k, n in sorted(counts.items()))
                lines.append(f"  {target}: {shares}")
            for target, values in split.values.items():
                lines.append(f"  {target}: min {min(values):.4g}  mean "
                             f"{sum(values) / len(values):.4g}  max {max(values):.4g}")
            probe = split.probe
            if probe is not None and probe.durations:
                d = probe.durations
                lines.append(f"  duration: min {min(d):.2f} s  mean {sum(d) / len(d):.2f} s  "
                             f"max {max(d):.2f} s  total {sum(d) / 60:.1f} min")
                lines.extend(f"    {row}" for row in _text_histogram(d))
                lines.append("  sample rates: " + _counts(probe.rates, " Hz"))
                lines.append("  channels: " + _counts(probe.channels))
        if self.plots:
            lines.append("plots: " + ", ".join(str(p) for p in self.plots))
        return "\n".join(lines)


def _counts(counter: Counter, unit: str = "") -> str:
    return "  ".join(f"{k}{unit}: {n}" for k, n in sorted(counter.items()))


def _text_histogram(values: list[float], bins: int = 6, width: int = 30) -> list[str]:
    low, high = min(values), max(values)
    step = (high - low) / bins or 1.0
    counts = Counter(min(int((v - low) / step), bins - 1) for v in values)
    top = max(counts.values())
    rows = []
    for b in range(bins if high > low else 1):
        bar = "#" * round(width * counts[b] / top)
        rows.append(f"{low + b * step:6.2f}-{low + (b + 1) * step:<6.2f} s {bar:<{width}} {counts[b]}")
    return rows


def _targets(task: Task) -> list[str]:
    """The batch fields a task scores against (its labels)."""
    if isinstance(task, MultiTask):
        return [t for head in task.heads.values() for t in _targets(head)]
    target = getattr(task, "target", None)
    return [target] if isinstance(target, str) else []


def _leaves(flow: Flow) -> list[Flow]:
    """The flows with a source: the flow itself, or every flow of a mix."""
    return [flow] if flow.source is not None else [leaf for f, _ in flow.mixed for leaf in _leaves(f)]


def _unbatched(flow: Flow, stages: Iterable[Any], limit: int | None = None) -> Flow:
    """``flow`` with these stages, in source order, one sample at a time, on the CPU; only its
    first ``limit`` samples if given."""
    if limit is not None and flow.source is not None:
        flow = flow.select(range(min(limit, len(flow.source))))
    return dataclasses.replace(flow, stages=tuple(stages), order=Order(), plan=None, collate=None,
                               pin_memory=False, device=None, device_transform=None)


def _summarize(name: str, flow: Flow, targets: list[str], limit: int | None, workers: int,
               examples: int) -> SplitSummary:
    probe = _Probe(examples)
    summary = SplitSummary(name, probe=probe)
    decoded = False
    for leaf in _leaves(flow):
        stages = list(leaf.stages)
        at, decode = next(((i, s) for i, s in enumerate(stages) if isinstance(s, DecodeAudio)),
                          (None, None))
        if at is not None and decode is not None:  # probe the audio as read from disk (all of it)
            stages[at : at + 1] = [decode.eager(), probe]
            decoded = True
        for item in _unbatched(leaf, stages, limit).loader(workers):
            summary.samples += 1
            for target in targets:
                _count_target(summary, target, item.get(target) if isinstance(item, dict) else None)
    summary.probe = probe if decoded else None
    return summary


def _count_target(summary: SplitSummary, target: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            summary.values.setdefault(target, []).extend(value.flatten().tolist())
            return
        values: list[Any] = value.flatten().tolist()
    elif isinstance(value, float):
        summary.values.setdefault(target, []).append(value)
        return
    else:
        values = [value]
    summary.classes.setdefault(target, Counter()).update(str(v) for v in values)


def describe(recipe: Recipe, out_dir: str | Path | None = None, limit: int | None = None,
             examples: int = 4) -> Description:
    """Describe the recipe's train and eval splits (the first ``limit`` samples of each); with
    ``out_dir``, plot into it ``classes.png``, ``histograms.png`` and ``waveforms.png``."""
    targets = _targets(recipe.task())
    workers = recipe.config.num_workers
    flows = {"train": recipe.train_flow(), "eval": recipe.eval_flow()}
    splits = [_summarize(name, flow, targets, limit, workers, examples)
              for name, flow in flows.items() if flow is not None]
    plots = _plot(splits, Path(out_dir)) if out_dir is not None else []
    return Description(recipe.name, splits, plots)


def _plot(splits: list[SplitSummary], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise FlowsError("plots need matplotlib: pip install 'flows[plot]'") from e
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        written.append(out_dir / name)

    panels = [(s.name, t, c) for s in splits for t, c in s.classes.items()]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
        for ax, (split, target, counts) in zip(axes[0], panels, strict=True):
            keys = sorted(counts)
            ax.bar(keys, [counts[k] for k in keys])
            ax.set_title(f"{split}: {target}")
            ax.tick_params(axis="x", labelrotation=90 if len(keys) > 8 else 0)
        save(fig, "classes.png")
    probes = [(s.name, s.probe) for s in splits if s.probe is not None and s.probe.durations]
    if probes:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3))
        for split, probe in probes:
            axes[0].hist(probe.durations, bins=20, alpha=0.6, label=split)
            for ax, counts in ((axes[1], probe.rates), (axes[2], probe.channels)):
                keys = sorted(counts)
                ax.bar([str(k) for k in keys], [counts[k] for k in keys], alpha=0.6, label=split)
        for ax, title in zip(axes, ("duration (s)", "sample rate (Hz)", "channels"), strict=True):
            ax.set_title(title)
            ax.legend(fontsize="small")
        save(fig, "histograms.png")
        shown = [e for _, probe in probes for e in probe.examples][:4]
        fig, axes = plt.subplots(len(shown), 2, figsize=(10, 2.2 * len(shown)), squeeze=False)
        for (wave, spec), (key, audio, rate) in zip(axes, shown, strict=True):
            mono = audio.mean(0).numpy()
            wave.plot(torch.arange(len(mono)).numpy() / rate, mono, linewidth=0.5)
            wave.set_title(key, fontsize="small")
            spec.specgram(mono, Fs=rate, NFFT=256, noverlap=128)
            spec.set_title(f"{rate} Hz", fontsize="small")
        save(fig, "waveforms.png")
    return written


@dataclass
class Timing:
    """One row of :func:`bench`: the flow up to ``stage``, timed over ``samples``."""

    stage: str
    samples: int
    seconds: float


@dataclass
class Benchmark:
    """The result of :func:`bench`; ``str()`` gives the table."""

    recipe: str
    workers: int
    repeats: int
    rows: list[Timing]

    def __str__(self) -> str:
        lines = [f"recipe {self.recipe}, train flow, {self.workers} workers, best of "
                 f"{self.repeats} runs",
                 f"{'up to stage':<24}{'samples/s':>12}{'ms/sample':>12}{'this stage':>12}"]
        previous = 0.0
        for row in self.rows:
            per = 1000 * row.seconds / max(row.samples, 1)
            lines.append(f"{row.stage:<24}{row.samples / max(row.seconds, 1e-9):>12.1f}"
                         f"{per:>12.3f}{per - previous:>+12.3f}")
            previous = per
        return "\n".join(lines)


def bench(recipe: Recipe, samples: int = 256, repeats: int = 3) -> Benchmark:
    """Time each stage prefix of the recipe's train flow over its first ``samples`` samples
    (in source order), then the whole flow with batching; each the best of ``repeats`` runs."""
    flow = recipe.train_flow()
    if flow.source is None:
        raise FlowsError("bench times one flow; this recipe's train flow is a mix")
    workers = recipe.config.num_workers
    prefixes = [(stage_name(flow.stages[k - 1]) if k else "source",
                 _unbatched(flow, flow.stages[:k], samples)) for k in range(len(flow.stages) + 1)]
    batched = dataclasses.replace(flow.select(range(min(samples, len(flow.source)))), order=Order())
    rows = [min((_time(f, name, workers) for _ in range(repeats)), key=lambda t: t.seconds)
            for name, f in [*prefixes, ("batch", batched)]]
    return Benchmark(recipe.name, workers, repeats, rows)


def _time(flow: Flow, name: str, workers: int) -> Timing:
    start = time.perf_counter()
    seen = sum(count_samples(out) if flow.plan is not None else 1 for out in flow.loader(workers))
    return Timing(name, seen, time.perf_counter() - start)
