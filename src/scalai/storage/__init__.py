"""Where plans read and write: declared tensor sources and sinks, and the one plan runner.

:func:`run_plan` executes any :class:`~scalai.planner.Plan` from any :class:`TensorSource`
into any :class:`TensorSink`. Sources and sinks state what they can do in their types
(:mod:`scalai.storage.base`); the backends are one small class each: a checkpoint
directory (:class:`scalai.checkpoint.Checkpoint` / :class:`~scalai.checkpoint.CheckpointWriter`),
live tensors (:class:`ArraysSource` / :class:`ArraysSink`), ``memory://`` checkpoints
(:class:`MemorySource` / :class:`MemorySink`), a store's own tensors and its peers
(:mod:`scalai.store.sources`).
"""

from .base import (ArraySink, ArraySource, AsyncRangeSource, FileSink, FileSource, PackedFileSink, RangeSource,
                   StreamingSource, TensorSink, TensorSource)
from .live import ArraysSink, ArraysSource
from .memory import MemorySink, MemorySource
from .run import RunReport, default_workers, run_plan, run_plan_async

__all__ = [
    "TensorSource", "ArraySource", "FileSource", "RangeSource", "StreamingSource", "AsyncRangeSource",
    "TensorSink", "ArraySink", "FileSink", "PackedFileSink",
    "ArraysSource", "ArraysSink", "MemorySource", "MemorySink",
    "run_plan", "run_plan_async", "RunReport", "default_workers",
]
