"""Checking a source's stored bytes against the CRC-32s it records, whatever its medium."""

from __future__ import annotations

import asyncio
import threading
from math import prod
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Collection, Iterable

import numpy as np

from ..dtypes import raw_numpy
from ..errors import ChecksumError
from ..planner.plan import Window
from ..regions import Region
from .base import ArraySource, AsyncRangeSource, RangeSource, StreamingSource, TensorSource
from .blocks import split_window
from .checksum import checksums, crc32
from .tasks import SMALL_FRACTION, default_workers

__all__ = ["verify_source", "assign_checks"]


def _ranged_crcs(source: TensorSource, part, rank: int, tensors: list[str]) -> list[int]:
    """CRC-32s of whole local tensors of ``rank`` read from a ranged source: one tensor
    block by block, or several small ones (packed by the caller) in one ``read_many``."""
    shapes = {n: shard.shape for n, shard in source.ptc.rank_shards(rank)}
    wholes = [(t, Window(Region.full(shapes[t])), raw_numpy(source.ptc.spec(t).dtype)) for t in tensors]
    if len(wholes) > 1:  # small tensors: what read_many fetches together
        bufs = [np.empty(w.shape, dtype) for _, w, dtype in wholes]
        part.read_many(rank, [(t, w, b) for (t, w, _), b in zip(wholes, bufs)])
        return [crc32(b) for b in bufs]
    (tensor, whole, dtype), = wholes
    crc = 0
    for window, _ in split_window(whole, whole, dtype.itemsize, part.block_bytes):
        buf = np.empty(window.shape, dtype)
        if isinstance(part, AsyncRangeSource):
            asyncio.run(part.read_into(rank, tensor, window, buf))
        else:
            part.read_into(rank, tensor, window, buf)
        crc = crc32(buf, crc)
    return [crc]


def _ranged_jobs(source: TensorSource, ranged: list[tuple[int, str, object]]) -> list[tuple[int, list[str], object]]:
    """``(rank, tensors, part)`` jobs: tensors of a coalescing ranged part of at most
    ``1 / SMALL_FRACTION`` of its ``block_bytes`` packed per rank up to ``block_bytes`` (as
    the runner packs its blocks); every other tensor alone."""
    jobs, packs, shapes = [], {}, {}
    for rank, name, part in ranged:
        if rank not in shapes:
            shapes[rank] = {n: shard.shape for n, shard in source.ptc.rank_shards(rank)}
        shape = shapes[rank][name]
        nbytes = prod(shape) * raw_numpy(source.ptc.spec(name).dtype).itemsize
        if not isinstance(part, RangeSource) or not part.coalesce or nbytes * SMALL_FRACTION > part.block_bytes:
            jobs.append((rank, [name], part))
            continue
        pack = packs.get((rank, id(part)))
        if pack is None or pack[3] + nbytes > part.block_bytes:
            pack = packs[(rank, id(part))] = [rank, [], part, 0]
            jobs.append(pack)
        pack[1].append(name)
        pack[3] += nbytes
    return [(j[0], j[1], j[2]) for j in jobs]


def verify_source(source: TensorSource, ranks: Iterable[int] | None = None, workers: int | None = None,
                  stop: threading.Event | None = None, skip: Collection[tuple[int, str]] = ()) -> None:
    """Recompute the CRC-32 of every tensor that the given ranks store (default: all) and
    compare it with the one the source records (tensors without a recorded CRC are skipped).

    Mapped and in-memory sources are checksummed in parallel chunks of their arrays;
    ranged sources (stores) are streamed, tensors in parallel; sources that ``stream``
    (object stores) check each rank's file in a few large reads, skipping the tensors
    that passed whole through earlier reads (:meth:`~scalai.storage.StreamingSource.check`).

    Args:
        stop: set from another thread to end the check early (a copy it ran alongside failed).
        skip: ``(rank, tensor)`` pairs checked elsewhere (a plan runner checks those whose
            bytes it reads whole as they pass).

    Raises:
        ChecksumError: naming the first tensor (rank order, then the source's order) whose
            bytes differ from the record.
        CancelledError: ``stop`` was set before the check ended.
    """
    ranks = list(range(source.ptc.config.world_size) if ranks is None else ranks)
    order, arrays, ranged, streamed = [], [], [], []
    for rank in ranks:
        part = source.part(rank)
        if isinstance(part, StreamingSource):
            streamed.append((rank, part))
            continue
        for name in source.stored(rank):
            if source.checksum(rank, name) is None or (rank, name) in skip:
                continue
            order.append((rank, name))
            if isinstance(part, ArraySource):
                arrays.append(((rank, name), part.array(rank, name)))
            else:
                ranged.append((rank, name, part))
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        def streamed_job(job) -> None:
            if stop is not None and stop.is_set():
                raise CancelledError("verification stopped")
            job[1].check(job[0])  # raises its own ChecksumError

        for _ in pool.map(streamed_job, streamed):
            pass
        crcs = checksums(arrays, pool, stop=stop)
        jobs = _ranged_jobs(source, ranged)

        def ranged_job(job) -> list[int]:
            if stop is not None and stop.is_set():
                raise CancelledError("verification stopped")
            return _ranged_crcs(source, job[2], job[0], job[1])

        for (rank, names, _), found in zip(jobs, pool.map(ranged_job, jobs)):
            crcs.update(zip([(rank, n) for n in names], found))
    for rank, name in order:
        want, got = source.checksum(rank, name), crcs[(rank, name)]
        if got != want:
            raise ChecksumError.mismatch(source.where(rank), name, want, got)


def assign_checks(needed: dict[tuple[int, int], int], files: int, readers: int) -> dict[int, list[int]]:
    """Which reader checks which stored file, when reading a file whole checks it on the way
    (sources that ``stream``): each file goes to the reader that needs the most of it (so
    that reading it whole costs that reader the least extra), at most ``ceil(files /
    readers)`` files each; ties go to the lower reader. Pure: every rank computes the same.

    Args:
        needed: ``(reader, file) -> bytes`` the reader's plan reads from the file.
        files, readers: how many of each (files ``0..files-1``, readers ``0..readers-1``).

    Returns:
        reader -> the files it checks (every file exactly once).
    """
    cap = -(-files // readers)
    best = sorted(range(files), key=lambda f: (-max((needed.get((r, f), 0) for r in range(readers)), default=0), f))
    out: dict[int, list[int]] = {r: [] for r in range(readers)}
    for f in best:
        free = [r for r in range(readers) if len(out[r]) < cap]
        r = max(free, key=lambda r: (needed.get((r, f), 0), -len(out[r]), -r))
        out[r].append(f)
    return out
