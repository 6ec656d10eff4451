"""``load``: fill the live, already-parallelized job from a saved state of any layout.

Collective (every rank calls it). Every rank, independently and identically:

1. opens the saved version (manifest parsed strictly; every rank file present);
2. checks its share of the saved bytes against their CRC-32s (saved rank ``s`` is
   checked by live rank ``s mod world``: one pass over the checkpoint, in parallel). From
   a :class:`~scalai.storage.StreamingSource` (an object store), the check happens during
   step 4 instead: each saved file is read whole, in a few large GETs, by the live rank
   that reads most of it (:func:`~scalai.storage.verify.assign_checks`), every tensor
   checked as its bytes pass, so that no byte is fetched twice for the check;
3. plans: ``make_plan(saved PTC, live PTC)`` (pure; the same plan on every rank) and
   keeps the copies into itself;
4. checks that its copies write every element of every live local tensor that holds
   part of a global tensor exactly once (padding never), then runs them with
   :func:`~scalai.storage.run_plan`: the saved source into the live tensors as a sink
   (:class:`~scalai.storage.ArraysSink`; memory-mapped reads touch only the bytes
   needed, a store reads only the windows);
5. restores step, optimizer counters and hyperparameters, LR scheduler, data position
   and RNG (see :mod:`scalai.training.nontensor`).

A checkpoint that lacks a tensor (say, the optimizer state), holds other shapes, or a
plan that would leave anything unfilled or fill it twice, raises before any live tensor
is touched; a job can never silently continue from freshly initialized values. Each step
is agreed across ranks, so a failure on one rank raises the same error on every rank, and
none hangs.

A PyTorch DCP directory loads the same way (``load(job, DCP_DIR)``, or
``load(job, open_dcp(DIR, rules=...))`` for keys that are not the job's names): its chunks
are the saved layout, read in place. It holds no data position, RNG or scheduler state
scalai reads: the report's ``not_restored`` lists what stayed as the job had it. With
``weights_only=True`` only the parameters are loaded (a checkpoint without optimizer
state, e.g. to fine-tune); the optimizer and every non-tensor item stay as they are.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import Placement
from ..errors import PlanError, ScalaiError
from ..layout.ptc import PTC
from ..planner import Deployment, make_plan
from ..planner.plan import Copy, Plan
from ..storage.base import StreamingSource, TensorSource
from ..storage.live import ArraysSink
from ..storage.run import run_plan
from ..storage.verify import assign_checks, verify_source
from .collective import agree
from .job import JobState
from .nontensor import Restored, restore
from .storage import as_source

__all__ = ["load", "LoadReport", "FillError", "plan_load", "load_target"]


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
        restored: what was loaded: ``parameters``, ``optimizer moments`` (tensors), then
            the non-tensor items (``step``, ``optimizer.step``, ``lr_scheduler``, ``data``,
            ``rng``, ...; see :class:`~scalai.training.nontensor.Restored`).
        not_restored: item -> why it was left as the job had it (a DCP checkpoint holds no
            data position or RNG; ``weights_only``); ``unused tensors``: saved tensors the
            job does not hold, when the source allows that (``loads_subset``).
    """

    step: int
    saved_layout: str
    rng: str
    rank_bytes: int
    copies: int
    seconds: dict[str, float] = field(default_factory=dict)
    restored: tuple[str, ...] = ()
    not_restored: dict[str, str] = field(default_factory=dict)


def plan_load(saved: PTC, live: PTC, saved_placement: Placement | None = None,
              live_placement: Placement | None = None, subset: bool = False) -> Plan:
    """The plan from the saved layout to the live one; each copy reads a saved tensor
    directly (no ``from_new`` fan-out between live ranks, which would need another rank's
    memory).

    With both placements (the same host names), sources are chosen on the reading rank's
    own host first; without, every rank counts as on one host. ``subset``: the live layout
    may hold only some of the saved tensors.

    Raises:
        PlanError: the two describe different tensors (a missing optimizer state, other
            shapes or dtypes: another model or optimizer).
    """
    if saved_placement is None or live_placement is None:
        hosts = Placement(max(saved.config.world_size, live.config.world_size))
        return make_plan(Deployment(saved, hosts), Deployment(live, hosts), subset=subset)
    return make_plan(Deployment(saved, saved_placement), Deployment(live, live_placement), fanout=False,
                     subset=subset)


