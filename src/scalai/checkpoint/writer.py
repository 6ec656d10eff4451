"""Writing a checkpoint directory: rank files first, manifest last, directory renamed in place.

The one writer of the format. Everything is written into a staging directory
``.NAME.partial-<pid>`` next to the output; :meth:`CheckpointWriter.commit` checksums and
fsyncs the rank files, writes ``manifest.json`` atomically, then renames the staging
directory to ``NAME``. A crash at any point leaves at most a hidden ``.partial`` directory,
never a directory that looks like a checkpoint; the next writer into the same parent
directory removes it once its writer is provably gone (see :mod:`scalai.checkpoint.staging`).

One process writes every rank (a reshard, a synthetic checkpoint)::

    with CheckpointWriter(out, ptc, state) as writer:
        run_plan(plan, source, writer)
        writer.commit()

or the ranks of a job write their own files into one staging directory (a training save
on a filesystem the ranks share)::

    token = CheckpointWriter.begin(out)                             # rank 0, shared
    with CheckpointWriter(out, ptc, staging=token) as writer:        # every rank
        run_plan(identity_plan(ptc, [rank]), live_tensors, writer)
        record, = writer.finish([rank])                             # durable; gathered
    CheckpointWriter.publish(out, token, Manifest(ptc, records, state))   # rank 0
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..bounded import loads
from ..layout.ptc import PTC
from ..storage.base import PackedFileSink
from ..storage.checksum import ChecksumLedger, checksums
from ..storage.run import default_workers
from .limits import reserve_descriptors
from .staging import create as create_staging, release as release_staging
from .manifest import Manifest, RankRecord, TensorRecord, rank_file_name, write_manifest
from .safetensors_io import SafetensorsWriter, TensorEntry

__all__ = ["CheckpointWriter", "save_arrays", "default_workers", "WRITEBACK_BYTES", "checked_state", "rank_record",
           "created_by"]

#: Tensors at least this large start their write-back as soon as they are complete.
WRITEBACK_BYTES = 1 << 20


def checked_state(state: Mapping[str, Any] | None) -> dict:
    """``state`` as a reader will read it back (bounded depth, no NaN): refused now, not at load.

    Raises:
        ValueError: it is not JSON-serializable.
    """
    try:
        return loads(json.dumps(dict(state or {}), allow_nan=False), "checkpoint state")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"checkpoint state must be JSON-serializable ({exc}); store "
                         f"tensors as tensors and encode bytes (e.g. base64)") from None


def rank_record(ptc: PTC, rank: int, nbytes: int, crcs: Mapping[str, int], stores) -> RankRecord:
    """The manifest record of ``rank``'s file of ``nbytes`` bytes: the CRC-32 of each tensor
    it holds (``crcs``), the owner of each replica it does not (``stores(rank, name)`` false)."""
    return RankRecord(rank, rank_file_name(rank), nbytes, {
        n: (TensorRecord(ptc.spec(n).dtype, s.shape, crcs[n]) if stores(rank, n) else
            TensorRecord(ptc.spec(n).dtype, s.shape, None, ptc.replica_owner(n, rank)))
        for n, s in ptc.rank_shards(rank)})


@functools.cache
def created_by() -> str:
    """``scalai VERSION`` for a manifest (the package's metadata, read once per process)."""
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


def _staging_path(out_dir: str, token: str) -> str:
    if not token or os.sep in token or not token.startswith(f".{os.path.basename(out_dir)}.partial-"):
        raise ValueError(f"bad staging token {token!r} for {out_dir}")
    return os.path.join(os.path.dirname(out_dir), token)


def _refuse_existing(out_dir: str) -> None:
    if os.path.lexists(out_dir):
        raise FileExistsError(f"output {out_dir} already exists; choose another output directory "
                              f"or remove it first")


class CheckpointWriter(PackedFileSink):
    """Write the checkpoint of ``ptc`` into ``out_dir`` (which must not exist yet): the
    :class:`~scalai.storage.TensorSink` of checkpoint directories.

    Rank files are created on first use (or by :meth:`prepare`) at their full size, sparse,
    so padding that nobody writes reads as zeros. Fill tensors
    through :meth:`write` (``pwrite`` of contiguous bytes) or :meth:`array` (a writable
    memory-mapped raw array of the local shape), from any number of threads on disjoint
    regions, then call :meth:`commit`. Leaving a ``with`` block without :meth:`commit`
    deletes everything this writer wrote.

    Args:
        out_dir: the checkpoint directory to create.
        ptc: the layout; rank ``r`` stores ``ptc.rank_shards(r)``.
        state: JSON-serializable non-tensor state (step, schedulers, RNG, data position).
        sync: fsync files and directories on commit (turn off only for scratch data).
        dedup: store each replica once, in the file of one rank holding it (see
            :meth:`stores`); the other holders' manifest entries point there.
        staging: join the staging directory another process began (:meth:`begin`'s token):
            this writer writes rank files only, :meth:`finish` returns their records, and
            whoever began it commits with :meth:`publish`.

    Raises:
        FileExistsError: ``out_dir`` exists (nothing is touched).
        ValueError: ``state`` is not JSON-serializable.
        CheckpointError: the joined staging directory is not visible here.
    """

    zero_filled = True
    records_checksums = True

    def __init__(self, out_dir: str | os.PathLike, ptc: PTC, state: Mapping[str, Any] | None = None,
                 sync: bool = True, dedup: bool = True, staging: str | None = None):
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.ptc = ptc
        self.sync = sync
        self.dedup = dedup
        self.state = checked_state(state)
        self.joined = staging is not None
        if self.joined:
            self.staging = _staging_path(self.out_dir, staging)
            if not os.path.isdir(self.staging):
                from ..errors import CheckpointError

                raise CheckpointError(f"staging directory {self.staging} is not visible from this process; "
                                      f"a checkpoint written by several ranks needs a filesystem they share")
        else:
            self.staging = _staging_path(self.out_dir, self.begin(self.out_dir))
        self._files: dict[int, SafetensorsWriter] = {}
        self._finished: dict[int, RankRecord] = {}
        self._ledger = ChecksumLedger()
        self._lock = threading.Lock()
        self._rank_locks: dict[int, threading.Lock] = {}
        self._shapes: dict[int, list] = {}
        self.committed = False
        self.timings: dict[str, float] = {"checksum": 0.0, "sync": 0.0}

    @staticmethod
    def begin(out_dir: str | os.PathLike) -> str:
        """Create the hidden staging directory of ``out_dir``; returns its name (a token
        that :class:`CheckpointWriter` joins with ``staging=`` and :meth:`publish` commits).

        Raises:
            FileExistsError: ``out_dir`` exists.
        """
        out_dir = os.path.abspath(os.fspath(out_dir))
        _refuse_existing(out_dir)
        return os.path.basename(create_staging(out_dir))

    # -- filling ------------------------------------------------------------------------
    def file(self, rank: int) -> SafetensorsWriter:
        """The (lazily created) safetensors writer of ``rank``."""
        f = self._files.get(rank)
        if f is None:
            if not 0 <= rank < self.ptc.config.world_size:
                raise ValueError(f"rank {rank} is outside layout {self.ptc.config}")
            with self._lock:
                rank_lock = self._rank_locks.setdefault(rank, threading.Lock())
                if not self._files:
                    reserve_descriptors(self.ptc.config.world_size)
            with rank_lock:  # one file at a time per rank; other ranks' files in parallel
                f = self._files.get(rank)
                if f is None:
                    entries = [(n, self.ptc.spec(n).dtype, s.shape) for n, s in self.ptc.rank_shards(rank)
                               if self.stores(rank, n)]
                    meta = {"format": "pt", "scalai.rank": str(rank), "scalai.layout": str(self.ptc.config)}
                    f = self._files[rank] = SafetensorsWriter(
                        os.path.join(self.staging, rank_file_name(rank)), entries, meta)
        return f

    def prepare(self, ranks: Iterable[int]) -> None:
        """Create the given ranks' files now (space reserved), several at a time."""
        ranks = [r for r in ranks if r not in self._files]
        if len(ranks) > 1:
            with ThreadPoolExecutor(min(len(ranks), default_workers())) as pool:
                list(pool.map(self.file, ranks))
        for r in ranks:
            self.file(r)

    def stores(self, rank: int, tensor: str) -> bool:
        """Whether ``rank``'s file holds ``tensor`` (with ``dedup``, one rank of identical
        replicas does, ``PTC.replica_owner``; writing the others would repeat its bytes)."""
        return not self.dedup or self.ptc.replica_owner(tensor, rank) == rank

    def entry(self, rank: int, tensor: str) -> TensorEntry:
        """Dtype name, local shape and position of ``tensor`` in ``rank``'s file."""
        return self.file(rank).entry(tensor)

    def array(self, rank: int, tensor: str) -> np.ndarray:
        """Writable raw array (local shape) of ``tensor`` in ``rank``'s file, memory-mapped.
        The tensor will be checksummed by reading it back at :meth:`commit`."""
        self._ledger.unknown((rank, tensor))
        return self.file(rank).view(tensor)

    def written(self, rank: int, tensor: str) -> np.ndarray:
        """The same array as :meth:`array`, for reading what was written (no checksum cost);
        a replica that ``rank`` does not store reads from the rank that does."""
        if not self.stores(rank, tensor):
            rank = self.ptc.replica_owner(tensor, rank)
        return self.file(rank).view(tensor)

    def write(self, rank: int, tensor: str, byte_offset: int, data, crc: int | None = None) -> None:
        """Write contiguous ``data`` at ``byte_offset`` of ``tensor`` in ``rank``'s file
        (``pwrite``). ``crc``: the CRC-32 of ``data`` if the caller has it; when the pieces
        written with a CRC tile the tensor (gaps are zeros), :meth:`commit` combines them
        instead of reading the tensor back."""
        self.file(rank).write(tensor, byte_offset, data)
        self._ledger.piece((rank, tensor), byte_offset, memoryview(data).nbytes, crc)

    def copy_from(self, rank: int, tensor: str, byte_offset: int, fd: int, offset: int, nbytes: int,
                  crc: int | None) -> bool:
        """Copy ``nbytes`` of file ``fd`` at ``offset`` into ``tensor`` of ``rank``'s file at
        ``byte_offset``, inside the kernel (``copy_file_range``); ``False`` where it cannot."""
        if not self.file(rank).copy_from(tensor, byte_offset, fd, offset, nbytes):
            return False
        self._ledger.piece((rank, tensor), byte_offset, nbytes, crc)
        return True

    def start_of(self, rank: int, tensor: str) -> int:
        """Byte offset of ``tensor`` in ``rank``'s file (tensors lie one after the other)."""
        return self.file(rank).entry(tensor).start

    def copy_tensors(self, rank: int, tensors: Sequence[tuple[str, int | None]], fd: int, offset: int) -> bool:
        """Copy whole tensors, consecutive in ``rank``'s file, from file ``fd`` at ``offset``
        in one kernel copy (``copy_file_range``); ``tensors``: ``(name, CRC-32 or None)``.
        ``False`` where the kernel cannot."""
        f = self.file(rank)
        if not f.copy_tensors([n for n, _ in tensors], fd, offset):
            return False
        for name, crc in tensors:
            self._ledger.piece((rank, name), 0, f.entry(name).nbytes, crc)
        return True

    def complete(self, rank: int, tensor: str) -> None:
        """``tensor`` of ``rank`` is fully written: start writing it back to disk now, so
        that the fsync of :meth:`commit` overlaps with filling the other tensors (tensors
        under :data:`WRITEBACK_BYTES` go with the file's fsync: a call each costs more)."""
        if self.sync:
            f = self.file(rank)
            if f.entry(tensor).nbytes >= WRITEBACK_BYTES:
                f.start_writeback(tensor)

    def declare_checksum(self, rank: int, tensor: str, crc: int) -> None:
        """State the CRC-32 that the whole tensor will have once written (e.g. a tensor
        copied unchanged from a checkpoint that records it); :meth:`commit` then records it
        without reading the tensor. A wrong claim is caught by :meth:`Checkpoint.verify`."""
        self._ledger.declare((rank, tensor), crc)

    # -- finishing ----------------------------------------------------------------------
    def finish(self, ranks: Iterable[int] | None = None, workers: int | None = None) -> list[RankRecord]:
        """Checksum, fsync and rename the given ranks' files (default: every rank) into the
        staging directory; returns their manifest records (in the order given).

        Times go to :attr:`timings` (seconds): ``checksum`` and ``sync`` (fsync + renames).
        """
        ranks = list(range(self.ptc.config.world_size) if ranks is None else ranks)
        todo = [r for r in ranks if r not in self._finished]
        files = {r: self.file(r) for r in todo}
        with ThreadPoolExecutor(workers or default_workers()) as pool:
            t0 = time.perf_counter()
            crcs, unknown = {}, []
            for r in todo:
                for n, e in files[r].entries.items():
                    crc = self._ledger.known((r, n), e.nbytes)
                    if crc is None:
                        unknown.append(((r, n), files[r].view(n)))
                    else:
                        crcs[(r, n)] = crc
            crcs.update(checksums(unknown, pool))
            t1 = time.perf_counter()
            list(pool.map(lambda f: f.finalize(self.sync), files.values()))
        by_rank: dict[int, dict[str, int]] = {r: {} for r in todo}
        for (r, n), crc in crcs.items():
            by_rank[r][n] = crc
        for r in todo:
            self._finished[r] = rank_record(self.ptc, r, files[r].size, by_rank[r], self.stores)
        self.timings["checksum"] += t1 - t0
        self.timings["sync"] += time.perf_counter() - t1
        return [self._finished[r] for r in ranks]

    def commit(self, workers: int | None = None) -> None:
        """Finish every rank, write the manifest and rename the directory into place;
        afterwards ``out_dir`` is complete (a writer that joined a staging directory
        cannot commit: whoever began it calls :meth:`publish`)."""
        if self.committed:
            return
        if self.joined:
            raise RuntimeError("this writer joined a staging directory begun elsewhere; call finish() "
                               "here and CheckpointWriter.publish() where it began")
        records = tuple(self.finish(None, workers))
        t0 = time.perf_counter()
        self.publish(self.out_dir, os.path.basename(self.staging),
                     Manifest(self.ptc, records, self.state, created_by()), self.sync)
        self.committed = True
        self.timings["sync"] += time.perf_counter() - t0

    @staticmethod
    def publish(out_dir: str | os.PathLike, token: str, manifest: Manifest, sync: bool = True) -> None:
        """Write ``manifest`` into the staging directory ``token`` and rename it to
        ``out_dir``: the checkpoint appears complete, atomically.

        Raises:
            FileExistsError: ``out_dir`` appeared meanwhile (the staging directory is left).
        """
        out_dir = os.path.abspath(os.fspath(out_dir))
        staging = _staging_path(out_dir, token)
        write_manifest(staging, manifest, sync)
        release_staging(staging)
        if sync:
            _fsync_dir(staging)
        if os.path.lexists(out_dir):
            raise FileExistsError(f"output {out_dir} appeared while writing; the new checkpoint is left "
                                  f"in {staging}")
        os.rename(staging, out_dir)
        if sync:
            _fsync_dir(os.path.dirname(out_dir))

    @staticmethod
    def discard(out_dir: str | os.PathLike, token: str) -> None:
        """Delete the staging directory ``token`` of ``out_dir`` and everything in it."""
        shutil.rmtree(_staging_path(os.path.abspath(os.fspath(out_dir)), token), ignore_errors=True)

    def abort(self) -> None:
        """Delete what this writer left unfinished, and the staging directory if it began
        it (no effect after :meth:`commit`; a joined writer's finished files stay for the
        commit, or for :meth:`discard` where the staging directory began)."""
        for f in self._files.values():
            f.abort()
        self._files.clear()
        if not self.committed and not self.joined:
            shutil.rmtree(self.staging, ignore_errors=True)


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
    from ..planner.identity import identity_plan
    from ..storage.live import ArraysSource
    from ..storage.run import run_plan

    with CheckpointWriter(out_dir, ptc, state, sync) as writer:
        plan = identity_plan(ptc, range(ptc.config.world_size), stored=writer.stores)
        run_plan(plan, ArraysSource(ptc, arrays), writer)
        writer.commit()
