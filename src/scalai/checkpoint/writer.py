"""Writing a checkpoint directory: rank files first, manifest last, directory renamed in place.

Everything is written into a staging directory ``.NAME.partial-<pid>`` next to the output;
:meth:`CheckpointWriter.commit` checksums and fsyncs the rank files, writes
``manifest.json`` atomically, then renames the staging directory to ``NAME``. A crash at
any point leaves at most a hidden ``.partial`` directory, never a directory that looks like
a checkpoint; the next writer into the same parent directory removes it once its writer
is provably gone (see :mod:`scalai.checkpoint.staging`).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Mapping

import numpy as np

from ..bounded import loads
from ..layout.ptc import PTC
from .arrays import as_raw
from .checksum import checksums, crc32_of_pieces
from .manifest import Manifest, RankRecord, TensorRecord, rank_file_name, write_manifest
from . import staging
from .limits import reserve_descriptors
from .safetensors_io import SafetensorsWriter, TensorEntry

__all__ = ["CheckpointWriter", "save_arrays", "default_workers"]


def default_workers() -> int:
    """Threads for copies and checksums: one per core, at most 8 (memory-bound beyond)."""
    return max(1, min(8, os.cpu_count() or 1))


def _created_by() -> str:
    try:
        return f"scalai {version('scalai')}"
    except PackageNotFoundError:
        return "scalai"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriter:
    """Write the checkpoint of ``ptc`` into ``out_dir`` (which must not exist yet).

    Rank files are created on first use with their full size reserved and zero-filled, so
    padding that nobody writes reads as zeros (:attr:`zero_filled`). Fill tensors through
    :meth:`view` (a writable raw memory-mapped array of the local shape) or :meth:`write`
    (``pwrite`` of contiguous bytes), from any number of threads on disjoint regions, then
    call :meth:`commit`. Leaving a ``with`` block without :meth:`commit` deletes everything.

    Args:
        out_dir: the checkpoint directory to create.
        ptc: the layout; rank ``r`` stores ``ptc.rank_shards(r)``.
        state: JSON-serializable non-tensor state (step, schedulers, RNG, data position).
        sync: fsync files and directories on commit (turn off only for scratch data).
        dedup: store each replica once, in the file of one rank holding it (see
            :meth:`stores`); the other holders' manifest entries point there.

    Raises:
        FileExistsError: ``out_dir`` exists (nothing is touched).
        ValueError: ``state`` is not JSON-serializable.
    """

    zero_filled = True

    def __init__(self, out_dir: str | os.PathLike, ptc: PTC, state: Mapping[str, Any] | None = None,
                 sync: bool = True, dedup: bool = True):
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.ptc = ptc
        self.sync = sync
        self.dedup = dedup
        try:  # exactly what a reader will accept (bounded depth, no NaN): refused now, not at load
            self.state = loads(json.dumps(dict(state or {}), allow_nan=False), "checkpoint state")
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"checkpoint state must be JSON-serializable ({exc}); store "
                             f"tensors as tensors and encode bytes (e.g. base64)") from None
        if os.path.lexists(self.out_dir):
            raise FileExistsError(f"output {self.out_dir} already exists; choose another "
                                  f"output directory or remove it first")
        self.staging = staging.create(self.out_dir)
        reserve_descriptors(ptc.config.world_size)
        self._files: dict[int, SafetensorsWriter] = {}
        self._pieces: dict[tuple[int, str], list[tuple[int, int, int]]] = {}
        self._mapped: set[tuple[int, str]] = set()
        self._declared: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()
        self._rank_locks: dict[int, threading.Lock] = {}
        self.committed = False
        self.timings: dict[str, float] = {}

    # -- filling ------------------------------------------------------------------------
    def file(self, rank: int) -> SafetensorsWriter:
        """The (lazily created) safetensors writer of ``rank``."""
        f = self._files.get(rank)
        if f is None:
            if not 0 <= rank < self.ptc.config.world_size:
                raise ValueError(f"rank {rank} is outside layout {self.ptc.config}")
            with self._lock:
                rank_lock = self._rank_locks.setdefault(rank, threading.Lock())
            with rank_lock:  # one file at a time per rank; other ranks' files in parallel
                f = self._files.get(rank)
                if f is None:
                    entries = [(n, self.ptc.spec(n).dtype, s.shape) for n, s in self.ptc.rank_shards(rank)
                               if self.stores(rank, n)]
                    meta = {"format": "pt", "scalai.rank": str(rank), "scalai.layout": str(self.ptc.config)}
                    f = self._files[rank] = SafetensorsWriter(
                        os.path.join(self.staging, rank_file_name(rank)), entries, meta)
        return f

    def stores(self, rank: int, tensor: str) -> bool:
        """Whether ``rank``'s file holds ``tensor`` (with ``dedup``, one rank of identical
        replicas does, ``PTC.replica_owner``; writing the others would repeat its bytes)."""
        return not self.dedup or self.ptc.replica_owner(tensor, rank) == rank

    def entry(self, rank: int, tensor: str) -> TensorEntry:
        """Dtype name, local shape and position of ``tensor`` in ``rank``'s file."""
        return self.file(rank).entry(tensor)

    def view(self, rank: int, tensor: str) -> np.ndarray:
        """Writable raw array (local shape) of ``tensor`` in ``rank``'s file.

        The tensor will be checksummed by reading it back at :meth:`commit`.
        """
        self._mapped.add((rank, tensor))
        return self.file(rank).view(tensor)

    def read_view(self, rank: int, tensor: str) -> np.ndarray:
        """The same array as :meth:`view`, for reading what was written (no checksum cost);
        a replica that ``rank`` does not store reads from the rank that does."""
        if not self.stores(rank, tensor):
            rank = self.ptc.replica_owner(tensor, rank)
        return self.file(rank).view(tensor)

    def write(self, rank: int, tensor: str, byte_offset: int, data, crc: int | None = None) -> None:
        """Write contiguous ``data`` at ``byte_offset`` of ``tensor`` in ``rank``'s file.

        ``crc``: ``zlib.crc32(data)`` if the caller has it; when the pieces written with a
        CRC tile the tensor (gaps are zeros), :meth:`commit` combines them instead of
        reading the tensor back.
        """
        self.file(rank).write(tensor, byte_offset, data)
        key = (rank, tensor)
        if crc is None:
            self._mapped.add(key)
        else:
            self._pieces.setdefault(key, []).append((byte_offset, memoryview(data).nbytes, crc))

    def tensor_complete(self, rank: int, tensor: str) -> None:
        """``tensor`` of ``rank`` is fully written: start writing it back to disk now, so
        that the fsync of :meth:`commit` overlaps with filling the other tensors."""
        if self.sync:
            self.file(rank).start_writeback(tensor)

    def declare_checksum(self, rank: int, tensor: str, crc: int) -> None:
        """State the CRC-32 that the whole tensor will have once written (e.g. a tensor
        copied unchanged from a checkpoint that records it); :meth:`commit` then records it
        without reading the tensor. A wrong claim is caught by :meth:`Checkpoint.verify`."""
        self._declared[(rank, tensor)] = crc

    # -- finishing ----------------------------------------------------------------------
    def commit(self, workers: int | None = None) -> None:
        """Checksum, fsync and rename everything into place; afterwards ``out_dir`` is complete.

        Times go to :attr:`timings` (seconds): ``checksum`` and ``sync`` (fsync + renames).
        """
        if self.committed:
            return
        ranks = range(self.ptc.config.world_size)
        files = [self.file(r) for r in ranks]
        with ThreadPoolExecutor(workers or default_workers()) as pool:
            t0 = time.perf_counter()
            crcs, unknown = {}, []
            for r in ranks:
                for n, e in files[r].entries.items():
                    crc = self._declared.get((r, n))
                    if crc is None and (r, n) not in self._mapped:
                        crc = crc32_of_pieces(self._pieces.get((r, n), []), e.nbytes)
                    if crc is None:
                        unknown.append(((r, n), files[r].view(n)))
                    else:
                        crcs[(r, n)] = crc
            crcs.update(checksums(unknown, pool))
            t1 = time.perf_counter()
            list(pool.map(lambda f: f.finalize(self.sync), files))
        records = tuple(
            RankRecord(r, rank_file_name(r), files[r].size, {
                n: (TensorRecord(self.ptc.spec(n).dtype, s.shape, crcs[(r, n)]) if self.stores(r, n) else
                    TensorRecord(self.ptc.spec(n).dtype, s.shape, None, self.ptc.replica_owner(n, r)))
                for n, s in self.ptc.rank_shards(r)})
            for r in ranks)
        write_manifest(self.staging, Manifest(self.ptc, records, self.state, _created_by()), self.sync)
        staging.release(self.staging)
        if self.sync:
            _fsync_dir(self.staging)
        if os.path.lexists(self.out_dir):
            raise FileExistsError(f"output {self.out_dir} appeared while writing; the new "
                                  f"checkpoint is left in {self.staging}")
        os.rename(self.staging, self.out_dir)
        if self.sync:
            _fsync_dir(os.path.dirname(self.out_dir))
        self.committed = True
        self.timings.update(checksum=t1 - t0, sync=time.perf_counter() - t1)

    def abort(self) -> None:
        """Delete the staging directory (no effect after :meth:`commit`)."""
        for f in self._files.values():
            f.abort()
        self._files.clear()
        if not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


