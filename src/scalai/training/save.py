"""``save``: every rank writes its own local shards in parallel; rank 0 commits once all are durable.

Collective (every rank calls it at the same step). Three agreed phases:

1. ``begin``: rank 0 opens a new, invisible version (a staging directory) and shares its
   token;
2. ``write``: every rank writes the raw bytes of its live local tensors (no gather, no
   copy through another rank) with their CRC-32s, makes them durable, and shares the
   record plus its RNG state;
3. ``commit``: rank 0 writes the manifest (PTC, records, non-tensor state) and makes the
   version visible atomically.

A failure in any phase on any rank raises the same
:class:`~scalai.training.collective.CollectiveError` on every rank, after rank 0 has
removed the staging version; a reader never sees a partial save.
"""

from __future__ import annotations

import time
from typing import Any

from ..storage.arrays import as_raw
from ..checkpoint.manifest import Manifest
from ..checkpoint.writer import created_by
from .collective import CollectiveError, agree
from .job import JobState
from .nontensor import capture, rank_snapshot
from .report import SaveReport
from .storage import as_writer

__all__ = ["save", "SaveReport"]


def _created_by() -> str:
    return f"{created_by()} (training)"


def save(job: JobState, target: Any, background: bool = False, on_busy: str = "wait") -> SaveReport:
    """Save the job state into ``target`` (a new directory path, an fsspec URL such as
    ``s3://BUCKET/PREFIX``, or a ``StateWriter``).

    Args:
        background: return once this rank's tensors are copied into host memory and write
            them in a thread; the version is committed, or its failure raised, at the next
            ``save``, ``load`` or :func:`~scalai.training.close` (see
            :mod:`scalai.training.background`).
        on_busy: with ``background``, while the previous background save is still being
            written: ``"wait"`` for it, or ``"skip"`` this one (logged).

    Raises:
        CollectiveError: on every rank, if any rank failed (the message names the ranks
            and their errors: an existing directory, a full disk, a live tensor that no
            longer matches the layout...), including a background save's failure.
    """
    from . import background as bg

    writer = as_writer(target)
    if background:
        return bg.start(job, writer, _created_by(), on_busy)
    bg.finish(job)
    t0 = time.perf_counter()
    rank = job.rank
    tokens = agree("save: begin", lambda: writer.begin() if rank == 0 else None, job.group, share=True)
    token = tokens[0]
    t1 = time.perf_counter()

    def write() -> tuple[Any, dict, int]:
        arrays = {name: as_raw(t, job.ptc.spec(name).dtype, name) for name, t in job.local_tensors().items()}
        record = writer.write_rank(token, rank, job.ptc, arrays)
        written = sum(arrays[name].nbytes for name, t in record.tensors.items() if t.stored_in is None)
        return record, rank_snapshot(job), written

    try:
        written = agree("save: write shards", write, job.group, share=True)
        t2 = time.perf_counter()

        def commit() -> None:
            if rank == 0:
                state = capture(job, [w[1] for w in written])
                writer.commit(token, Manifest(job.ptc, tuple(w[0] for w in written), state, _created_by()))

        agree("save: commit", commit, job.group)
    except CollectiveError:
        # Agreed as well: when save raises on any rank, the staging version is gone.
        agree("save: abort", lambda: writer.abort(token) if rank == 0 else None, job.group)
        raise
    t3 = time.perf_counter()
    return SaveReport(step=job.step, rank_bytes=written[rank][2], total_bytes=sum(w[2] for w in written),
                      seconds={"begin": t1 - t0, "write": t2 - t1, "commit": t3 - t2, "total": t3 - t0})
