"""Reading a checkpoint directory: strict manifest, lazy memory-mapped rank files.

Opening reads only ``manifest.json`` and stats the rank files; a rank file is opened
(header parsed, file mapped) the first time one of its tensors is asked for, and views
load only the pages they touch. Nothing is ever written: files are opened read-only.
"""

from __future__ import annotations

import os
import stat
import threading
from typing import Any

import numpy as np

from ..bounded import file_kind
from ..dtypes import raw_numpy
from ..errors import CheckpointError, ChecksumError
from ..layout.ptc import PTC
from ..regions import Region
from ..storage.arrays import to_torch
from ..storage.base import FileSource
from ..storage.verify import verify_source
from .manifest import Manifest, read_manifest
from .limits import reserve_descriptors
from .safetensors_io import SafetensorsReader

__all__ = ["Checkpoint", "verify"]


class Checkpoint(FileSource):
    """An opened checkpoint directory (use :meth:`open`): the
    :class:`~scalai.storage.TensorSource` of checkpoint directories (reads are views of
    the memory-mapped rank files).

    Attributes:
        directory: the checkpoint directory.
        manifest: the parsed manifest.
        ptc: the layout the tensors are stored in.
        state: the non-tensor state saved with it (a JSON object).
    """

    def __init__(self, directory: str, manifest: Manifest):
        self.directory = directory
        self.manifest = manifest
        self.ptc: PTC = manifest.ptc
        self.state: dict[str, Any] = manifest.state
        self._files: dict[int, SafetensorsReader] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Checkpoint:
        """Open ``directory``; checks the manifest and that every rank file has its size.

        Raises:
            CheckpointError: no manifest (unfinished save), invalid manifest, or a rank
                file that is missing or has the wrong size.
        """
        directory = os.fspath(directory)
        manifest = read_manifest(directory)
        for record in manifest.ranks:
            path = os.path.join(directory, record.file)
            try:
                info = os.stat(path)
            except FileNotFoundError:
                raise CheckpointError(f"rank file {path} is missing; the checkpoint is damaged: "
                                      f"restore the file or use an earlier checkpoint") from None
            except OSError as exc:
                raise CheckpointError(f"rank file {path} cannot be read ({exc.strerror}); the checkpoint "
                                      f"is damaged: restore the file or use an earlier checkpoint") from None
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError(f"rank file {path} is {file_kind(info.st_mode)}, not a regular file; "
                                      f"the checkpoint is damaged: restore the file or use an earlier checkpoint")
            size = info.st_size
            if size != record.nbytes:
                raise CheckpointError(
                    f"rank file {path} has {size} bytes, the manifest says {record.nbytes}: it is "
                    f"truncated or was replaced; restore the file or use an earlier checkpoint")
        reserve_descriptors(len(manifest.ranks))
        return cls(directory, manifest)

    @property
    def config(self):
        return self.ptc.config

    def file(self, rank: int) -> SafetensorsReader:
        """The reader of ``rank``'s file, opened on first use and checked against the manifest."""
        f = self._files.get(rank)
        if f is None:
            with self._lock:
                f = self._files.get(rank)
                if f is None:
                    f = self._files[rank] = self._open_rank(rank)
        return f

    def _open_rank(self, rank: int) -> SafetensorsReader:
        if not 0 <= rank < len(self.manifest.ranks):
            raise ValueError(f"rank {rank} is outside layout {self.ptc.config}")
        record = self.manifest.ranks[rank]
        reader = SafetensorsReader(os.path.join(self.directory, record.file))
        if not record.holds(reader.entries):
            reader.close()
            raise CheckpointError(f"{reader.path} holds other tensors than the manifest lists; "
                                  f"the file was replaced: use an earlier checkpoint")
        return reader

    def stored_in(self, rank: int, tensor: str) -> int:
        """The rank whose file holds ``rank``'s ``tensor`` (itself, or the replica's owner)."""
        owner = self.manifest.ranks[rank].tensors[tensor].stored_in
        return rank if owner is None else owner

    def view(self, rank: int, tensor: str, region: Region | None = None) -> np.ndarray:
        """Read-only raw array (local shape) of ``tensor`` on ``rank``, or a region of it."""
        return self.file(self.stored_in(rank, tensor)).view(tensor, region)

    def array(self, rank: int, tensor: str) -> np.ndarray:
        """:meth:`view` of the whole local tensor (the source interface)."""
        return self.file(self.stored_in(rank, tensor)).view(tensor)

    def file_range(self, rank: int, tensor: str) -> tuple[int, int]:
        """``(descriptor, byte offset)`` of ``tensor`` on ``rank`` in the file that holds it."""
        f = self.file(self.stored_in(rank, tensor))
        return f.fileno(), f.entry(tensor).start

    def checksum(self, rank: int, tensor: str) -> int:
        """The CRC-32 that the manifest records for ``tensor`` on ``rank`` (or its replica)."""
        return self.manifest.ranks[self.stored_in(rank, tensor)].tensors[tensor].checksum

    def where(self, rank: int) -> str:
        return os.path.join(self.directory, self.manifest.ranks[rank].file)

    def stored(self, rank: int) -> list[str]:
        """The tensors ``rank``'s file holds (replicas stored elsewhere excluded)."""
        return [n for n, t in self.manifest.ranks[rank].tensors.items() if t.stored_in is None]

    def read(self, rank: int, tensor: str, region: Region | None = None):
        """A torch tensor (a copy, in the stored dtype) of a local tensor or a region of it."""
        return to_torch(self.view(rank, tensor, region), self.ptc.spec(tensor).dtype)

    def read_global(self, tensor: str, region: Region | None = None) -> np.ndarray:
        """Raw array of ``region`` (default: all) of the *global* tensor, from the shards
        that hold it. Reads only the stored pieces that intersect ``region``; the result has
        ``region.sizes`` elements, so ask for a region when the tensor is large."""
        spec = self.ptc.spec(tensor)
        region = region or Region.full(spec.shape)
        out = np.zeros(region.sizes, raw_numpy(spec.dtype))
        for holding in self.ptc.holdings(tensor):
            local = self.view(holding.ranks[0], tensor)
            for piece in holding.shard.pieces:
                cut = piece.global_region.intersect(region)
                if cut is None:
                    continue
                src = local[piece.local_region.to_slices()].reshape(piece.global_region.sizes)
                out[cut.relative_to(region).to_slices()] = src[cut.relative_to(piece.global_region).to_slices()]
        return out

    def verify(self, workers: int | None = None) -> None:
        """Recompute every checksum (all files, in parallel chunks).

        Raises:
            ChecksumError: naming the first tensor (rank order, then file order) whose bytes
                do not match the manifest.
            CheckpointError: a rank file is missing, truncated or unreadable.
        """
        verify_source(self, None, workers)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def verify(directory: str | os.PathLike, workers: int | None = None) -> None:
    """Open ``directory`` and check every checksum (see :meth:`Checkpoint.verify`)."""
    with Checkpoint.open(directory) as ckpt:
        ckpt.verify(workers)