def save_arrays(out_dir: str | os.PathLike, ptc: PTC, arrays: Mapping[int, Mapping[str, Any]],
                state: Mapping[str, Any] | None = None, sync: bool = True) -> None:
    """Save every rank's local tensors as a checkpoint of ``ptc``.

    Args:
        arrays: ``{rank: {tensor name: local array}}`` covering every rank and tensor of
            ``ptc.rank_shards``; each a torch tensor of the spec's dtype or a numpy array of
            that dtype (or its raw unsigned bits), with the local shape.

    Raises:
        ValueError: a rank or tensor is missing, or has the wrong shape or dtype.
    """
    with CheckpointWriter(out_dir, ptc, state, sync) as writer:
        for rank in range(ptc.config.world_size):
            given = arrays.get(rank, {})
            for name, shard in ptc.rank_shards(rank):
                if not writer.stores(rank, name):
                    continue
                if name not in given:
                    raise ValueError(f"no array for tensor {name} of rank {rank}; give every "
                                     f"tensor of ptc.rank_shards({rank})")
                raw = as_raw(given[name], ptc.spec(name).dtype, f"{name} of rank {rank}")
                if raw.shape != shard.shape:
                    raise ValueError(f"{name} of rank {rank} has shape {list(raw.shape)}, its "
                                     f"local shape under {ptc.config} is {list(shard.shape)}")
                raw = np.ascontiguousarray(raw)
                writer.write(rank, name, 0, raw, zlib.crc32(raw) if raw.size else 0)
        writer.commit()
