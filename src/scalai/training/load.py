"""``load``: fill the live, already-parallelized job from a saved state of any layout.

Collective (every rank calls it). Every rank, independently and identically:

1. opens the saved version (manifest parsed strictly; every rank file present);
2. checks its share of the saved bytes against their CRC-32s (saved rank ``s`` is
   checked by live rank ``s mod world``: one pass over the checkpoint, in parallel);
3. plans: ``make_plan(saved PTC, live PTC)`` (pure; the same plan on every rank) and
   keeps the copies into itself;
4. copies each planned window of a saved local tensor straight into the window of its
   live local tensor (memory-mapped reads touch only the bytes needed), counting how
   often every live element is written;
5. restores step, optimizer counters and hyperparameters, LR scheduler, data position
   and RNG (see :mod:`scalai.training.nontensor`).

Step 4 ends with the exactly-once check: every element of every live local tensor that
holds part of the global tensor must have been written exactly once (padding never).
A checkpoint that lacks a tensor (say, the optimizer state), holds other shapes, or a
plan that would leave anything unfilled or fill it twice, raises; a job can never
silently continue from freshly initialized values. Each step is agreed across ranks, so
a failure on one rank raises the same error on every rank, and none hangs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..checkpoint.arrays import as_raw
from ..config import Placement
from ..errors import PlanError, ScalaiError
from ..layout.ptc import PTC
from ..planner import Deployment, make_plan
from ..planner.plan import Copy, Plan
from .collective import agree
from .job import JobState
from .nontensor import restore
from .storage import StateReader, as_reader

__all__ = ["load", "LoadReport", "FillError", "plan_load"]


class FillError(ScalaiError):
    """The saved state does not fill the live job exactly once."""


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load` did, as seen from one rank.

    Attributes:
        step: the step the job resumes after.
        saved_layout: the configuration the state was saved in.
        rng: ``"restore"`` (same degrees: generators restored), ``"seed"`` (re-seeded by
            the RNG rule) or ``"none"``.
        rank_bytes: bytes this rank copied into its live tensors.
        copies: number of planned copies into this rank.
        seconds: wall time per phase (``open``, ``verify``, ``plan``, ``copy``,
            ``restore``) and ``total``.
    """

    step: int
    saved_layout: str
    rng: str
    rank_bytes: int
    copies: int
    seconds: dict[str, float] = field(default_factory=dict)


def plan_load(saved: PTC, live: PTC, saved_placement: Placement | None = None,
              live_placement: Placement | None = None) -> Plan:
    """The plan from the saved layout to the live one; each copy reads a saved tensor
    directly (no ``from_new`` fan-out between live ranks, which would need another rank's
    memory).

    With both placements (the same host names), sources are chosen on the reading rank's
    own host first; without, every rank counts as on one host.

    Raises:
        PlanError: the two describe different tensors (a missing optimizer state, other
            shapes or dtypes: another model or optimizer).
    """
    if saved_placement is None or live_placement is None:
        hosts = Placement(max(saved.config.world_size, live.config.world_size))
        return make_plan(Deployment(saved, hosts), Deployment(live, hosts))
    return make_plan(Deployment(saved, saved_placement), Deployment(live, live_placement), fanout=False)


def _expected_cover(shard) -> np.ndarray:
    """uint8[local shape]: 1 where the local tensor holds global elements, 0 on padding."""
    out = np.zeros(shard.shape, np.uint8)
    for piece in shard.pieces:
        out[piece.local_region.to_slices()] = 1
    return out


def _select(window, array: np.ndarray) -> np.ndarray:
    out = window.select(array)
    assert out.size == 0 or np.may_share_memory(out, array), "window selection must be a view"
    return out


