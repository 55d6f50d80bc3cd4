"""Flow: a readable, immutable builder for pipelines.

    loader = (Flow.files("s3://bucket/clips/**/*.wav")
              .shuffle(seed=0)
              .read().decode_audio().downmix().resample(16_000).pad(64_000)
              .batch(32)
              .pin()
              .loader(num_workers=4))

Each method returns a new Flow. ``loader()`` builds the node graph:
Sampler -> Workers(stages and collate, one task per batch) -> Gather -> Prefetch (and pin) -> ToDevice.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torchdata.nodes import BaseNode

from flows.dataset import FlowDataset
from flows.errors import EmptySourceError, FlowsError
from flows.execution.apply import Apply, OnError
from flows.loader import Loader
from flows.nodes.gather import Gather
from flows.nodes.mix import Mix
from flows.nodes.prefetch import Prefetch
from flows.nodes.sampler import Sampler
from flows.nodes.to_device import ToDevice
from flows.nodes.workers import Workers
from flows.ranks import distributed_position
from flows.sampling.order import Order, splits
from flows.sampling.plans import DurationBuckets, FixedBatches, Plan, StratifiedBatches
from flows.sources.base import Source, Subset
from flows.sources.files import AUDIO_EXTENSIONS, Files
from flows.sources.items import ColumnData, Columns, Items
from flows.sources.table import Table, Where
from flows.stages import audio
from flows.stages.base import Filter, Map
from flows.stages.cache import Cached
from flows.stages.collate import Collate
from flows.stages.read import ReadBytes
from flows.stages.tensor import DecodeTensor
from flows.stats import Stats

PlanFactory = Callable[[int], Plan]  # world size -> plan of global batches


@dataclass(frozen=True)
class Flow:
    """A pipeline description: a source, an order, per-sample stages, batching and placement."""

    source: Source | None
    stages: tuple[Callable, ...] = ()
    order: Order = Order()
    plan: PlanFactory | None = None
    collate: Collate | None = None
    pin_memory: bool = False
    device: str | None = None
    device_transform: Callable | None = None
    storage_options: dict | None = None
    mixed: tuple[tuple[Flow, float], ...] = field(default=())
    mix_seed: int = 0
    mix_stop: Literal["first", "all"] = "first"

    # ---- sources -------------------------------------------------------------------------
    @classmethod
    def files(cls, url: str, extensions: Sequence[str] | None = AUDIO_EXTENSIONS,
              recursive: bool = True, storage_options: dict | None = None,
              manifest: str | os.PathLike[str] | None = None) -> Flow:
        """Files under a local directory, fsspec URL or glob, sorted: listed once per job (on
        rank 0) into a memory-mapped manifest; ``manifest`` names one to reuse, or to write."""
        return cls(Files(url, extensions, recursive, storage_options, manifest),
                   storage_options=storage_options)

    @classmethod
    def table(cls, url: str, columns: Sequence[str] | None = None, where: Where = None,
              path_column: str | None = None, root: str | None = None,
              storage_options: dict | None = None) -> Flow:
        """Rows of a CSV, Parquet or Arrow IPC table (Parquet streamed by row group, Arrow
        memory-mapped: a file manifest works too)."""
        return cls(Table(url, columns, where, path_column, root, storage_options),
                   storage_options=storage_options)

    @classmethod
    def items(cls, items: Sequence[Any] | ColumnData) -> Flow:
        """In-memory records: a sequence, or columns (a mapping of equal-length arrays, a
        ``pyarrow.Table``, a DataFrame) kept as they are, a record dict made per sample."""
        if isinstance(items, (Mapping, pa.Table, pd.DataFrame)):
            columns = Columns(items)
            if not len(columns):
                raise EmptySourceError("Flow.items got no rows")
            return cls(columns)
        return cls(Items(items))

    @classmethod
    def from_source(cls, source: Source, storage_options: dict | None = None) -> Flow:
        """Any :class:`~flows.sources.base.Source`."""
        return cls(source, storage_options=storage_options)

    @classmethod
    def mix(cls, flows: Sequence[Flow], weights: Sequence[float], seed: int = 0,
            stop: Literal["first", "all"] = "first") -> Flow:
        """Interleave the outputs of several flows (each batched or not) with seeded weights."""
        if len(flows) != len(weights):
            raise FlowsError(f"mix got {len(flows)} flows but {len(weights)} weights")
        return cls(None, mixed=tuple(zip(flows, weights, strict=True)), mix_seed=seed, mix_stop=stop)

    # ---- selection and order (index space: no sample is read) ------------------------------
    def _with(self, **changes: Any) -> Flow:
        return dataclasses.replace(self, **changes)

    def _source(self) -> Source:
        if self.source is None:
            raise FlowsError("this operation needs a flow with a source, not a mix")
        return self.source

    def select(self, indices: Sequence[int] | np.ndarray) -> Flow:
        """Keep the records at ``indices`` (a split, a fold)."""
        return self._with(source=Subset(self._source(), indices))

    def where(self, predicate: Callable[[Any], bool]) -> Flow:
        """Keep the records for which ``predicate(record)`` holds, before ordering (metadata only)."""
        source = self._source()
        return self.select([i for i in range(len(source)) if predicate(source[i])])

    def split(self, fractions: Sequence[float], seed: int = 0) -> list[Flow]:
        """Seeded random split, e.g. ``train, test = flow.split([0.8, 0.2])``."""
        return [self.select(part) for part in splits(len(self._source()), fractions, seed)]

    def shuffle(self, seed: int = 0, window: int = 4) -> Flow:
        """Reshuffle every epoch as a pure function of (seed, epoch). For Parquet tables the
        shuffle is block-wise: row groups, then rows within ``window`` row groups."""
        return self._with(order=Order(seed, window))

    # ---- per-sample stages -------------------------------------------------------------------
    def map(self, fn: Callable, field: str | None = None, to: str | None = None,
            name: str | None = None) -> Flow:
        """Apply ``fn`` to each item (or to ``item[field]``); any callable or nn.Module."""
        stage = fn if field is None and to is None and name is None else Map(fn, field, to, name)
        return self._with(stages=(*self.stages, stage))

    def filter(self, predicate: Callable[[Any], bool], name: str | None = None) -> Flow:
        """Drop items for which ``predicate`` is false (counted in ``loader.filtered``)."""
        return self.map(Filter(predicate, name))

    def read(self, field: str = "path", retries: int = 5, cache_dir: str | None = None) -> Flow:
        """Read each item's ``path`` (any fsspec URL) into ``bytes``, retrying transient errors;
        ``cache_dir`` keeps a local copy of remote files for later epochs."""
        return self.map(ReadBytes(field, self.storage_options, retries, cache_dir))

    def decode_audio(self, field: str = "bytes", start: str | None = None, end: str | None = None,
                     duration: str | None = None,
                     unit: Literal["seconds", "frames"] = "seconds") -> Flow:
        """Decode audio bytes (after :meth:`read`: the file itself, by path for local files).

        ``start`` and ``end`` (or ``duration``) name record fields, e.g. an annotation table's
        columns, giving the part of the file to use in ``unit`` seconds or frames: only that part
        is read (remote files by range requests). Non-finite samples and truncated WAV files are
        errors of this stage."""
        decode = audio.DecodeAudio(field, start, end, duration, unit)
        before = self.stages
        if field == "bytes" and before and isinstance(before[-1], ReadBytes):
            before = (*before[:-1], before[-1].referring("all" if decode.segmented else "local"))
        return self._with(stages=(*before, decode))

    def decode_tensor(self, field: str = "bytes", to: str = "tensor") -> Flow:
        return self.map(DecodeTensor(field, to))

    def downmix(self) -> Flow:
        return self.map(audio.Downmix())

    def resample(self, rate: int, backend: Literal["soxr", "torchaudio"] = "soxr") -> Flow:
        return self.map(audio.Resample(rate, backend))

    def normalize(self, mode: Literal["peak", "standard"] = "peak") -> Flow:
        return self.map(audio.Normalize(mode))

    def pad(self, length: int) -> Flow:
        """Zero-pad or trim to exactly ``length`` frames (right after decode, downmix and
        resample: only the frames kept are read and resampled)."""
        return self._with(stages=(*audio.windowed(self.stages), audio.PadTrim(length)))

    def crop(self, length: int) -> Flow:
        """Random ``length``-frame window, seeded by (seed, epoch, sample key); right after
        decode, downmix and resample only the window is read and resampled."""
        return self._with(stages=(*audio.windowed(self.stages), audio.RandomCrop(length)))

    def cache(self, directory: str | os.PathLike[str], version: str = "") -> Flow:
        """Keep the output of the stages so far (deterministic ones: read, decode, downmix,
        resample, pad) in the local ``directory``: computed on the first pass, memory-mapped on
        later ones. Keyed by the record, its file's size and mtime and the stages' parameters;
        change ``version`` to invalidate by hand. Random stages (crop) go after it."""
        return self._with(stages=(Cached(self.stages, directory, self.storage_options, version),))

    # ---- batching -----------------------------------------------------------------------------
    def batch(self, size: int, drop_last: bool = False, variable: bool = False) -> Flow:
        """Batches of ``size`` per rank. ``variable=True`` pads audio to the longest in the
        batch and adds ``lengths`` and ``attention_mask``."""
        return self._with(plan=lambda world: FixedBatches(size * world, drop_last),
                          collate=Collate(variable))

    def stratify(self, label: str, size: int, drop_last: bool = False,
                 variable: bool = False) -> Flow:
        """Batches of ``size`` with about equal counts of each class of the record field ``label``."""
        return self._with(plan=lambda world: StratifiedBatches(size * world, label, drop_last),
                          collate=Collate(variable))

    def bucket(self, max_seconds: float, duration: str = "duration", pool: int = 512,
               variable: bool = True) -> Flow:
        """Batches of similar-length samples holding at most ``max_seconds`` of audio per rank;
        ``duration`` names the record field (a table column) giving each sample's seconds."""
        return self._with(
            plan=lambda world: DurationBuckets(max_seconds * world, duration, pool, min_size=world),
            collate=Collate(variable))

    # ---- placement ------------------------------------------------------------------------------
    def pin(self) -> Flow:
        """Pin batches in page-locked memory (when CUDA is available) for fast async copies."""
        return self._with(pin_memory=True)

    def to(self, device: str, transform: Callable | None = None) -> Flow:
        """Move batches to ``device`` and apply a batched ``transform`` there."""
        return self._with(device=device, device_transform=transform)

    # ---- execution --------------------------------------------------------------------------------
    def loader(self, num_workers: int = 0, method: Literal["thread", "process"] = "thread",
               prefetch: int = 2, on_error: OnError = "raise", rank: int | None = None,
               world_size: int | None = None, mp_context: str | None = None,
               stats: bool | Stats = False) -> Loader:
        """Build the node graph and wrap it in a :class:`~flows.loader.Loader`.

        ``num_workers`` threads or processes run the per-sample stages, in order, so the output
        does not depend on their number. ``rank``/``world_size`` default to torch.distributed's.
        ``prefetch`` batches are read ahead in one background thread (0: none; see
        :class:`~flows.nodes.prefetch.Prefetch`). ``on_error="skip"`` skips failing samples and counts
        them (``loader.skipped``). ``stats=True`` (or a :class:`~flows.stats.Stats`) times every
        node: ``loader.stats()``."""
        if rank is None or world_size is None:
            rank, world_size = distributed_position()
        collector = (stats if isinstance(stats, Stats) else Stats()) if stats else None
        root = self._build(num_workers, method, on_error, rank, world_size, mp_context)
        wrappers = 0
        if prefetch or (self.pin_memory and torch.cuda.is_available()):
            root, wrappers = Prefetch(root, prefetch, pin=self.pin_memory), wrappers + 1
        if self.device is not None:
            root, wrappers = ToDevice(root, self.device, self.device_transform), wrappers + 1
        return Loader(root, wrappers, stats=collector)

    def dataset(self, num_workers: int = 0, method: Literal["thread", "process"] = "thread",
                on_error: OnError = "raise", rank: int | None = None, world_size: int | None = None,
                mp_context: str | None = None) -> FlowDataset:
        """This flow as a ``torch.utils.data.IterableDataset`` with ``state_dict()`` /
        ``load_state_dict()``, for torch's ``DataLoader`` and torchdata's ``StatefulDataLoader``
        (see :mod:`flows.dataset`). The options are :meth:`loader`'s, for the stages run inside
        each DataLoader worker (or the main process)."""
        if self.device is not None:
            raise FlowsError("a flow moved to a device cannot be a DataLoader's dataset: drop .to() and "
                             "move batches in the training loop (or use flow.loader())")
        if rank is None or world_size is None:
            rank, world_size = distributed_position()
        flow = self._for_world(world_size)._with(pin_memory=False)  # the DataLoader pins
        return FlowDataset(functools.partial(flow.loader, num_workers, method, prefetch=0, on_error=on_error,
                                             rank=rank, world_size=world_size, mp_context=mp_context))

    def _for_world(self, world_size: int) -> Flow:
        """This flow with its plans made for ``world_size``: a flow that pickles (``batch()``
        makes its plans with a lambda)."""
        if self.mixed:
            return self._with(mixed=tuple((f._for_world(world_size), w) for f, w in self.mixed))
        return self if self.plan is None else self._with(plan=_Made(self.plan(world_size)))

    def _build(self, num_workers: int, method: Literal["thread", "process"], on_error: OnError,
               rank: int, world_size: int, mp_context: str | None) -> BaseNode:
        if self.mixed:
            children = [f._build(num_workers, method, on_error, rank, world_size, mp_context)
                        for f, _ in self.mixed]
            return Mix(children, [w for _, w in self.mixed], self.mix_seed, self.mix_stop)
        plan = self.plan(world_size) if self.plan else None
        sampler = Sampler(self._source(), self.order, plan, rank, world_size)
        batched = self.plan is not None
        apply = Apply(self.stages, self.order.seed or 0, self.collate, batched, on_error)
        return Gather(Workers(sampler, apply, num_workers, method, mp_context, batched), on_error)


@dataclass(frozen=True)
class _Made:
    """A plan factory that pickles: the plan already made for the world size."""

    plan: Plan

    def __call__(self, world_size: int) -> Plan:
        return self.plan
