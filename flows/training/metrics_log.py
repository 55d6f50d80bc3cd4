"""Metric logs: records appended to a JSONL or CSV file, read back, and plotted to PNG.

A record is a flat dict: ``kind`` ("step": one optimizer step of training, "epoch": a training
epoch's averages, "eval": an evaluation), ``step``, ``epoch`` and metric values::

    {"kind": "eval", "step": 120, "epoch": 3, "loss": 0.21, "accuracy": 0.94}

JSONL holds one record per line. CSV is long ("tidy") so records of every kind share one header:
``kind,step,epoch,metric,value``, one row per metric. matplotlib is only needed to plot.

Every line ends with a newline, so a last line without one (or, in JSONL, one that does not
parse) was torn by an interrupted write: reading drops it with a warning. Any other bad line is
an error naming the file and the line.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from flows.errors import FlowsError

LogFormat = Literal["jsonl", "csv"]
Record = dict[str, Any]
T = TypeVar("T")
_KEYS = ("kind", "step", "epoch")
_CSV_HEADER = [*_KEYS, "metric", "value"]


def log_format(path: str | Path, format: LogFormat | None = None) -> LogFormat:
    """The format of a log: ``format`` if given, else from the extension (``.csv`` or JSONL)."""
    if format is not None:
        if format not in ("jsonl", "csv"):
            raise FlowsError(f"log format must be 'jsonl' or 'csv', not {format!r}")
        return format
    return "csv" if str(path).lower().endswith(".csv") else "jsonl"


class MetricsLog:
    """Appends records to a local JSONL or CSV file.

    Opening keeps the records up to step ``keep_through`` and drops the rest, so a run resumed
    from the checkpoint of step N continues a log without the steps it is about to redo
    (``keep_through=0``, a fresh run, starts an empty log)."""

    def __init__(self, path: str | Path, format: LogFormat | None = None, keep_through: int = 0):
        self.path = Path(path)
        self.format = log_format(path, format)
        kept = [r for r in read_log(self.path, self.format) if r["step"] <= keep_through] \
            if self.path.is_file() else []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            with os.fdopen(fd, "w", newline="") as f:
                if self.format == "csv":
                    csv.writer(f).writerow(_CSV_HEADER)
                _write(f, self.format, kept)
            os.replace(tmp, self.path)
        except OSError as e:
            raise FlowsError(f"metrics log {self.path} cannot be written: "
                             f"{e.strerror or e}") from e

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (``kind``, ``step``, ``epoch`` and metric values)."""
        with open(self.path, "a", newline="") as f:
            _write(f, self.format, [record])


def _write(f: Any, format: LogFormat, records: Iterable[Mapping[str, Any]]) -> None:
    if format == "jsonl":
        f.writelines(json.dumps(dict(r)) + "\n" for r in records)
        return
    writer = csv.writer(f)
    for r in records:
        writer.writerows([*(r[k] for k in _KEYS), name, value]
                         for name, value in r.items() if name not in _KEYS)


def read_log(path: str | Path, format: LogFormat | None = None) -> list[Record]:
    """The records of a JSONL or CSV log, in order; a torn last line is dropped with a warning."""
    format = log_format(path, format)
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    last = lines[-1] if lines else "\n"
    if not last.endswith(("\n", "\r")) or format == "jsonl" and last.strip() and not _parses(last):
        warnings.warn(f"metrics log {path}: dropping its last line ({len(lines)}), torn by an "
                      f"interrupted write: {last.strip()[:60]!r}", stacklevel=2)
        lines.pop()
    if format == "jsonl":
        return [_parse(path, number, _json_record, line)
                for number, line in enumerate(lines, 1) if line.strip()]
    records: list[Record] = []
    rows = csv.DictReader(lines)
    for row in rows:
        key, metric, value = _parse(path, rows.line_num, _csv_row, row)
        if not records or any(records[-1][k] != v for k, v in key.items()):
            records.append(key)
        records[-1][metric] = value
    return records


def _parse(path: str | Path, number: int, parse: Callable[[Any], T], raw: Any) -> T:
    """``parse(raw)``, or one error naming the file and the line ``raw`` is."""
    try:
        return parse(raw)
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        raise FlowsError(f"metrics log {path}, line {number}: not a record: {e}") from e


def _json_record(line: str) -> Record:
    """A JSONL line's record: a dict with at least ``kind``, ``step`` and ``epoch``."""
    value = json.loads(line)
    if not isinstance(value, dict) or not set(_KEYS) <= value.keys():
        raise ValueError(f"not a dict with {', '.join(_KEYS)}: {line.strip()[:60]!r}")
    return value


def _csv_row(row: dict[str, str]) -> tuple[Record, str, float]:
    """A CSV row's record key (kind, step, epoch), metric name and value."""
    key = {"kind": row["kind"], "step": int(row["step"]), "epoch": int(row["epoch"])}
    return key, row["metric"], float(row["value"])


def _parses(line: str) -> bool:
    try:
        _json_record(line)
    except ValueError:
        return False
    return True


_LABELS = {"step": "train (per step)", "epoch": "train", "eval": "eval"}


def format_metrics(metrics: Mapping[str, float]) -> str:
    """Metrics in one line (``loss 0.2104  accuracy 0.95``), leaving out per-position ones."""
    return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if not re.search(r"_\d+$", k))


def _group(metric: str) -> str:
    """Per-position metrics (``accuracy_3``) share a panel with their siblings."""
    return re.sub(r"_\d+$", "_*", metric)


def plot_log(records: str | Path | list[Record], png: str | Path) -> Path:
    """Plot loss and metric curves against the step (one panel per metric) into ``png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise FlowsError("plotting needs matplotlib: pip install 'flows[plot]'") from e
    if not isinstance(records, list):
        records = read_log(records)
    skip = {*_KEYS, "lr", "samples_per_s", "skipped"}
    groups: dict[str, dict[tuple[str, str], list[tuple[int, float]]]] = {}
    for r in records:
        for name, value in r.items():
            noisy = r["kind"] == "step" and name != "loss"  # per-batch metrics: too noisy to plot
            if name not in skip and not noisy and isinstance(value, (int, float)):
                line = groups.setdefault(_group(name), {}).setdefault((r["kind"], name), [])
                line.append((r["step"], value))
    names = sorted(groups, key=lambda g: (g != "loss", g))
    if not names:
        raise FlowsError("nothing to plot: the log has no metric records")
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.6 * len(names)), squeeze=False,
                             sharex=True)
    styles: dict[str, dict[str, Any]] = {"step": {"alpha": 0.35, "linewidth": 0.8}, "epoch": {"marker": "o"},
              "eval": {"marker": "s"}}
    for ax, group in zip(axes[:, 0], names, strict=True):
        for (kind, name), points in sorted(groups[group].items()):
            xs, ys = zip(*points, strict=True)
            label = _LABELS.get(kind, kind) + ("" if name == group else f" {name}")
            ax.plot(xs, ys, label=label, **styles.get(kind, {}))
        ax.set_ylabel(group)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=2)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