def load_target(job: JobState, saved: PTC, where: str, weights_only: bool = False) -> PTC:
    """The part of the job's PTC a load fills: all of it, or its parameters (``weights_only``).

    Raises:
        PlanError: the saved state holds the job's parameters but not its optimizer state
            (a checkpoint saved without it: say ``weights_only=True`` to load the weights).
    """
    if weights_only:
        return PTC(job.ptc.config, [s for s in job.ptc.specs if not s.is_optimizer_state], job.ptc.num_layers)
    names = set(saved.names)
    lacking = [s for s in job.ptc.specs if s.name not in names]
    if lacking and all(s.is_optimizer_state for s in lacking):
        s = lacking[0]
        raise PlanError(f"{where} holds no {s.name} (nor {len(lacking) - 1} more optimizer tensors) but the "
                        f"job has an optimizer; load(job, source, weights_only=True) loads the weights alone and "
                        f"leaves the optimizer as it is")
    return job.ptc


def _expected_cover(shard) -> np.ndarray:
    """uint8[local shape]: 1 where the local tensor holds global elements, 0 on padding."""
    out = np.zeros(shard.shape, np.uint8)
    for piece in shard.pieces:
        out[piece.local_region.to_slices()] = 1
    return out


def check_exactly_once(job: JobState, copies: list[Copy], target: PTC | None = None) -> None:
    """Every element of this rank's live tensors that holds global state is written by
    exactly one of ``copies`` (padding by none), and every copy reads a saved tensor.
    ``target``: the part of the job's PTC the copies fill (default: all of it).

    Raises:
        FillError: naming the first tensor that would be left unfilled or filled twice.
        PlanError: a copy reads another live rank's memory (a host fan-out).
    """
    by_tensor: dict[str, list[Copy]] = defaultdict(list)
    for c in copies:
        if c.from_new:
            raise PlanError(f"copy of {c.tensor} reads another live rank's memory; in-job load "
                            f"reads saved files only (plan with every rank on one host)")
        by_tensor[c.tensor].append(c)
    shards = dict((target or job.ptc).rank_shards(job.rank))
    unknown = set(by_tensor) - set(shards)
    if unknown:
        raise FillError(f"the plan writes {sorted(unknown)[:3]} which rank {job.rank} does not hold")
    for name, shard in shards.items():
        count = np.zeros(shard.shape, np.uint8)
        for c in by_tensor.get(name, ()):
            c.dst.select(count)[...] += 1
        expected = _expected_cover(shard)
        if not np.array_equal(count, expected):
            unfilled = int(np.count_nonzero((count == 0) & (expected == 1)))
            twice = int(np.count_nonzero(count > expected))
            raise FillError(f"{name} on rank {job.rank}: {unfilled} of {int(expected.sum())} "
                            f"elements not filled, {twice} filled more than once; the saved "
                            f"state does not cover this tensor exactly once")


def _fill(job: JobState, source: TensorSource, plan: Plan, target: PTC) -> int:
    """Run the plan's copies into this rank's live tensors of ``target``; bytes copied."""
    import torch

    copies = plan.copies_into(job.rank)
    check_exactly_once(job, copies, target)
    mine = Plan(plan.old, plan.new, tuple(copies), plan.stats)
    with torch.no_grad():
        live = job.local_tensors()
        sink = ArraysSink(target, {job.rank: {name: live[name] for name, _ in target.rank_shards(job.rank)}})
        report = run_plan(mine, source, sink)
        sink.commit()
    return report.bytes


def _checked_here(source: TensorSource, plan: Plan, rank: int, world: int) -> list[int]:
    """The saved files this live rank checks while it reads (from a
    :class:`~scalai.storage.StreamingSource`): :func:`~scalai.storage.verify.assign_checks`
    of the bytes each live rank reads from each file."""
    needed: dict[tuple[int, int], int] = defaultdict(int)
    for c in plan.copies:
        needed[(c.dst_rank, source.stored_in(c.src_rank, c.tensor))] += c.nbytes  # as the manifest records
    return assign_checks(needed, source.ptc.config.world_size, world)[rank]


