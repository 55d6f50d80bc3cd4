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

from flows.errors import FlowsError
from flows.flow import Flow
from flows.sampling.order import Order
from flows.stages.audio import DecodeAudio
from flows.stages.base import stage_name
from flows.training.recipe import Recipe
from flows.training.tasks import MultiTask, Task, count_samples

Example = tuple[str, str | None, torch.Tensor, int]  # key, class, audio, sample rate


@dataclass
class _Probe:
    """A stage placed just after decoding: notes each sample's rate, channels and length, and
    keeps the first ``keep`` waveforms of distinct classes (by ``target`` named with ``names``)."""

    keep: int
    target: str | None = None
    names: list[str] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    rates: Counter = field(default_factory=Counter)
    channels: Counter = field(default_factory=Counter)
    durations: list[float] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    name: str = "probe"

    def __call__(self, item: dict) -> dict:
        audio, rate = item["audio"], int(item["sample_rate"])
        label = _class_text(item.get(self.target), self.names) if self.target else None
        with self.lock:
            self.rates[rate] += 1
            self.channels[int(audio.shape[0])] += 1
            self.durations.append(audio.shape[-1] / rate)
            seen = {e[1] for e in self.examples}
            if len(self.examples) < self.keep and (label is None or label not in seen):
                key = str(item.get("key", item.get("path", "")))
                self.examples.append((key, label, audio, rate))
        return item


def _class_text(value: Any, names: list[str] | None) -> str | None:
    """A target value as class names: ``"dog_bark"``, or ``"yes no no ..."`` for a sequence."""
    if value is None:
        return None
    values = value.flatten().tolist() if isinstance(value, torch.Tensor) else [value]
    return " ".join(_name(v, names) for v in values)


def _name(value: Any, names: list[str] | None) -> str:
    """The class name of an index (the value itself when there is no name for it)."""
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    return str(value)


@dataclass
class SplitSummary:
    """What :func:`describe` found in one split."""

    name: str
    samples: int = 0
    classes: dict[str, Counter] = field(default_factory=dict)  # target field -> index counts
    values: dict[str, list[float]] = field(default_factory=dict)  # continuous targets
    probe: _Probe | None = None  # None when the flow decodes no audio


@dataclass
class Description:
    """The report of :func:`describe`; ``str()`` gives the text, ``plots`` the PNG files."""

    recipe: str
    splits: list[SplitSummary]
    plots: list[Path]
    names: dict[str, list[str]] = field(default_factory=dict)  # target -> class names by index

    def __str__(self) -> str:
        lines = [f"recipe {self.recipe}"]
        for split in self.splits:
            lines.append(f"{split.name}: {split.samples} samples")
            for target, counts in split.classes.items():
                total = sum(counts.values())
                shares = [f"{_name(k, self.names.get(target))}: {n} ({n / total:.0%})"
                          for k, n in _ordered(counts)]
                lines.extend(_wrap(f"  {target}:", shares))
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


def _wrap(head: str, entries: list[str], width: int = 100) -> list[str]:
    """``head`` and the entries on lines of at most ``width`` characters, never splitting one."""
    lines = [head]
    for entry in entries:
        if len(lines[-1]) + 2 + len(entry) > width and lines[-1].strip():
            lines.append("   ")
        lines[-1] += (" " if lines[-1] == head else "  ") + entry
    return lines


def _ordered(counts: Counter) -> list[tuple[Any, int]]:
    """Counts by key: numbers in numeric order, then text."""
    return sorted(counts.items(), key=lambda kv: (not isinstance(kv[0], int), kv[0] if
                                                  isinstance(kv[0], int) else 0, str(kv[0])))


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


def _summarize(name: str, flow: Flow, targets: list[str], names: dict[str, list[str]],
               limit: int | None, workers: int, examples: int) -> SplitSummary:
    first = targets[0] if targets else None
    probe = _Probe(examples, first, names.get(first) if first else None)
    summary = SplitSummary(name, probe=probe)
    decoded = False
    for leaf in _leaves(flow):
        stages = list(leaf.stages)
        at, decode = next(((i, s) for i, s in enumerate(stages) if isinstance(s, DecodeAudio)),
                          (None, None))
        if at is not None and decode is not None:  # probe the audio as read from disk (all of it)
            stages[at : at + 1] = [decode.reading(lazy=False), probe]
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
    summary.classes.setdefault(target, Counter()).update(values)


def describe(recipe: Recipe, out_dir: str | Path | None = None, limit: int | None = None,
             examples: int = 4) -> Description:
    """Describe the recipe's train and eval splits (the first ``limit`` samples of each); with
    ``out_dir``, plot into it ``classes.png``, ``histograms.png`` and ``waveforms.png`` (class
    indices are shown by the names of the recipe's ``label_maps()``, when it has them)."""
    targets = _targets(recipe.task())
    label_maps = getattr(recipe, "label_maps", dict)
    names = {k: list(v) for k, v in label_maps().items()}
    workers = recipe.config.num_workers
    flows = {"train": recipe.train_flow(), "eval": recipe.eval_flow()}
    splits = [_summarize(name, flow, targets, names, limit, workers, examples)
              for name, flow in flows.items() if flow is not None]
    plots = _plot(splits, names, Path(out_dir), examples) if out_dir is not None else []
    return Description(recipe.name, splits, plots, names)


