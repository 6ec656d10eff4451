"""Saves that do not stop training: ``save(job, target, background=True)``.

The call is collective and short: rank 0 opens the new version (``begin``), every rank
copies its live local tensors into host memory (the *staging* copy: exactly this rank's
local state, model and optimizer, once) and the ranks agree on the non-tensor state (step,
RNG, data position) as of this moment; then the call returns and training goes on. A thread
per rank writes the staged copy through the writer (``write_rank``: a directory's rank
file, an object store's upload) and frees it. A writer that stages in its own medium
(:class:`~scalai.training.storage.StagingWriter`: the stores of the rank's own machine,
whose staging copy is the very files they adopt) does so instead of the host-memory
copy; its thread only finishes them (CRC-32s, adoption).

The commit needs every rank's record, and a background thread never calls a collective (it
would interleave with the training's own). So the version is committed by the next
collective call that sees it (:func:`finish`): the next ``save``, a ``load``, or
:func:`close`; there every rank waits for its own thread, the ranks agree on the outcome,
and rank 0 writes the manifest, or, if any rank's write failed, removes the version and
every rank raises the same :class:`~scalai.training.CollectiveError`: a failure is
reported at the next call, never lost.

At most one save is in flight per job. A new background save while one is in flight
either waits for it (``on_busy="wait"``, the default: it is finished first, as above) or,
with ``on_busy="skip"``, is skipped on every rank alike (logged) if any rank's write is
still running. Memory: one staging copy of this rank's local tensors at most, plus the
writer's own buffers (an object store's rank file while it uploads).

A loop that wants the commit as soon as the writes end, without waiting for them, calls
``finish(job, wait=False)`` at a point every rank reaches (after each step, as the elastic
runner's workers do): one small collective; it commits only when every rank's write has
ended, and otherwise returns ``None`` and leaves the save in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..checkpoint.manifest import Manifest
from ..layout.ptc import PTC
from ..storage.arrays import as_raw
from .report import SaveReport
from .collective import CollectiveError, agree
from .job import JobState
from .nontensor import capture, rank_snapshot
from .storage import StagingWriter

__all__ = ["start", "finish", "close", "in_flight", "Committed", "ON_BUSY"]

log = logging.getLogger("scalai.training")

#: What a background save does while another is in flight.
ON_BUSY = ("wait", "skip")
_ATTR = "_scalai_background_save"


@dataclass
class _InFlight:
    """One background save of one rank."""

    writer: Any
    token: str
    step: int
    ptc: PTC
    state: dict | None          # rank 0: the non-tensor state as of the call
    staged_bytes: int
    created_by: str
    started: float = 0.0
    thread: threading.Thread | None = None
    record: Any = None
    error: BaseException | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, rank: int, arrays: Any) -> None:
        t0 = time.perf_counter()
        try:
            self.record = self.writer.write_rank(self.token, rank, self.ptc, arrays)
        except BaseException as exc:  # noqa: BLE001 - kept for the next collective call
            self.error = exc
        finally:
            arrays.clear()  # the staging copy is freed as soon as it is written
            self.seconds["write"] = time.perf_counter() - t0


@dataclass(frozen=True)
class Committed:
    """A background save that :func:`finish` committed.

    Attributes:
        step: the step saved.
        token: the writer's token of the version (``begin``'s; a store writer's is
            ``"<version>@<owner>"``).
        total_bytes: bytes all ranks wrote (the sum of their rank records).
        started: ``time.time()`` when the save was called.
    """

    step: int
    token: str
    total_bytes: int
    started: float


def in_flight(job: JobState) -> bool:
    """Whether a background save of ``job`` is not finished yet (on this rank)."""
    return getattr(job, _ATTR, None) is not None


def start(job: JobState, writer: Any, created_by: str, on_busy: str = "wait"):
    """Stage this rank's tensors, agree on the state, and start writing in the background
    (see the module docstring). Collective. Returns a :class:`~scalai.training.SaveReport`
    with ``background=True`` (``skipped=True`` when skipped)."""

    if on_busy not in ON_BUSY:
        raise ValueError(f"on_busy={on_busy!r}; use one of {', '.join(ON_BUSY)}")
    t0, started = time.perf_counter(), time.time()
    current = getattr(job, _ATTR, None)
    if current is not None and on_busy == "skip":
        busy = agree("save: is the previous background save done", lambda: current.thread.is_alive(), job.group,
                     share=True)
        if any(busy):
            log.warning("step %d: background save skipped, the save of step %d is still being written",
                        job.step, current.step)
            return SaveReport(step=job.step, rank_bytes=0, total_bytes=0, seconds={"total": 0.0}, background=True,
                              skipped=True)
    finish(job)
    rank = job.rank
    token = agree("save: begin", lambda: writer.begin() if rank == 0 else None, job.group, share=True)[0]
    t1 = time.perf_counter()
    try:
        def stage() -> tuple[dict, int]:
            if isinstance(writer, StagingWriter):
                own = writer.stage_rank(token, rank, job.ptc, job.local_tensors())
                if own is not None:
                    staged[0] = own
                    return rank_snapshot(job), own.nbytes
            arrays = {name: np.array(as_raw(t, job.ptc.spec(name).dtype, name), copy=True)
                      for name, t in job.local_tensors().items()}
            staged[0] = arrays
            return rank_snapshot(job), sum(a.nbytes for a in arrays.values())

        staged: list[Any] = [{}]
        shared = agree("save: stage", stage, job.group, share=True)
        state = agree("save: state", lambda: capture(job, [s for s, _ in shared]) if rank == 0 else None, job.group)
    except CollectiveError:
        staged[0].clear()  # files staged in the writer's medium are deleted
        agree("save: abort", lambda: writer.abort(token) if rank == 0 else None, job.group)
        raise
    t2 = time.perf_counter()
    job_bytes = [n for _, n in shared]
    flight = _InFlight(writer, token, job.step, job.ptc, state, job_bytes[rank], created_by, started)
    flight.thread = threading.Thread(target=flight.run, args=(rank, staged[0]), name=f"scalai-save-{job.step}",
                                     daemon=True)
    setattr(job, _ATTR, flight)
    flight.thread.start()
    return SaveReport(step=job.step, rank_bytes=job_bytes[rank], total_bytes=sum(job_bytes),
                      seconds={"begin": t1 - t0, "stage": t2 - t1, "total": time.perf_counter() - t0},
                      background=True)


def finish(job: JobState, wait: bool = True) -> Committed | None:
    """Wait for the background save in flight (if any), then commit it (rank 0) or, if any
    rank's write failed, remove it and raise. Collective.

    Args:
        wait: ``False``: do not wait; if any rank's write is still running, return ``None``
            on every rank and leave the save in flight (one ``all_gather`` of a flag).

    Returns:
        what was committed, or ``None`` (nothing in flight, or still writing).

    Raises:
        CollectiveError: on every rank, naming the ranks whose write failed.
    """
    flight = getattr(job, _ATTR, None)
    if flight is None:
        return None
    if not wait and any(agree(f"save of step {flight.step}: is it written", flight.thread.is_alive, job.group,
                              share=True)):
        return None
    setattr(job, _ATTR, None)
    rank = job.rank

    def outcome():
        flight.thread.join()
        if flight.error is not None:
            raise flight.error
        return flight.record

    try:
        records = agree(f"save of step {flight.step} (written in the background)", outcome, job.group, share=True)
        agree(f"save of step {flight.step}: commit", lambda: flight.writer.commit(
            flight.token, Manifest(flight.ptc, tuple(records), flight.state, flight.created_by))
            if rank == 0 else None, job.group)
    except CollectiveError:
        agree("save: abort", lambda: flight.writer.abort(flight.token) if rank == 0 else None, job.group)
        raise
    return Committed(flight.step, flight.token, sum(r.nbytes for r in records), flight.started)


def close(job: JobState) -> Committed | None:
    """Finish the background save in flight, if any (call it before the job ends). Collective."""
    return finish(job)