def load(job: JobState, source: Any, *, verify: bool = True, placement: Placement | None = None,
         weights_only: bool = False) -> LoadReport:
    """Fill ``job`` in place from ``source`` (a checkpoint location or any ``TensorSource``).

    Args:
        job: the live job (from :func:`~scalai.training.describe`), in any layout.
        source: the saved state, in any layout of the same model and optimizer: a scalai
            checkpoint location, a PyTorch DCP directory (its keys the job's names, as
            ``get_state_dict`` gives them), or any ``TensorSource`` (for a DCP checkpoint
            under other names: :func:`scalai.interop.dcp.open_dcp` with its rules).
        verify: check every saved byte against its CRC-32 (split over the ranks; a DCP
            chunk against the CRC its archive records): first, or, from a
            :class:`~scalai.storage.StreamingSource` (an object store), while the copies read
            it (each saved file read whole by the rank that needs most of it; a mismatch
            then fails the load after live tensors were written).
        placement: the hosts the live ranks run on, when ``source`` knows where its ranks
            are (stores: a reader's ``placement``): ranks then read replicas from their
            own host's store.
        weights_only: load the parameters alone; the optimizer state, step, scheduler,
            data position and RNG stay as the job has them.

    Returns:
        A :class:`LoadReport`; ``job.step`` and ``job.data`` now hold the saved position.

    Raises:
        CollectiveError: on every rank, if any rank failed: a missing or damaged file, a
            checksum mismatch, a checkpoint of another model or without optimizer state,
            or an exactly-once violation (:class:`FillError`). After a failure past the
            planning phase the live tensors are partly overwritten: load another
            checkpoint or rebuild the job before training on.
    """
    from .background import finish

    finish(job)  # a background save in flight is committed (or its failure raised) first
    t0 = time.perf_counter()
    rank, size = job.rank, job.config.world_size
    opened: list[TensorSource] = []

    def open_source() -> TensorSource:
        reader = as_source(source)
        if reader is not source:
            opened.append(reader)
        return reader

    try:
        reader = agree("load: open the saved state", open_source, job.group)
        t1 = time.perf_counter()
        streamed = verify and isinstance(reader, StreamingSource)
        if verify and not streamed:
            saved_ranks = range(rank, reader.ptc.config.world_size, size)
            agree("load: verify checksums", lambda: verify_source(reader, saved_ranks), job.group)
        t2 = time.perf_counter()
        saved_place = reader.placement if placement is not None else None
        subset = weights_only or reader.loads_subset
        where = reader.where(0)

        def make() -> tuple[PTC, Plan]:
            target = load_target(job, reader.ptc, where, weights_only)
            if subset and not reader.loads_subset:  # weights only: the saved optimizer state stays behind
                extra = [n for n in reader.ptc.names if n not in target and not reader.ptc.spec(n).is_optimizer_state]
                if extra:
                    raise PlanError(f"{where} holds {len(extra)} parameters the job does not (e.g. {extra[0]}); "
                                    f"it is a checkpoint of another model")
            return target, plan_load(reader.ptc, target, saved_place, placement, subset)

        target, plan = agree("load: plan", make, job.group)
        copies = plan.copies_into(rank)
        if streamed:  # each saved file read whole, and so checked, by the rank that needs most of it
            checks = _checked_here(reader, plan, rank, size)
            reader.read_whole(checks, others_checked=True)
        t3 = time.perf_counter()
        copied = agree("load: copy into the live tensors", lambda: _fill(job, reader, plan, target), job.group)
        if streamed:  # what no read passed whole (a file this rank reads nothing of)
            agree("load: verify checksums", lambda: verify_source(reader, checks), job.group)
        t4 = time.perf_counter()
        if weights_only:
            done = Restored("none", (), {"state": "weights_only: step, optimizer state, scheduler, data position "
                                                  "and RNG are left as the job has them"})
        else:
            done = agree("load: restore step, optimizer, scheduler, data and RNG",
                         lambda: restore(job, reader.state), job.group)
        t5 = time.perf_counter()
    finally:
        for r in opened:
            r.close()
    loaded = ["parameters"] + (["optimizer moments"] if any(s.is_optimizer_state for s in target.specs) else [])
    left = dict(done.not_restored)
    unused = sorted(set(reader.ptc.names) - set(target.names))
    if unused:
        left["unused tensors"] = (f"{len(unused)} saved tensors the job does not hold ({', '.join(unused[:3])}"
                                  f"{', ...' if len(unused) > 3 else ''})")
    return LoadReport(step=job.step, saved_layout=str(reader.ptc.config), rng=done.rng, rank_bytes=copied,
                      copies=len(copies),
                      seconds={"open": t1 - t0, "verify": t2 - t1, "plan": t3 - t2, "copy": t4 - t3,
                               "restore": t5 - t4, "total": t5 - t0},
                      restored=tuple(loaded) + done.restored, not_restored=left)
