"""Local reshard executor: run a :class:`~scalai.planner.Plan` on this host with threads.

``execute(plan, source, dest)`` streams every copy's source window into its destination
window. Sources and destinations are checkpoints (memory-mapped files) or in-memory
``{rank: {tensor: array}}`` mappings; no global tensor is ever built.

One task fills one destination tensor (of one rank) from all its copies; tasks run in
file order on a thread pool. :class:`~scalai.checkpoint.transfer.TensorFiller` picks how
(``pwrite`` streams, block assembly, or strided copies into the mapping) and passes the
CRC-32 of every block it writes to the checkpoint writer, so that the checksums of the new
checkpoint cost no second read. A tensor that moves unchanged keeps the CRC its source
checkpoint records and is not checksummed at all.

Memory bound: besides the kernel's page cache, the executor holds one
:data:`~scalai.checkpoint.transfer.CHUNK_BYTES` buffer (4 MiB) per worker; it never
allocates a tensor.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from math import prod
from typing import Any, Callable, Mapping

import numpy as np

from .checkpoint.arrays import as_raw
from .checkpoint.reader import Checkpoint
from .checkpoint import transfer
from .checkpoint.transfer import TensorFiller, window_span
from .checkpoint.writer import CheckpointWriter, default_workers
from .config import ParallelConfig, Placement
from .dtypes import raw_numpy
from .errors import PlanError
from .planner.plan import Copy, Deployment, Plan, Window
from .regions import Region
from .state import carry_state

__all__ = ["execute", "reshard_checkpoint", "ReshardTime"]


class _Arrays:
    """``{rank: {tensor: numpy array or torch tensor}}`` of a layout, seen as raw arrays."""

    def __init__(self, arrays: Mapping[int, Mapping[str, Any]], ptc, side: str):
        self._arrays, self._ptc, self._side = arrays, ptc, side
        self._shapes: dict[int, dict[str, tuple[int, ...]]] = {}

    def view(self, rank: int, tensor: str) -> np.ndarray:
        try:
            array = self._arrays[rank][tensor]
        except KeyError:
            raise ValueError(f"no {self._side} array for tensor {tensor} of rank {rank}; the "
                             f"mapping must hold every local tensor of ptc.rank_shards({rank})") from None
        if self._side == "destination" and str(getattr(array, "device", "cpu")) != "cpu":
            raise ValueError(f"destination {tensor} of rank {rank} is on {array.device}; give CPU "
                             f"tensors (copy them to the device afterwards)")
        raw = as_raw(array, self._ptc.spec(tensor).dtype, f"{tensor} of rank {rank}")
        shapes = self._shapes.get(rank)
        if shapes is None:
            shapes = self._shapes[rank] = {n: s.shape for n, s in self._ptc.rank_shards(rank)}
        if raw.shape != shapes.get(tensor):
            raise ValueError(f"{self._side} {tensor} of rank {rank} has shape {list(raw.shape)}, its "
                             f"local shape under {self._ptc.config} is {list(shapes.get(tensor, ()))}")
        return raw


def _side(obj, ptc, side: str):
    if isinstance(obj, Mapping):
        return _Arrays(obj, ptc, side)
    own = getattr(obj, "ptc", None)
    if own is not None and own.to_json() != ptc.to_json():
        raise ValueError(f"the {side} holds layout {own.config} of its tensors, the plan was made "
                         f"for {ptc.config} (or for other tensors); plan from the {side}'s own layout")
    return obj


def _check(plan: Plan) -> dict[tuple[int, str], int]:
    """Validate every copy against the layouts; return the covered volume per destination."""
    old = {r: dict(plan.old.ptc.rank_shards(r)) for r in plan.old.ptc.config.ranks()}
    new = {r: dict(plan.new.ptc.rank_shards(r)) for r in plan.new.ptc.config.ranks()}
    covered: dict[tuple[int, str], int] = defaultdict(int)
    for c in plan.copies:
        for window, shards, rank, side in ((c.src, new if c.from_new else old, c.src_rank, "source"),
                                           (c.dst, new, c.dst_rank, "destination")):
            shard = shards.get(rank, {}).get(c.tensor)
            region = window.region
            ok = shard is not None and region.ndim == len(shard.shape) and all(
                o + s <= n for o, s, n in zip(region.offsets, region.sizes, shard.shape))
            if ok and window.view is not None:
                ok = (prod(window.view) == region.volume and window.sub is not None
                      and all(o + s <= n for o, s, n in zip(window.sub.offsets, window.sub.sizes, window.view)))
            if not ok:
                raise PlanError(f"copy of {c.tensor}: {side} window {window} does not fit rank "
                                f"{rank}'s local tensor ({shard.shape if shard else 'absent'})")
        if c.src.shape != c.dst.shape:
            raise PlanError(f"copy of {c.tensor}: source shape {c.src.shape} != destination {c.dst.shape}")
        covered[(c.dst_rank, c.tensor)] += c.dst.volume
    return covered


def _select(window: Window, local: np.ndarray) -> np.ndarray:
    """``window.select(local)`` as a view, also for 0-d selections (where plain indexing
    with ``()`` would return a scalar copy)."""
    out = local[window.region.to_slices() + (Ellipsis,)]
    if window.view is not None:
        out = out.reshape(window.view)[window.sub.to_slices() + (Ellipsis,)]
    return out


class _Worker:
    """Writes destination tensors, one task per (destination rank, tensor); one per thread."""

    def __init__(self, source, dest, mixed: set, progress: Callable[[int], None]):
        self.source, self.dest, self.mixed = source, dest, mixed
        self.fast = hasattr(dest, "write") and hasattr(dest, "entry")
        self.carry = self.fast and hasattr(source, "checksum") and hasattr(dest, "declare_checksum")
        self.filler = TensorFiller(progress)
        self.read_new = getattr(dest, "read_view", dest.view)

    def run(self, rank: int, tensor: str, copies: list[Copy]) -> None:
        selected = []
        for c in copies:
            src = (self.read_new if c.from_new else self.source.view)(c.src_rank, c.tensor)
            selected.append((c, _select(c.src, src), src.shape))
        if self.fast:
            self._fill(rank, tensor, selected)
        else:
            self._mapped(rank, tensor, [(c, s) for c, s, _ in selected])

    def _fill(self, rank: int, tensor: str, selected: list) -> None:
        entry = self.dest.entry(rank, tensor)
        dtype = raw_numpy(entry.dtype)
        if any(s.itemsize != dtype.itemsize for _, s, _ in selected):
            raise PlanError(f"{tensor}: source and destination element sizes differ")
        write = partial(self.dest.write, rank, tensor)
        if len(selected) == 1 and self.carry:
            c, s, src_shape = selected[0]
            whole = Region.full(entry.shape)
            if (not c.from_new and src_shape == entry.shape and c.src.view is None
                    and c.dst.view is None and c.src.region == whole == c.dst.region):
                # the tensor moves unchanged: its CRC is the one the source records
                self.dest.declare_checksum(rank, tensor, self.source.checksum(c.src_rank, tensor))
                self.filler.stream(s, write, 0, checksum=False)
                return
        spans = [window_span(entry.shape, c.dst) for c, _, _ in selected]
        if None in spans and (rank, tensor) not in self.mixed and all(
                c.dst.view is None for c, _, _ in selected) and \
                prod(entry.shape[1:]) * dtype.itemsize <= transfer.CHUNK_BYTES:
            self.filler.assemble(entry.shape, dtype, [(c, s) for c, s, _ in selected], write)
            return
        strided = []
        for (c, s, _), span in zip(selected, spans):
            if span is None:
                strided.append((c, s))
            else:
                self.filler.stream(s, write, span * dtype.itemsize)
        if strided:
            self._mapped(rank, tensor, strided)

    def _mapped(self, rank: int, tensor: str, selected: list) -> None:
        local = self.dest.view(rank, tensor)
        for c, s in selected:
            d = _select(c.dst, local)
            if s.itemsize != d.itemsize:
                raise PlanError(f"{tensor}: source and destination element sizes differ")
            np.copyto(d, s)
            self.filler.progress(d.nbytes)


def execute(plan: Plan, source, dest, workers: int | None = None,
            progress: Callable[[int], None] | None = None) -> int:
    """Run every copy of ``plan`` from ``source`` (old layout) into ``dest`` (new layout).

    Args:
        plan: copies with windows in local coordinates (see :class:`~scalai.planner.Copy`).
        source: a :class:`~scalai.checkpoint.Checkpoint`, or ``{rank: {tensor: array}}``
            of the old layout (numpy or torch, local shapes).
        dest: a :class:`~scalai.checkpoint.CheckpointWriter`, or a mapping of writable
            arrays of the new layout. Destination elements that no copy writes (padding)
            end up zero.
        workers: threads (default: one per core, at most 8).
        progress: called with a byte count after each block written (<= 4 MiB), from
            worker threads, one call at a time.

    Returns:
        bytes copied.

    Raises:
        PlanError: a copy does not fit the layouts. Nothing is written in that case.
    """
    covered = _check(plan)
    source, dest = _side(source, plan.old.ptc, "source"), _side(dest, plan.new.ptc, "destination")
    if not getattr(dest, "zero_filled", False):
        for (rank, tensor), volume in covered.items():
            local = dest.view(rank, tensor)
            if volume < local.size:
                local[...] = 0
    stores = getattr(dest, "stores", None)
    tasks: dict[bool, dict[tuple[int, str], list[Copy]]] = {False: defaultdict(list), True: defaultdict(list)}
    for c in plan.copies:
        if stores is not None and not stores(c.dst_rank, c.tensor):
            raise PlanError(f"the plan copies {c.tensor} into rank {c.dst_rank}, whose replica the "
                            f"destination stores elsewhere; plan into ptc.stored_replicas()")
        if c.dst.volume:
            tasks[c.from_new][(c.dst_rank, c.tensor)].append(c)
    mixed = set(tasks[False]) & set(tasks[True])
    lock = threading.Lock()
    local = threading.local()

    def tick(nbytes: int) -> None:
        if progress is not None:
            with lock:
                progress(nbytes)

    # A tensor complete in the destination may be written back while others are filled.
    pending = defaultdict(int)
    for phase in tasks.values():
        for key in phase:
            pending[key] += 1
    complete = getattr(dest, "tensor_complete", None)

    def run(item: tuple[tuple[int, str], list[Copy]]) -> None:
        (rank, tensor), copies = item
        worker = getattr(local, "worker", None)
        if worker is None:
            worker = local.worker = _Worker(source, dest, mixed, tick)
        copies.sort(key=lambda c: c.dst.region.offsets)
        worker.run(rank, tensor, copies)
        with lock:
            pending[(rank, tensor)] -= 1
            done = pending[(rank, tensor)] == 0
        if done and complete is not None:
            complete(rank, tensor)

    file_order = {}
    for rank in {r for phase in tasks.values() for r, _ in phase}:
        file_order.update({(rank, n): i for i, (n, _) in enumerate(plan.new.ptc.rank_shards(rank))})
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        for phase in (False, True):  # from_new copies read what the first phase wrote
            # files front to back; several threads may share a file (they contend only
            # while pwrite copies into the page cache, not while gathering or checksumming)
            order = sorted(tasks[phase].items(), key=lambda kv: (kv[0][0], file_order[kv[0]]))
            list(pool.map(run, order))
    return sum(c.nbytes for phase in tasks.values() for copies in phase.values() for c in copies)


class ReshardTime(float):
    """Total seconds of a reshard, with its parts as attributes (seconds):
    ``plan``, ``copy`` (executing the plan), ``checksum`` and ``sync`` (fsync + renames)."""

    plan: float
    copy: float
    checksum: float
    sync: float

    def __new__(cls, **parts: float) -> ReshardTime:
        obj = super().__new__(cls, sum(parts.values()))
        obj.__dict__.update(parts)
        return obj

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v:.3f}" for k, v in self.__dict__.items())
        return f"ReshardTime({float(self):.3f}s: {parts})"


def reshard_checkpoint(src_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       new_config: ParallelConfig | str, placement: Placement | None = None,
                       workers: int | None = None, progress: Callable[[int], None] | None = None,
                       sync: bool = True) -> tuple[Plan, ReshardTime]:
    """Rewrite the checkpoint ``src_dir`` in layout ``new_config`` as ``out_dir``.

    Plans with :func:`~scalai.planner.make_plan`, runs :func:`execute` into a
    :class:`~scalai.checkpoint.CheckpointWriter` and commits; the non-tensor state goes
    through :func:`scalai.state.carry_state`. The source's checksums are not re-verified
    here (``Checkpoint.verify`` does that): bytes move as they are, and tensors that move
    unchanged keep their recorded CRC, so a damaged source stays detectable.

    Args:
        placement: where old and new ranks run (the same hosts); default: one host holding
            every rank, so that every copy is a local one.
        sync: fsync the new checkpoint (``ReshardTime.sync`` reports what that cost).

    Returns:
        the plan and the time it took (a float of seconds, with a breakdown).

    Raises:
        ValueError: ``new_config`` is not valid for the checkpoint's tensors; ``out_dir``
            lies inside ``src_dir`` or its filesystem cannot take the new checkpoint.
        FileExistsError: ``out_dir`` exists (nothing is touched).
        CheckpointError: the source is incomplete or damaged. The source is never modified.
    """
    from .planner import make_plan

    from .checkpoint.staging import check_output
    from .models.synth import stored_nbytes

    t0 = time.perf_counter()
    new_config = ParallelConfig.parse(new_config)
    if os.path.lexists(out_dir):
        raise FileExistsError(f"output {out_dir} already exists; choose another output directory "
                              f"or remove it first")
    with Checkpoint.open(src_dir) as ckpt:
        old_ptc = ckpt.ptc
        new_ptc = old_ptc.relayout(new_config)
        check_output(out_dir, stored_nbytes(new_ptc), f"the reshard to {new_config}", inputs=[src_dir])
        if placement is None:
            placement = Placement(gpus_per_host=max(old_ptc.config.world_size, new_config.world_size))
        # Into what the new checkpoint stores: each replica once (CheckpointWriter dedups).
        plan = make_plan(Deployment(old_ptc, placement), Deployment(new_ptc.stored_replicas(), placement))
        state = carry_state(ckpt.state, old_ptc.config, new_config)  # step, RNG rule, data
        t1 = time.perf_counter()
        with CheckpointWriter(out_dir, new_ptc, state, sync=sync) as writer:
            execute(plan, ckpt, writer, workers=workers, progress=progress)
            t2 = time.perf_counter()
            writer.commit(workers)
    return plan, ReshardTime(plan=t1 - t0, copy=t2 - t1, checksum=writer.timings["checksum"],
                             sync=writer.timings["sync"])
