"""Resharding a checkpoint: plan from its layout to a new one, run the plan, commit.

``reshard_checkpoint(src, out, layout)`` (:class:`Reshard` opened, then run) reads the
checkpoint at ``src`` (a directory, ``memory://NAME`` or an fsspec URL, see
:mod:`scalai.locations`), plans with :func:`~scalai.planner.make_plan`, runs the plan with
:func:`~scalai.storage.run_plan` into a new checkpoint at ``out`` and commits it. No
global tensor is ever built; a tensor that moves unchanged keeps the CRC its source
records, every other block is checksummed while it is written, so the new checkpoint's
checksums cost no second read.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from .checkpoint.staging import check_output
from .config import ParallelConfig, Placement
from .locations import create_sink, exists, is_directory, open_source, shown
from .planner.plan import Deployment, Plan
from .state import carry_state
from .storage.run import RunReport, run_plan

__all__ = ["reshard_checkpoint", "Reshard", "ReshardTime"]


class ReshardTime(float):
    """Total seconds of a reshard, with its parts as attributes (seconds): ``plan``,
    ``copy`` (running the plan), ``verify`` (waiting, after the copy, for the check of the
    source tensors the copy did not check as they passed), ``checksum`` (reading back what
    has no CRC yet) and ``sync`` (fsync + renames). ``run`` is the runner's report: where ``copy`` went
    (read, copy, checksum, write, ... summed over its threads); ``checked``: the seconds
    the source's check took, overlapped with the copy (not a part of the total)."""

    __slots__ = ("run", "checked", "__dict__")  # the parts, and only they, are in __dict__

    plan: float
    copy: float
    verify: float
    checksum: float
    sync: float

    def __new__(cls, plan: float, copy: float, checksum: float, sync: float,
                run: RunReport | None = None, verify: float = 0.0, checked: float = 0.0) -> ReshardTime:
        obj = super().__new__(cls, plan + copy + verify + checksum + sync)
        obj.__dict__.update(plan=plan, copy=copy, verify=verify, checksum=checksum, sync=sync)
        obj.run = run
        obj.checked = checked
        return obj

    def __repr__(self) -> str:
        return (f"ReshardTime({float(self):.3f}s: plan={self.plan:.3f}, copy={self.copy:.3f}, "
                f"verify={self.verify:.3f}, checksum={self.checksum:.3f}, sync={self.sync:.3f})")


