"""flows: composable, exactly resumable data pipelines for PyTorch, audio first.

This package is the pipeline: ``flow.py`` describes one and builds its graph of nodes
(``nodes/``, one per module) over sources (``sources/``), an order and batch plan
(``sampling/``), per-sample stages (``stages/``, reading through ``storage/``) run by worker
pools (``execution/``); ``loader.py`` iterates it and saves its position. The training side
built on it is :mod:`flows.training`, which this package never imports.
"""

from flows.errors import ColumnError, EmptySourceError, FlowsError, RemoteError, StageError
from flows.execution.apply import Apply
from flows.execution.threads import training_threads
from flows.flow import Flow
from flows.loader import Loader
from flows.nodes.gather import Gather
from flows.nodes.mix import Mix
from flows.nodes.prefetch import Prefetch
from flows.nodes.sampler import Envelope, Sampler
from flows.nodes.to_device import ToDevice
from flows.nodes.workers import Workers
from flows.ranks import distributed_position
from flows.sampling.order import Order, splits
from flows.sampling.plans import DurationBuckets, FixedBatches, Plan, StratifiedBatches
from flows.sources.base import Source, Subset
from flows.sources.files import AUDIO_EXTENSIONS, Files
from flows.sources.items import Columns, Items
from flows.sources.table import Table
from flows.stages.audio import DecodeAudio, Downmix, Normalize, PadTrim, RandomCrop, Resample
from flows.stages.base import Filter, Map, Stage
from flows.stages.cache import Cached
from flows.stages.collate import Collate
from flows.stages.read import ReadBytes
from flows.stages.tensor import DecodeTensor
from flows.stats import Report, Stats

__all__ = [
    "AUDIO_EXTENSIONS", "Apply", "Cached", "Collate", "ColumnError", "Columns", "DecodeAudio", "DecodeTensor",
    "Downmix", "DurationBuckets", "EmptySourceError", "Envelope", "Files", "Filter",
    "FixedBatches", "Flow", "FlowsError", "Gather", "Items", "Loader", "Map", "Mix", "Normalize",
    "Order", "PadTrim", "Plan", "Prefetch", "RandomCrop", "ReadBytes", "RemoteError", "Report", "Resample",
    "Sampler", "Source", "Stage", "StageError", "Stats", "StratifiedBatches", "Subset", "Table",
    "ToDevice", "Workers", "distributed_position", "splits", "training_threads",
]
