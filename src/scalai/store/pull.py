"""Pull a committed version out of the stores into a checkpoint directory.

The identity plan from the stores (:class:`~scalai.store.training.StoreReader`, ranged
reads from whichever store holds each tensor) into the one checkpoint writer, run by
:func:`~scalai.storage.run_plan`; the stores' recorded CRC-32s are checked before the
checkpoint is committed.
"""

from __future__ import annotations

from typing import Callable

from ..errors import ChecksumError
from ..planner.identity import identity_plan
from ..storage.run import run_plan
from .cluster import StoreCluster, StoredVersion
from .errors import StoreRequestError
from .manifest import VersionManifest
from .training import StoreReader

__all__ = ["pull"]


def pull(cluster: StoreCluster, job: str, out_dir: str, version: str | None = None,
         progress: Callable[[int], None] | None = None, workers: int = 2, attempts: int = 3) -> StoredVersion:
    """Write a committed version (default: the latest) as a checkpoint at ``out_dir`` (a
    directory or a URL, :mod:`scalai.locations`).

    The identity plan from the stores into the location's sink (e.g. a :class:`~scalai.checkpoint.CheckpointWriter`),
    run by :func:`~scalai.storage.run_plan`: every tensor the checkpoint stores is read
    in ranged blocks from the store of the rank that holds it (``workers`` reads per
    store in flight), and its CRC-32, computed on the way, is checked against the one
    the store recorded before the checkpoint is committed. Without ``version``, a
    current version that another writer replaces (and deletes) while it is read is
    given up for the new current one, up to ``attempts`` times; nothing of the first
    is left behind.

    Raises:
        ChecksumError: a tensor's bytes do not match the store's record (nothing is written).
    """
    for attempt in range(attempts):
        src = cluster.latest(job, version)
        try:
            _pull(cluster, job, src, out_dir, progress, workers)
            return src
        except StoreRequestError as exc:
            if version is not None or exc.status != 404 or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _pull(cluster: StoreCluster, job: str, src: StoredVersion, out_dir: str, progress, workers: int) -> None:
    m = src.manifest
    full = m.ptc.full  # the checkpoint's layout; the stores may hold a replica once per host
    source = _stored_sources(m)
    from ..locations import create_sink

    with StoreReader(cluster, job, m.version) as reader, create_sink(out_dir, full, m.state) as writer:
        plan = identity_plan(full, range(full.config.world_size), stored=writer.stores,
                             source_rank=lambda r, n: source[(r, n)], placement=m.placement)
        run_plan(plan, reader, writer, workers=workers * len(m.hosts), progress=progress)
        for record in writer.finish():
            for tensor, t in record.tensors.items():
                stored = source[(record.rank, tensor)]
                want = reader.checksum(stored, tensor)
                if t.checksum is not None and want is not None and want != t.checksum:
                    raise ChecksumError(f"{tensor} of rank {stored} from {reader.where(stored)} does not "
                                        f"match the checksum the store recorded; its memory may be damaged")
        writer.commit()


def _stored_sources(m: VersionManifest) -> dict[tuple[int, str], int]:
    """``{(rank, tensor): the rank whose store entry holds it}`` for every local tensor of
    the version's layout: the rank itself, or (replicas kept once per host) the holder of
    the same replica on its host, else on another host."""
    full, out = m.ptc.full, {}
    for name in full.names:
        for every, stored in zip(full.holdings(name), m.ptc.holdings(name)):
            for r in every.ranks:
                same_host = [o for o in stored.ranks if m.placement.host(o) == m.placement.host(r)]
                out[(r, name)] = r if r in stored.ranks else (same_host or list(stored.ranks))[0]
    return out