class Reshard:
    """One reshard, opened: the source is open, the output checked, the plan made, and
    nothing written yet; :meth:`run` copies and commits. Open it as a context manager
    (the source closes at its end); :func:`reshard_checkpoint` does both in one call.

    Args:
        src, out: checkpoint locations (directories, ``memory://NAME``, fsspec URLs).
        new_config: the new layout.
        placement: where old and new ranks run (the same hosts); default: one host holding
            every rank, so that every copy is a local one.

    Attributes:
        plan: the plan from the source's layout to ``new_config`` (into what the new
            checkpoint stores: each replica once).
        old, new: the source's layout and the new one (:class:`ParallelConfig`).
        total_bytes: bytes the new checkpoint stores (padding included, replicas once).

    Raises (when opened):
        ValueError: ``new_config`` is not valid for the checkpoint's tensors; a directory
            ``out`` lies inside ``src`` or its filesystem cannot take the new checkpoint.
        FileExistsError: ``out`` exists (nothing is touched).
        CheckpointError: the source is incomplete or damaged.
    """

    def __init__(self, src: str | os.PathLike, out: str | os.PathLike, new_config: ParallelConfig | str,
                 placement: Placement | None = None):
        from .planner import make_plan

        t0 = time.perf_counter()
        new_config = ParallelConfig.parse(new_config)
        if exists(out):
            raise FileExistsError(f"output {shown(out)} already exists; choose another location or remove it "
                                  f"first")
        self.out = out
        self.source = open_source(src)
        try:
            self.old, self.new = self.source.ptc.config, new_config
            self._new_ptc = self.source.ptc.relayout(new_config)
            stored = self._new_ptc.stored_replicas()  # what the new checkpoint holds: each replica once
            self.total_bytes = stored.total_nbytes()
            if is_directory(out):
                check_output(os.fspath(out), self.total_bytes, f"the reshard to {new_config}",
                             inputs=[os.fspath(src)] if is_directory(src) else [])
            if placement is None:
                placement = Placement(gpus_per_host=max(self.old.world_size, new_config.world_size))
            self.plan = make_plan(Deployment(self.source.ptc, placement),
                                  Deployment(stored, placement))
            self._state = carry_state(self.source.state, self.old, new_config)  # step, RNG rule, data
        except BaseException:
            self.source.close()
            raise
        self._open_seconds = time.perf_counter() - t0  # opening, checking, planning

    def __enter__(self) -> Reshard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.source.close()

    def run(self, workers: int | None = None, progress: Callable[[int], None] | None = None,
            sync: bool = True, verify: bool = False) -> ReshardTime:
        """Copy into a new checkpoint at ``out`` and commit it; its time (``plan``: opening).

        Args:
            workers: threads of the runner.
            progress: called with each block's byte count (``total_bytes`` in all).
            sync: fsync the new checkpoint (``ReshardTime.sync`` reports what that cost).
            verify: check the source's checksums during the copy, before the commit.

        Raises:
            ChecksumError: with ``verify``, the source's bytes differ from its record (the
                new checkpoint is deleted, nothing committed; the source is never modified).
        """
        t1 = time.perf_counter()
        with create_sink(self.out, self._new_ptc, self._state, sync=sync) as sink:
            # a mismatch found by the check raises here: the sink is aborted, nothing committed
            report = run_plan(self.plan, self.source, sink, workers=workers, progress=progress, verify=verify)
            t2 = time.perf_counter()
            sink.commit()
            t3 = time.perf_counter()
        checksum = sink.timings.get("checksum", 0.0)
        wait = report.seconds.get("verify_wait", 0.0)
        return ReshardTime(plan=self._open_seconds, copy=t2 - t1 - wait,
                           checksum=checksum, sync=t3 - t2 - checksum, run=report, verify=wait,
                           checked=report.seconds.get("verify", 0.0))


def reshard_checkpoint(src: str | os.PathLike, out: str | os.PathLike, new_config: ParallelConfig | str,
                       placement: Placement | None = None, workers: int | None = None,
                       progress: Callable[[int], None] | None = None,
                       sync: bool = True, verify: bool = False) -> tuple[Plan, ReshardTime]:
    """Rewrite the checkpoint ``src`` in layout ``new_config`` as ``out``: :class:`Reshard`
    opened and run.

    The non-tensor state goes through :func:`scalai.state.carry_state`. Bytes move as
    they are, and tensors that move unchanged keep the CRC their source records, so damage
    in them stays detectable (a tensor that is re-laid out gets the CRC of its bytes as
    written, damaged or not); with ``verify`` any damage is detected here: the source's
    CRC-32s are recomputed during the copy (``run_plan(verify=True)``: from the bytes as
    they pass where the copy reads a tensor whole, by a check alongside for the rest), and
    the new checkpoint is committed only once they all match (else it is deleted and
    :class:`ChecksumError` raised).

    Args:
        src, out, new_config, placement: see :class:`Reshard`.
        workers, progress, sync, verify: see :meth:`Reshard.run`.

    Returns:
        the plan and the time it took (a float of seconds, with a breakdown).

    Raises:
        ValueError, FileExistsError, CheckpointError: see :class:`Reshard`.
        ChecksumError: see :meth:`Reshard.run`.
    """
    with Reshard(src, out, new_config, placement) as job:
        return job.plan, job.run(workers, progress, sync, verify)