def _fill(job: JobState, reader: StateReader, copies: list[Copy]) -> int:
    """Copy the planned windows into this rank's live tensors; check exactly-once. Bytes copied."""
    import torch

    by_tensor: dict[str, list[Copy]] = defaultdict(list)
    for c in copies:
        if c.from_new:
            raise PlanError(f"copy of {c.tensor} reads another live rank's memory; in-job load "
                            f"reads saved files only (plan with every rank on one host)")
        by_tensor[c.tensor].append(c)
    live = job.local_tensors()
    shards = dict(job.ptc.rank_shards(job.rank))
    unknown = set(by_tensor) - set(live)
    if unknown:
        raise FillError(f"the plan writes {sorted(unknown)[:3]} which rank {job.rank} does not hold")
    read_window = getattr(reader, "read_window", None)
    copied = 0
    with torch.no_grad():
        for name, local in live.items():
            dtype = job.ptc.spec(name).dtype
            buffer = local if local.device.type == "cpu" else torch.empty(local.shape, dtype=local.dtype)
            raw = as_raw(buffer, dtype, name)
            count = np.zeros(raw.shape, np.uint8)
            for c in by_tensor.get(name, ()):
                target = _select(c.dst, raw)
                if read_window is not None:  # the backend reads just the window (a store)
                    np.copyto(target, np.asarray(read_window(c.src_rank, name, c.src)).reshape(target.shape))
                else:
                    np.copyto(target, _select(c.src, reader.view(c.src_rank, name)))
                _select(c.dst, count)[...] += 1
                copied += c.nbytes
            expected = _expected_cover(shards[name])
            if not np.array_equal(count, expected):
                unfilled = int(np.count_nonzero((count == 0) & (expected == 1)))
                twice = int(np.count_nonzero(count > expected))
                raise FillError(f"{name} on rank {job.rank}: {unfilled} of {int(expected.sum())} "
                                f"elements not filled, {twice} filled more than once; the saved "
                                f"state does not cover this tensor exactly once")
            if buffer is not local:
                local.copy_(buffer)
    return copied


def load(job: JobState, source: Any, *, verify: bool = True, placement: Placement | None = None) -> LoadReport:
    """Fill ``job`` in place from ``source`` (a checkpoint directory or a ``StateReader``).

    Args:
        job: the live job (from :func:`~scalai.training.describe`), in any layout.
        source: the saved state, in any layout of the same model and optimizer.
        verify: check every saved byte against its CRC-32 first (split over the ranks).
        placement: the hosts the live ranks run on, when ``source`` knows where its ranks
            are (stores: a reader's ``placement``): ranks then read replicas from their
            own host's store.

    Returns:
        A :class:`LoadReport`; ``job.step`` and ``job.data`` now hold the saved position.

    Raises:
        CollectiveError: on every rank, if any rank failed: a missing or damaged file, a
            checksum mismatch, a checkpoint of another model or without optimizer state,
            or an exactly-once violation (:class:`FillError`). After a failure past the
            planning phase the live tensors are partly overwritten: load another
            checkpoint or rebuild the job before training on.
    """
    t0 = time.perf_counter()
    rank, size = job.rank, job.config.world_size
    opened: list[StateReader] = []

    def open_source() -> StateReader:
        reader = as_reader(source)
        if reader is not source:
            opened.append(reader)
        return reader

    try:
        reader = agree("load: open the saved state", open_source, job.group)
        t1 = time.perf_counter()
        if verify:
            saved_ranks = range(rank, reader.ptc.config.world_size, size)
            agree("load: verify checksums", lambda: reader.verify(saved_ranks), job.group)
        t2 = time.perf_counter()
        saved_place = getattr(reader, "placement", None) if placement is not None else None
        plan = agree("load: plan", lambda: plan_load(reader.ptc, job.ptc, saved_place, placement), job.group)
        copies = plan.copies_into(rank)
        t3 = time.perf_counter()
        copied = agree("load: copy into the live tensors", lambda: _fill(job, reader, copies), job.group)
        t4 = time.perf_counter()
        action = agree("load: restore step, optimizer, scheduler, data and RNG",
                       lambda: restore(job, reader.state), job.group)
        t5 = time.perf_counter()
    finally:
        for r in opened:
            r.close()
    return LoadReport(step=job.step, saved_layout=str(reader.ptc.config), rng=action, rank_bytes=copied,
                      copies=len(copies),
                      seconds={"open": t1 - t0, "verify": t2 - t1, "plan": t3 - t2, "copy": t4 - t3,
                               "restore": t5 - t4, "total": t5 - t0})
