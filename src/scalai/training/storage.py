"""Where job state goes and comes from: the writer protocol of ``save`` and the sources of ``load``.

:func:`~scalai.training.load` reads any :class:`~scalai.storage.TensorSource` (a
checkpoint directory, ``memory://NAME``, the stores' :class:`~scalai.store.training.StoreReader`,
a PyTorch DCP directory)
and :func:`~scalai.training.save` writes through a :class:`StateWriter`: the collective
protocol of a save, which a backend implements on top of its sink. The directory backend
here writes the checkpoint format with :class:`~scalai.checkpoint.CheckpointWriter` (the
one writer of the format) from all ranks at once; the stores implement the same protocol.

Writing is a four-step collective protocol, driven by ``save``:

1. rank 0: ``token = writer.begin()`` (e.g. creates a staging directory); broadcast;
2. every rank: ``record = writer.write_rank(token, rank, ptc, arrays)`` writes its own
   local tensors and returns once they are durable, with their CRC-32s;
3. ``save`` gathers the records; only if every rank succeeded, rank 0 calls
   ``writer.commit(token, manifest)``, which makes the version visible atomically;
4. otherwise rank 0 calls ``writer.abort(token)``: nothing that looks complete remains.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np

from ..checkpoint import CheckpointWriter
from ..checkpoint.manifest import Manifest, RankRecord
from ..layout.ptc import PTC
from ..checkpoint.objects import ObjectSink, is_object_url
from ..locations import open_source
from ..planner.identity import identity_plan
from ..storage.base import TensorSource
from ..storage.live import ArraysSource
from ..storage.run import default_workers, run_plan

__all__ = ["StateWriter", "StagingWriter", "DirectoryWriter", "ObjectWriter", "as_writer", "as_source"]


@runtime_checkable
class StateWriter(Protocol):
    """Destination of one saved version of the job state (see the module docstring)."""

    def begin(self) -> str:
        """Rank 0: prepare a new, invisible version; return a token every rank passes on."""

    def write_rank(self, token: str, rank: int, ptc: PTC, arrays: Mapping[str, np.ndarray]) -> RankRecord:
        """Store ``rank``'s local tensors (raw arrays of the local shapes, every tensor of
        ``ptc.rank_shards(rank)``) durably; return what the manifest records for them."""

    def commit(self, token: str, manifest: Manifest) -> None:
        """Rank 0, after every rank wrote: make the version complete and visible, atomically."""

    def abort(self, token: str) -> None:
        """Rank 0, after a failure: remove whatever the version left behind."""


@runtime_checkable
class StagingWriter(StateWriter, Protocol):
    """A writer that can hold a background save's staging copy in its own medium (the
    stores: the files they will adopt), so that the bytes are copied once, not staged in
    host memory and then copied again."""

    def stage_rank(self, token: str, rank: int, ptc: PTC, arrays: Mapping[str, np.ndarray]) -> Any:
        """Every rank, while the step waits: copy what ``write_rank`` writes of ``arrays``
        (the live local tensors, torch or numpy) into the writer's medium; return the staged copy, which
        ``write_rank(token, rank, ptc, staged)`` then finishes in a thread and whose
        ``clear()`` deletes what was not written, or None where this rank cannot (then
        it stages in host memory)."""


class DirectoryWriter:
    """Write a checkpoint directory from every rank of a job (the shared-filesystem backend):
    each rank runs the identity plan from its live tensors into its own rank file.

    Args:
        out_dir: the checkpoint directory to create; must not exist.
        sync: fsync files and directories (turn off only for scratch data).
        workers: threads of each rank's writer.
    """

    def __init__(self, out_dir: str | os.PathLike, sync: bool = True, workers: int | None = None):
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.sync = sync
        self.workers = workers or default_workers()

    def begin(self) -> str:
        return CheckpointWriter.begin(self.out_dir)

    def write_rank(self, token: str, rank: int, ptc: PTC, arrays: Mapping[str, np.ndarray]) -> RankRecord:
        with CheckpointWriter(self.out_dir, ptc, sync=self.sync, staging=token) as writer:
            # Each replica is stored once, by the rank PTC.replica_owner names (manifest: stored_in).
            plan = identity_plan(ptc, [rank], stored=writer.stores)
            run_plan(plan, ArraysSource(ptc, {rank: arrays}), writer, workers=self.workers)
            (record,) = writer.finish([rank], self.workers)
        return record

    def commit(self, token: str, manifest: Manifest) -> None:
        CheckpointWriter.publish(self.out_dir, token, manifest, self.sync)

    def abort(self, token: str) -> None:
        CheckpointWriter.discard(self.out_dir, token)


class ObjectWriter:
    """Write a checkpoint at an fsspec URL (``s3://BUCKET/PREFIX``, ...) from every rank of a
    job: each rank uploads its own rank file (:class:`~scalai.checkpoint.objects.ObjectSink`,
    joined), rank 0 writes the manifest last. No filesystem is shared: only the object store.

    Args:
        url: where the checkpoint goes; must not hold a committed one.
        workers: threads of each rank's plan runner.
    """

    def __init__(self, url: str, workers: int | None = None):
        self.url = url
        self.workers = workers or default_workers()

    def begin(self) -> str:
        return ObjectSink.begin(self.url)

    def write_rank(self, token: str, rank: int, ptc: PTC, arrays: Mapping[str, np.ndarray]) -> RankRecord:
        with ObjectSink(token, ptc, joined=True) as sink:
            plan = identity_plan(ptc, [rank], stored=sink.stores)
            run_plan(plan, ArraysSource(ptc, {rank: arrays}), sink, workers=self.workers)
            (record,) = sink.finish([rank])
        return record

    def commit(self, token: str, manifest: Manifest) -> None:
        ObjectSink.publish(token, manifest)

    def abort(self, token: str) -> None:
        ObjectSink.discard(token)


def as_writer(target: Any) -> StateWriter:
    """A path becomes a :class:`DirectoryWriter`, an fsspec URL an :class:`ObjectWriter`; a
    :class:`StateWriter` passes through."""
    if is_object_url(target):
        return ObjectWriter(target)
    if isinstance(target, (str, os.PathLike)):
        return DirectoryWriter(target)
    if isinstance(target, StateWriter):
        return target
    raise TypeError(f"save target {target!r} is neither a directory path nor a StateWriter")


def as_source(source: Any) -> TensorSource:
    """A location (directory, ``memory://NAME``, fsspec URL) is opened; a PyTorch DCP directory
    (``.metadata``) with :func:`~scalai.interop.dcp.open_dcp`, its tensors under
    their own names; a :class:`TensorSource` passes through."""
    if isinstance(source, (str, os.PathLike)):
        from ..interop.dcp import is_dcp_directory, open_dcp

        if is_dcp_directory(source):
            return open_dcp(source)
        return open_source(source)
    if isinstance(source, TensorSource):
        return source
    raise TypeError(f"load source {source!r} is neither a checkpoint location nor a TensorSource")