def _plot(splits: list[SplitSummary], names: dict[str, list[str]], out_dir: Path,
          examples: int) -> list[Path]:
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

    targets = list(dict.fromkeys(t for s in splits for t in s.classes))
    if targets:
        keys = {t: [k for k, _ in _ordered(sum((s.classes.get(t, Counter()) for s in splits),
                                               Counter()))] for t in targets}
        rows = [len(keys[t]) for t in targets]
        fig, axes = plt.subplots(len(targets), 1, squeeze=False, figsize=(
            8, sum(1.2 + 0.22 * max(n, 3) for n in rows)), height_ratios=[max(n, 3) for n in rows])
        for ax, target in zip(axes[:, 0], targets, strict=True):
            labels = [_name(k, names.get(target)) for k in keys[target]]
            _grouped_bars(ax, labels, [(s.name, s.classes.get(target, Counter()), keys[target])
                                       for s in splits], horizontal=True)
            ax.set_xlabel("samples")
            ax.set_ylabel(f"class ({target})")
            ax.set_title(f"class balance: {target}, {len(labels)} classes")
        save(fig, "classes.png")
    probes = [(s.name, s.probe) for s in splits if s.probe is not None and s.probe.durations]
    if probes:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        for split, probe in probes:
            axes[0].hist(probe.durations, bins=20, histtype="step", linewidth=1.5, label=split)
        for ax, attribute, label in ((axes[1], "rates", "sample rate (Hz)"),
                                     (axes[2], "channels", "channels")):
            values = sorted(set().union(*(getattr(p, attribute) for _, p in probes)))
            _grouped_bars(ax, [str(v) for v in values],
                          [(split, getattr(p, attribute), values) for split, p in probes])
            ax.set_xlabel(label)
        axes[0].set_xlabel("duration (s)")
        axes[0].legend(fontsize="small")
        for ax, title in zip(axes, ("duration", "sample rate", "channels"), strict=True):
            ax.set_title(f"{title}, as read from disk")
            ax.set_ylabel("samples")
        save(fig, "histograms.png")
        shown = _examples([probe for _, probe in probes], examples)
        fig, axes = plt.subplots(len(shown), 2, figsize=(11, 2.4 * len(shown)), squeeze=False)
        for (wave, spec), (key, cls, audio, rate) in zip(axes, shown, strict=True):
            mono = audio.mean(0).numpy()
            wave.plot(torch.arange(len(mono)).numpy() / rate, mono, linewidth=0.5)
            wave.set_title(f"{cls}: {key}" if cls is not None else key, fontsize="small")
            wave.set_xlabel("time (s)")
            wave.set_ylabel("amplitude")
            spec.specgram(mono, Fs=rate, NFFT=256, noverlap=128)
            spec.set_title(f"{cls}: spectrogram, {rate} Hz" if cls is not None else
                           f"spectrogram, {rate} Hz", fontsize="small")
            spec.set_xlabel("time (s)")
            spec.set_ylabel("frequency (Hz)")
        save(fig, "waveforms.png")
    return written


def _grouped_bars(ax: Any, labels: list[str], groups: list[tuple[str, Counter, list[Any]]],
                  horizontal: bool = False) -> None:
    """One bar per split side by side (not stacked) for each of ``labels``; ``groups`` are
    (split, counts, the keys of ``labels`` in order)."""
    from matplotlib.ticker import MaxNLocator

    width = 0.8 / len(groups)
    for g, (split, counts, keys) in enumerate(groups):
        at = [i - 0.4 + width * (g + 0.5) for i in range(len(keys))]
        heights = [counts.get(k, 0) for k in keys]
        if horizontal:
            ax.barh(at, heights, height=width, label=split)
        else:
            ax.bar(at, heights, width=width, label=split)
    ticks = range(len(labels))
    if horizontal:
        ax.set_yticks(ticks, labels, fontsize="small")
        ax.set_ylim(len(labels) - 0.5, -0.5)  # the first class on top
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars
    else:
        ax.set_xticks(ticks, labels, rotation=45 if len(labels) > 6 else 0)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")


def _examples(probes: list[_Probe], count: int) -> list[Example]:
    """Up to ``count`` kept waveforms, one per class while classes last (train first)."""
    distinct: list[Example] = []
    rest: list[Example] = []
    seen: set[str | None] = set()
    for example in (e for probe in probes for e in probe.examples):
        (rest if example[1] in seen else distinct).append(example)
        seen.add(example[1])
    return (distinct + rest)[:count]


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
