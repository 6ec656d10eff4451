"""Where job state goes and comes from: small writer/reader protocols and the directory backend.

:func:`~scalai.training.save` and :func:`~scalai.training.load` never touch paths
themselves; they talk to a :class:`StateWriter` or :class:`StateReader`. The directory
backend here writes the foundation's checkpoint format (one safetensors file per rank plus
``manifest.json``, see :mod:`scalai.checkpoint`) from all ranks at once; a per-host store
implements the same two protocols.

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
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

import numpy as np

from ..checkpoint import Checkpoint, default_workers
from ..checkpoint.checksum import checksums
from ..checkpoint.manifest import Manifest, RankRecord, TensorRecord, rank_file_name, write_manifest
from ..checkpoint.safetensors_io import SafetensorsWriter
from ..errors import CheckpointError, ChecksumError
from ..layout.ptc import PTC
from ..regions import Region

__all__ = ["StateWriter", "StateReader", "DirectoryWriter", "DirectoryReader", "as_writer", "as_reader"]


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
class StateReader(Protocol):
    """A committed version of the job state, opened for reading on one rank.

    Attributes:
        ptc: the layout the tensors were saved in.
        state: the non-tensor state saved with them (a JSON object).
    """

    ptc: PTC
    state: dict

    def view(self, rank: int, tensor: str, region: Region | None = None) -> np.ndarray:
        """Read-only raw array of ``tensor`` as stored by ``rank`` (or a region of it)."""

    def verify(self, ranks: Iterable[int]) -> None:
        """Check the stored bytes of the given saved ranks against their checksums."""

    def close(self) -> None:
        """Release files and connections."""

    # Optional: ``read_window(rank, tensor, window) -> array`` returning the elements a plan's
    # ``Window`` selects (shape ``window.shape``). ``load`` uses it when present, so that a
    # remote backend moves only the window's bytes instead of a whole tensor for ``view``.


class DirectoryWriter:
    """Write a checkpoint directory from every rank of a job (the shared-filesystem backend).

    Args:
        out_dir: the checkpoint directory to create; must not exist.
        sync: fsync files and directories (turn off only for scratch data).
        workers: threads for checksums of large tensors.
    """

    def __init__(self, out_dir: str | os.PathLike, sync: bool = True, workers: int | None = None):
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.sync = sync
        self.workers = workers or default_workers()

    def _staging(self, token: str) -> str:
        if not token or os.sep in token or not token.startswith("."):
            raise ValueError(f"bad staging token {token!r}")
        return os.path.join(os.path.dirname(self.out_dir), token)

    def begin(self) -> str:
        if os.path.lexists(self.out_dir):
            raise FileExistsError(f"checkpoint {self.out_dir} already exists; save into a new "
                                  f"directory (or remove the old one first)")
        parent, name = os.path.split(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        token = f".{name}.partial-{uuid.uuid4().hex[:12]}"
        os.mkdir(os.path.join(parent, token))
        return token

    def write_rank(self, token: str, rank: int, ptc: PTC, arrays: Mapping[str, np.ndarray]) -> RankRecord:
        staging = self._staging(token)
        if not os.path.isdir(staging):
            raise CheckpointError(f"staging directory {staging} is not visible from this rank; "
                                  f"a directory checkpoint needs a filesystem shared by all ranks")
        # Each replica is stored once, by the rank PTC.replica_owner names (manifest: stored_in).
        shards = [(name, shard) for name, shard in ptc.rank_shards(rank)
                  if ptc.replica_owner(name, rank) == rank]
        entries = [(name, ptc.spec(name).dtype, shard.shape) for name, shard in shards]
        meta = {"format": "pt", "scalai.rank": str(rank), "scalai.layout": str(ptc.config)}
        path = os.path.join(staging, rank_file_name(rank))
        writer = SafetensorsWriter(path, entries, meta)
        try:
            raws = []
            for name, shard in shards:
                raw = np.ascontiguousarray(arrays[name])
                if raw.shape != shard.shape:
                    raise ValueError(f"{name} of rank {rank} has shape {list(raw.shape)}, its local "
                                     f"shape under {ptc.config} is {list(shard.shape)}")
                writer.write(name, 0, raw)
                raws.append((name, raw))
            with ThreadPoolExecutor(self.workers) as pool:
                crcs = checksums(raws, pool)
            writer.finalize(self.sync)
        except BaseException:
            writer.abort()
            raise
        return RankRecord(rank, rank_file_name(rank), writer.size, {
            name: (TensorRecord(ptc.spec(name).dtype, shard.shape, crcs[name]) if name in crcs else
                   TensorRecord(ptc.spec(name).dtype, shard.shape, None, ptc.replica_owner(name, rank)))
            for name, shard in ptc.rank_shards(rank)})

    def commit(self, token: str, manifest: Manifest) -> None:
        staging = self._staging(token)
        write_manifest(staging, manifest, self.sync)
        if self.sync:
            _fsync_dir(staging)
        if os.path.lexists(self.out_dir):
            raise FileExistsError(f"{self.out_dir} appeared while saving; the new state is left "
                                  f"in {staging}")
        os.rename(staging, self.out_dir)
        if self.sync:
            _fsync_dir(os.path.dirname(self.out_dir))

    def abort(self, token: str) -> None:
        shutil.rmtree(self._staging(token), ignore_errors=True)


class DirectoryReader:
    """A checkpoint directory opened for :func:`~scalai.training.load` on one rank."""

    def __init__(self, checkpoint: Checkpoint, workers: int | None = None):
        self.checkpoint = checkpoint
        self.ptc: PTC = checkpoint.ptc
        self.state: dict = checkpoint.state
        self.workers = workers or default_workers()

    @classmethod
    def open(cls, directory: str | os.PathLike) -> DirectoryReader:
        """Open ``directory`` (manifest parsed strictly, every rank file present and sized)."""
        return cls(Checkpoint.open(directory))

    def view(self, rank: int, tensor: str, region: Region | None = None) -> np.ndarray:
        return self.checkpoint.view(rank, tensor, region)

    def verify(self, ranks: Iterable[int]) -> None:
        """Recompute the CRC-32 of every tensor of the given saved ranks.

        Raises:
            ChecksumError: naming the file and tensor whose bytes changed.
        """
        manifest = self.checkpoint.manifest
        jobs = [((r, name), self.checkpoint.view(r, name)) for r in ranks
                for name, t in manifest.ranks[r].tensors.items() if t.stored_in is None]
        with ThreadPoolExecutor(self.workers) as pool:
            crcs = checksums(jobs, pool)
        for (r, name), crc in sorted(crcs.items()):
            stored = manifest.ranks[r].tensors[name].checksum
            if crc != stored:
                path = os.path.join(self.checkpoint.directory, manifest.ranks[r].file)
                raise ChecksumError(f"checksum mismatch in {path}, tensor {name}: stored {stored:08x}, "
                                    f"computed {crc:08x}; the data is corrupt: use an earlier checkpoint")

    def close(self) -> None:
        self.checkpoint.close()


def as_writer(target: Any) -> StateWriter:
    """A path becomes a :class:`DirectoryWriter`; a :class:`StateWriter` passes through."""
    if isinstance(target, (str, os.PathLike)):
        return DirectoryWriter(target)
    if isinstance(target, StateWriter):
        return target
    raise TypeError(f"save target {target!r} is neither a directory path nor a StateWriter")


def as_reader(source: Any) -> StateReader:
    """A path is opened as a :class:`DirectoryReader`; a :class:`StateReader` passes through."""
    if isinstance(source, (str, os.PathLike)):
        return DirectoryReader.open(source)
    if isinstance(source, StateReader):
        return source
    raise TypeError(f"load source {source!r} is neither a checkpoint directory nor a StateReader")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

