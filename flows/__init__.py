"""flows: composable, exactly resumable data pipelines for PyTorch, audio first."""

from flows.audio import DecodeAudio, Downmix, Normalize, PadTrim, RandomCrop, Resample
from flows.batching import Collate
from flows.cache import Cached
from flows.errors import ColumnError, EmptySourceError, FlowsError, RemoteError, StageError
from flows.flow import Flow, distributed_position
from flows.loader import Loader
from flows.nodes import Apply, Gather, Mix, ToDevice, Workers, training_threads
from flows.prefetch import Prefetch
from flows.sampling import (
    DurationBuckets,
    Envelope,
    FixedBatches,
    Order,
    Plan,
    Sampler,
    StratifiedBatches,
    splits,
)
from flows.sources import AUDIO_EXTENSIONS, Columns, Files, Items, Source, Subset, Table
from flows.stages import DecodeTensor, Filter, Map, ReadBytes, Stage
from flows.stats import Report, Stats

__all__ = [
    "AUDIO_EXTENSIONS", "Apply", "Cached", "Collate", "ColumnError", "Columns", "DecodeAudio", "DecodeTensor",
    "Downmix", "DurationBuckets", "EmptySourceError", "Envelope", "Files", "Filter",
    "FixedBatches", "Flow", "FlowsError", "Gather", "Items", "Loader", "Map", "Mix", "Normalize",
    "Order", "PadTrim", "Plan", "Prefetch", "RandomCrop", "ReadBytes", "RemoteError", "Report", "Resample",
    "Sampler", "Source", "Stage", "StageError", "Stats", "StratifiedBatches", "Subset", "Table",
    "ToDevice", "Workers", "distributed_position", "splits", "training_threads",
]
