"""Checking a source's stored bytes against the CRC-32s it records, whatever its medium."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np

from ..dtypes import raw_numpy
from ..errors import ChecksumError
from ..planner.plan import Window
from ..regions import Region
from .base import ArraySource, AsyncRangeSource, RangeSource, TensorSource
from .blocks import split_window
from .checksum import checksums, crc32
from .run import default_workers

__all__ = ["verify_source"]


def _ranged_crc(source: TensorSource, part, rank: int, tensor: str) -> int:
    """CRC-32 of a whole local tensor read block by block from a ranged source."""
    shape = dict(source.ptc.rank_shards(rank))[tensor].shape
    dtype = raw_numpy(source.ptc.spec(tensor).dtype)
    whole = Window(Region.full(shape))
    crc = 0
    for window, _ in split_window(whole, whole, dtype.itemsize, part.block_bytes):
        buf = np.empty(window.shape, dtype)
        if isinstance(part, AsyncRangeSource):
            asyncio.run(part.read_into(rank, tensor, window, buf))
        else:
            part.read_into(rank, tensor, window, buf)
        crc = crc32(buf, crc)
    return crc


def verify_source(source: TensorSource, ranks: Iterable[int] | None = None, workers: int | None = None) -> None:
    """Recompute the CRC-32 of every tensor that the given ranks store (default: all) and
    compare it with the one the source records (tensors without a recorded CRC are skipped).

    Mapped and in-memory sources are checksummed in parallel chunks of their arrays;
    ranged sources (stores) are streamed, tensors in parallel.

    Raises:
        ChecksumError: naming the first tensor (rank order, then the source's order) whose
            bytes differ from the record.
    """
    ranks = list(range(source.ptc.config.world_size) if ranks is None else ranks)
    order, arrays, ranged = [], [], []
    for rank in ranks:
        part = source.part(rank)
        for name in source.stored(rank):
            if source.checksum(rank, name) is None:
                continue
            order.append((rank, name))
            if isinstance(part, ArraySource):
                arrays.append(((rank, name), part.array(rank, name)))
            else:
                ranged.append((rank, name, part))
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        crcs = checksums(arrays, pool)
        crcs.update(zip([(r, n) for r, n, _ in ranged],
                        pool.map(lambda job: _ranged_crc(source, job[2], job[0], job[1]), ranged)))
    for rank, name in order:
        want, got = source.checksum(rank, name), crcs[(rank, name)]
        if got != want:
            raise ChecksumError(f"checksum mismatch in {source.where(rank)}, tensor {name}: stored {want:08x}, "
                                f"computed {got:08x}; the data is corrupt: use an earlier checkpoint")
