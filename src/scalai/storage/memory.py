"""``memory://NAME``: checkpoints held as arrays in this process's memory.

A second backend of the checkpoint model beside directories, with the same semantics:
each replica stored once (by the rank :meth:`PTC.replica_owner` names), a CRC-32 per
stored tensor, the non-tensor state, and an atomic commit (a name appears complete or
not at all, and a committed checkpoint never changes: its arrays are read-only). Useful
for tests, benchmarks and pipelines that reshard in memory; gone when the process ends.

    sink = MemorySink("a", ptc, state)        # memory://a
    run_plan(plan, source, sink); sink.commit()
    with MemorySource("a") as ckpt: ...
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

from ..dtypes import raw_numpy
from ..errors import CheckpointError
from ..layout.ptc import PTC
from .base import ArraySink, ArraySource, copy_bytes
from .checksum import ChecksumLedger, crc32

__all__ = ["MemorySource", "MemorySink", "MemoryCheckpoint", "memory_checkpoints", "delete_memory_checkpoint",
           "SCHEME"]

SCHEME = "memory://"


@dataclass(frozen=True)
class MemoryCheckpoint:
    """A committed in-memory checkpoint: its layout, state, and each stored tensor's raw
    array (read-only) and CRC-32, keyed by (rank, tensor) of the rank that stores it."""

    name: str
    ptc: PTC
    state: dict
    arrays: Mapping[tuple[int, str], np.ndarray]
    checksums: Mapping[tuple[int, str], int]


_COMMITTED: dict[str, MemoryCheckpoint] = {}
_LOCK = threading.Lock()


def _check_name(name: str) -> str:
    if name.startswith(SCHEME):
        name = name[len(SCHEME):]
    if not name or any(ch.isspace() for ch in name):
        raise ValueError(f"memory checkpoint name {name!r} is empty or has spaces; use e.g. memory://job-step-10")
    return name


def memory_checkpoints() -> list[str]:
    """Names of the committed in-memory checkpoints."""
    with _LOCK:
        return sorted(_COMMITTED)


def delete_memory_checkpoint(name: str) -> None:
    """Forget ``memory://name`` (its memory is freed once no reader holds its arrays)."""
    with _LOCK:
        _COMMITTED.pop(_check_name(name), None)


class MemorySource(ArraySource):
    """A committed in-memory checkpoint opened for reading (views of its arrays).

    Raises:
        CheckpointError: no checkpoint of that name was committed.
    """

    def __init__(self, name: str):
        name = _check_name(name)
        with _LOCK:
            ckpt = _COMMITTED.get(name)
        if ckpt is None:
            raise CheckpointError(f"there is no checkpoint {SCHEME}{name} in this process (in-memory "
                                  f"checkpoints live as long as the process that wrote them)")
        self.checkpoint = ckpt
        self.ptc: PTC = ckpt.ptc
        self.state: dict = ckpt.state

    def _owner(self, rank: int, tensor: str) -> int:
        return self.ptc.replica_owner(tensor, rank)

    def array(self, rank: int, tensor: str) -> np.ndarray:
        return self.checkpoint.arrays[(self._owner(rank, tensor), tensor)]

    def checksum(self, rank: int, tensor: str) -> int | None:
        return self.checkpoint.checksums[(self._owner(rank, tensor), tensor)]

    def stored(self, rank: int) -> list[str]:
        return [n for n, _ in self.ptc.rank_shards(rank) if self._owner(rank, n) == rank]

    def where(self, rank: int) -> str:
        return f"{SCHEME}{self.checkpoint.name}, rank {rank}"


class MemorySink(ArraySink):
    """A new in-memory checkpoint ``memory://name`` of layout ``ptc`` (each replica once).

    Zero-filled (arrays start as zeros) and records checksums; :meth:`commit` publishes it
    under its name.

    Raises:
        FileExistsError: a checkpoint of that name exists (at construction or commit).
    """

    def __init__(self, name: str, ptc: PTC, state: dict | None = None):
        self.name = _check_name(name)
        with _LOCK:
            if self.name in _COMMITTED:
                raise FileExistsError(f"{SCHEME}{self.name} already exists; choose another name or delete "
                                      f"it first")
        self.ptc = ptc
        self.state = dict(state or {})
        self._arrays: dict[tuple[int, str], np.ndarray] = {}
        self._shapes: dict[int, dict[str, tuple[int, ...]]] = {}
        self._ledger = ChecksumLedger()
        self._lock = threading.Lock()
        self.committed = False
        self.timings = {"checksum": 0.0, "sync": 0.0}

    def stores(self, rank: int, tensor: str) -> bool:
        return self.ptc.replica_owner(tensor, rank) == rank

    def _get(self, rank: int, tensor: str) -> np.ndarray:
        key = (rank, tensor)
        array = self._arrays.get(key)
        if array is None:
            with self._lock:
                array = self._arrays.get(key)
                if array is None:
                    if not self.stores(rank, tensor):
                        raise ValueError(f"{SCHEME}{self.name} stores {tensor} of rank {rank} in rank "
                                         f"{self.ptc.replica_owner(tensor, rank)}'s replica")
                    if rank not in self._shapes:
                        self._shapes[rank] = {n: s.shape for n, s in self.ptc.rank_shards(rank)}
                    shape = self._shapes[rank][tensor]
                    array = self._arrays[key] = np.zeros(shape, raw_numpy(self.ptc.spec(tensor).dtype))
        return array

    def prepare(self, ranks) -> None:
        for rank in ranks:
            for name, _ in self.ptc.rank_shards(rank):
                if self.stores(rank, name):
                    self._get(rank, name)

    def array(self, rank: int, tensor: str) -> np.ndarray:
        self._ledger.unknown((rank, tensor))
        return self._get(rank, tensor)

    def written(self, rank: int, tensor: str) -> np.ndarray:
        return self._get(self.ptc.replica_owner(tensor, rank), tensor)

    def write(self, rank: int, tensor: str, byte_offset: int, data, crc: int | None = None) -> None:
        copy_bytes(self._get(rank, tensor), byte_offset, data, f"{tensor} of rank {rank}")
        self._ledger.piece((rank, tensor), byte_offset, memoryview(data).nbytes, crc)

    def declare_checksum(self, rank: int, tensor: str, crc: int) -> None:
        self._ledger.declare((rank, tensor), crc)

    def commit(self) -> None:
        """Checksum what has no CRC yet, freeze the arrays and publish the checkpoint."""
        if self.committed:
            return
        for rank in range(self.ptc.config.world_size):
            for name, _ in self.ptc.rank_shards(rank):
                if self.stores(rank, name):
                    self._get(rank, name)
        t0 = time.perf_counter()
        checksums = {}
        for key, array in self._arrays.items():
            crc = self._ledger.known(key, array.nbytes)
            checksums[key] = crc if crc is not None else crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
            array.flags.writeable = False
        self.timings["checksum"] = time.perf_counter() - t0
        ckpt = MemoryCheckpoint(self.name, self.ptc.full, self.state, MappingProxyType(dict(self._arrays)),
                                MappingProxyType(checksums))
        with _LOCK:
            if self.name in _COMMITTED:
                raise FileExistsError(f"{SCHEME}{self.name} appeared while writing; nothing was replaced")
            _COMMITTED[self.name] = ckpt
        self.committed = True

    def abort(self) -> None:
        if not self.committed:
            self._arrays.clear()
