"""Reshard throughput: scalai against PyTorch DCP, consolidate-then-split and a memory copy.

One run prints one table measured in that run. For every transition (default: a TP, a PP
and a DP/ZeRO change of gpt2-small, ~1.8-2.5 GB of bf16 parameters, fp32 masters and Adam
moments per layout) it moves the same job state from the old layout to the new one with:

1. **scalai reshard**: ``scalai.executor.reshard_checkpoint``, checkpoint directory ->
   checkpoint directory (plan, copy, CRC-32 checksums, fsync + renames; parts reported).
   **scalai, RAM -> RAM** (an extra line): the same planner and executor between arrays in
   memory (old local tensors read into RAM, new ones pre-allocated and pre-faulted, as an
   in-memory store holds them; set up before each run, untimed, and freed after it, so the
   other methods do not run under its memory): scalai's copy engine without storage, to
   hold against (c).
2. **(a) PyTorch Distributed Checkpoint**: the state is saved with ``dcp.save`` in the old
   layout (setup, untimed). The timed step runs one process per *new* rank (gloo on CPU,
   started before timing; ``OMP_NUM_THREADS`` = cores / ranks): each builds its state dict
   of empty DTensors with the new shapes and placements and ``dcp.load`` reshards on load;
   for parity the loaded state is then saved with ``dcp.save`` in the new layout
   (``FileSystemWriter(thread_count=cores / ranks, sync_files=True)``). Reported: load, and
   load + save (wall time of the slowest rank: every phase ends on a barrier).
   DCP cannot express Megatron's layouts, so each tensor gets the nearest DTensor layout on
   a ``(dp, tp)`` device mesh: column-parallel, fused QKV, fused gate/up and vocabulary-
   parallel tensors are ``Shard(dim)`` on tp (plain contiguous chunks of the global tensor:
   no per-head-group QKV interleave, no vocabulary padding, uneven last chunk), row-parallel
   ``Shard(1)``, the rest ``Replicate``; ``Replicate`` on dp, except optimizer state under
   ZeRO-1, which is ``Shard(0)`` on dp (DCP has no flat buffer cut across replicas);
   pipeline parallelism is which ranks hold which names (tied embeddings on the first and
   last stage). DCP moves the same global tensors (minus vocabulary padding).
3. **(b) consolidate-then-split** (DeepSpeed's universal-checkpoint approach): read every
   shard, assemble each full global tensor in memory, write one consolidated file per
   tensor, then cut those into the new layout's rank files (same scalai file format, so the
   result is compared like scalai's). numpy copies and ``pwrite``, threads, no Python loops
   over elements. The format's CRC-32s are computed by reading the new files back at
   commit (DeepSpeed writes none): that part is shown separately.
4. **(c) memory copy**: ``np.copyto`` of the same number of bytes that scalai writes, RAM to
   RAM with the same thread count, between two pre-faulted 512 MiB buffers (copied round
   until the byte count is reached: far larger than any cache, so the rate is RAM's): the
   physical limit. **(c') file copy**: the old rank files' bytes copied with
   ``os.sendfile`` into one new file per new rank, as many bytes as scalai writes, then
   fsynced: what the storage does with no layout logic at all.

Storage: one scratch directory for every method, ``/dev/shm`` (tmpfs) when memory leaves
room for all the files plus what the run holds in RAM, else ``/tmp`` (``--workdir`` picks);
the run prints which. Every method fsyncs its output (scalai ``sync=True``, DCP
``sync_files=True``, fsync in (b) and (c')); scalai's fsync share is reported.
Throughput is the bytes of the new layout (every rank's local tensors, replicas and
padding included: what scalai writes) divided by the time, for every method alike. The
CPU column (user + system seconds of every thread, and of every rank for DCP) is steadier
than wall time on a machine that other jobs share.

Correctness is checked before timing: scalai's and (b)'s outputs compare equal
(``scalai.compare.compare_checkpoints``) to a checkpoint synthesized directly in the new
layout, the RAM -> RAM arrays equal its local tensors, and DCP's loaded tensors equal the
synthetic global values for a sample of tensors (whole local shards) and for the first and
last row of every tensor on every rank.

Repeats are interleaved (each round runs every method, in a rotated order) so that the
noise of a shared machine hits every method alike; the table shows the median, min and max.

Usage::

    .venv/bin/python benchmarks/reshard.py                        # defaults (3 rounds), 7-9 minutes on 2 cores
    .venv/bin/python benchmarks/reshard.py --model gpt-tiny --repeats 1   # smoke test
    .venv/bin/python benchmarks/reshard.py --transition "tp=2,pp=1,dp=1:tp=1,pp=2,dp=1"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Stats, choose_workdir, log, machine_description, print_table  # noqa: E402

from scalai.checkpoint import Checkpoint, CheckpointWriter, default_workers  # noqa: E402
from scalai.checkpoint.arrays import as_raw, to_torch  # noqa: E402
from scalai.compare import compare_checkpoints  # noqa: E402
from scalai.config import ParallelConfig  # noqa: E402
from scalai.dtypes import raw_numpy  # noqa: E402
from scalai.config import Placement  # noqa: E402
from scalai.executor import execute, reshard_checkpoint  # noqa: E402
from scalai.planner import Deployment, make_plan  # noqa: E402
from scalai.models import model_ptc  # noqa: E402
from scalai.models.synth import synth_region, write_synthetic_checkpoint  # noqa: E402
from scalai.regions import Region  # noqa: E402
from scalai.state import carry_state  # noqa: E402

DEFAULT_TRANSITIONS = (
    "tp=2,pp=1,dp=1:tp=1,pp=1,dp=1",  # TP 2 -> 1
    "tp=1,pp=1,dp=1:tp=1,pp=2,dp=1",  # PP 1 -> 2
    "tp=1,pp=2,dp=1:tp=1,pp=2,dp=2,zero=1",  # DP 1 -> 2 with ZeRO-1
)
METHODS = ("scalai", "scalai-load", "scalai-mem", "dcp", "consolidate", "memcpy", "filecopy")
_MEMCPY_BUFFER = 512 << 20
_COPY_CHUNK = 64 << 20


# ---------------------------------------------------------------------------------------
# transitions


@dataclass(frozen=True)
class Transition:
    old: ParallelConfig
    new: ParallelConfig

    @classmethod
    def parse(cls, text: str) -> Transition:
        for sep in ("->", ":"):
            if sep in text:
                a, b = text.split(sep, 1)
                return cls(ParallelConfig.parse(a), ParallelConfig.parse(b))
        raise ValueError(f"transition {text!r} is not OLD:NEW, e.g. 'tp=2,pp=1,dp=1:tp=1,pp=2,dp=1'")

    @property
    def label(self) -> str:
        parts = [f"{k.upper()} {getattr(self.old, k)}→{getattr(self.new, k)}"
                 for k in ("tp", "pp", "dp") if getattr(self.old, k) != getattr(self.new, k)]
        if self.old.zero != self.new.zero:
            parts.append("ZeRO-1 " + ("on" if self.new.zero else "off"))
        return ", ".join(parts) or "same degrees"

    def __str__(self) -> str:
        return f"{self.old} → {self.new}"


def new_layout_nbytes(model: str, config: ParallelConfig) -> list[int]:
    """Bytes of every rank's local tensors in ``config`` (what scalai writes per rank file)."""
    ptc = model_ptc(model, config)
    return [ptc.rank_nbytes(r) for r in range(config.world_size)]


# ---------------------------------------------------------------------------------------
# 1. scalai


def run_scalai(src: str, out: str, new: ParallelConfig, workers: int) -> dict[str, float]:
    _, t = reshard_checkpoint(src, out, new, workers=workers, sync=True)
    return {"total": float(t), "plan": t.plan, "copy": t.copy, "checksum": t.checksum, "sync": t.sync}


class InMemoryReshard:
    """scalai's planner and executor into arrays in RAM.

    ``from_files=False`` ("scalai-mem", the in-memory store's path): the old layout's local
    tensors are read into RAM first (untimed), so both sides are arrays. ``from_files=True``
    ("scalai-load", like for like with DCP's load): the source stays the checkpoint's files
    (memory-mapped, page cache warm as for DCP) and the new layout's arrays are filled from
    them. Either way the new arrays are allocated and pre-faulted untimed, as (c) does;
    timed: ``make_plan`` + ``execute``. Nothing is written to storage.
    """

    def __init__(self, src: str, new: ParallelConfig, workers: int, from_files: bool = False):
        self.path, self.src = src, None
        with Checkpoint.open(src) as ckpt:
            self.old_ptc = ckpt.ptc
            if not from_files:
                self.src = {r: {n: np.array(ckpt.view(r, n)) for n, _ in ckpt.ptc.rank_shards(r)}
                            for r in range(ckpt.ptc.config.world_size)}
        self.new_ptc = self.old_ptc.relayout(new)
        self.dst = {r: {n: np.ones(shard.shape, raw_numpy(self.new_ptc.spec(n).dtype))
                        for n, shard in self.new_ptc.rank_shards(r)}
                    for r in range(new.world_size)}
        self.workers = workers

    def run(self) -> dict[str, float]:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        source = self.src if self.src is not None else Checkpoint.open(self.path)
        both = Placement(gpus_per_host=max(self.old_ptc.config.world_size, self.new_ptc.config.world_size))
        plan = make_plan(Deployment(self.old_ptc, both), Deployment(self.new_ptc, both))
        t1 = time.perf_counter()
        execute(plan, source, self.dst, workers=self.workers)
        t2 = time.perf_counter()
        if source is not self.src:
            source.close()
        return {"total": t2 - t0, "plan": t1 - t0, "copy": t2 - t1, "cpu": _cpu_seconds() - c0}

    @classmethod
    def once(cls, src: str, new: ParallelConfig, workers: int, from_files: bool = False) -> dict[str, float]:
        """Set up (untimed), run, and free the arrays: the RAM is not held between runs, so
        that the other methods do not run under its memory pressure."""
        return cls(src, new, workers, from_files).run()

    def differs_from(self, ref: str) -> str | None:
        """The first local tensor that differs from checkpoint ``ref`` (same layout), if any."""
        with Checkpoint.open(ref) as ckpt:
            for r, tensors in self.dst.items():
                for n, array in tensors.items():
                    if not np.array_equal(array, ckpt.view(r, n)):
                        return f"tensor {n} of rank {r}"
        return None


# ---------------------------------------------------------------------------------------
# (b) consolidate-then-split


def _write_all(path: str, array: np.ndarray, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        mv = memoryview(array.reshape(-1)).cast("B")
        while mv.nbytes:
            mv = mv[os.write(fd, mv):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def run_consolidate_split(src: str, tmp: str, out: str, new: ParallelConfig, workers: int,
                          sync: bool = True) -> dict[str, float]:
    """Universal-checkpoint style: every global tensor assembled and written whole to
    ``tmp`` (one file per tensor), then every new rank file cut from those files."""
    t0 = time.perf_counter()
    local = threading.local()

    def scratch(nbytes: int) -> np.ndarray:  # one reusable buffer per thread
        buf = getattr(local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = local.buf = np.empty(max(nbytes, 1), np.uint8)
        return buf[:nbytes]

    with Checkpoint.open(src) as ckpt:
        ptc = ckpt.ptc
        os.makedirs(tmp)

        def consolidate(spec) -> None:
            full = scratch(spec.nbytes).view(raw_numpy(spec.dtype)).reshape(spec.shape)
            for holding in ptc.holdings(spec.name):  # one replica of every distinct shard
                shard_array = ckpt.view(holding.ranks[0], spec.name)
                for p in holding.shard.pieces:
                    full[p.global_region.to_slices()] = \
                        shard_array[p.local_region.to_slices()].reshape(p.global_region.sizes)
            _write_all(os.path.join(tmp, spec.name + ".bin"), full, sync)

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(consolidate, sorted(ptc.specs, key=lambda s: -s.nbytes)))
        index = {s.name: {"dtype": s.dtype, "shape": list(s.shape)} for s in ptc.specs}
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump(index, f)
        state = carry_state(ckpt.state, ptc.config, new)
    t1 = time.perf_counter()

    new_ptc = ptc.relayout(new)
    with CheckpointWriter(out, new_ptc, state, sync=sync) as writer:
        tasks = [(r, name, shard) for r in range(new.world_size) for name, shard in new_ptc.rank_shards(r)
                 if writer.stores(r, name)]  # each replica once, like every writer of the format
        tasks.sort(key=lambda t: -prod(t[2].shape) * raw_numpy(new_ptc.spec(t[1]).dtype).itemsize)

        def split(task) -> None:
            rank, name, shard = task
            spec = new_ptc.spec(name)
            raw = raw_numpy(spec.dtype)
            full = (np.memmap(os.path.join(tmp, name + ".bin"), raw, "r", shape=spec.shape)
                    if spec.nbytes else np.zeros(spec.shape, raw))
            pieces = shard.pieces
            if len(pieces) == 1 and pieces[0].local_region == Region.full(shard.shape):
                part = full[pieces[0].global_region.to_slices()]
                if part.flags.c_contiguous:  # the whole local tensor is one run of the file
                    writer.write(rank, name, 0, part)
                    return
            buf = scratch(prod(shard.shape) * raw.itemsize).view(raw).reshape(shard.shape)
            if shard.covered < buf.size:
                buf[...] = 0  # vocabulary padding
            for p in pieces:
                buf[p.local_region.to_slices()] = full[p.global_region.to_slices()].reshape(p.local_region.sizes)
            writer.write(rank, name, 0, buf)

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(split, tasks))
        writer.commit(workers)
    t2 = time.perf_counter()
    return {"total": t2 - t0, "consolidate": t1 - t0, "split": t2 - t1,
            "checksum": writer.timings.get("checksum", 0.0)}


# ---------------------------------------------------------------------------------------
# (c) memory copy and (c') file copy


class MemoryCopy:
    """``nbytes`` copied RAM -> RAM by ``workers`` threads between two pre-faulted buffers."""

    def __init__(self, nbytes: int, workers: int):
        size = min(nbytes, _MEMCPY_BUFFER)
        self.src = np.ones(size, np.uint8)
        self.dst = np.zeros(size, np.uint8)
        self.dst[:] = 1  # fault every page in before timing
        self.nbytes, self.workers = nbytes, workers
        self.tasks = []
        done = 0
        while done < nbytes:
            lo = done % size
            n = min(_COPY_CHUNK, size - lo, nbytes - done)
            self.tasks.append((lo, n))
            done += n

    def run(self) -> dict[str, float]:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(lambda t: np.copyto(self.dst[t[0]:t[0] + t[1]], self.src[t[0]:t[0] + t[1]]),
                          self.tasks))
        return {"total": time.perf_counter() - t0, "cpu": _cpu_seconds() - c0}

    @classmethod
    def once(cls, nbytes: int, workers: int) -> dict[str, float]:
        """Allocate and pre-fault (untimed), copy, free."""
        return cls(nbytes, workers).run()


def run_file_copy(src: str, out: str, sizes: list[int], workers: int, sync: bool = True) -> dict[str, float]:
    """One new file per new rank, ``sizes[r]`` bytes each, filled with ``os.sendfile`` from the
    old rank files (taken in turn), then fsynced: the storage's copy rate, no layout logic."""
    t0 = time.perf_counter()
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    lengths = [os.path.getsize(os.path.join(src, f)) for f in files]
    os.makedirs(out)

    def copy(rank: int) -> None:
        fd_out = os.open(os.path.join(out, f"rank-{rank:05d}.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left, k, offset = sizes[rank], rank % len(files), 0
            while left:
                fd_in = os.open(os.path.join(src, files[k]), os.O_RDONLY)
                try:
                    while left and offset < lengths[k]:
                        n = os.sendfile(fd_out, fd_in, offset, min(left, lengths[k] - offset, 1 << 30))
                        offset, left = offset + n, left - n
                finally:
                    os.close(fd_in)
                k, offset = (k + 1) % len(files), 0
            if sync:
                os.fsync(fd_out)
        finally:
            os.close(fd_out)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(copy, range(len(sizes))))
    return {"total": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------
# (a) PyTorch Distributed Checkpoint: one process per rank, gloo


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _dcp_round(runs: list[dict]) -> dict[str, float]:
    """One DCP round: wall times of rank 0 (every phase ends on a barrier), CPU of all ranks."""
    out = {k: runs[0][k] for k in ("load", "save", "total")}
    out.update(cpu=sum(r["cpu"] for r in runs), cpu_load=sum(r["cpu_load"] for r in runs))
    return out


def _tp_placement(split):
    from torch.distributed.tensor import Replicate, Shard

    if split.kind == "replicate":
        return Replicate()
    if split.kind in ("split", "vocab", "fused"):
        return Shard(split.dim)  # nearest DTensor layout: contiguous chunks, no padding/interleave
    raise ValueError(f"no DTensor equivalent for split rule {split}")


def _dcp_items(ptc, rank: int, mesh):
    """(name, spec, placements, local shape, global offset) of every tensor ``rank`` holds."""
    import torch.distributed.tensor._utils as dtensor_utils
    from torch.distributed.tensor import Replicate, Shard

    stage = ptc.config.coords(rank).pp
    items = []
    for spec in ptc.specs:  # every name of the stage, even where a ZeRO part is empty
        if stage not in ptc.stages_of(spec):
            continue
        name = spec.name
        dp = Shard(0) if (ptc.config.zero and spec.is_optimizer_state) else Replicate()
        placements = (dp, _tp_placement(spec.split))
        shape, offset = dtensor_utils.compute_local_shape_and_global_offset(spec.shape, mesh, placements)
        items.append((name, spec, placements, tuple(shape), tuple(offset)))
    return items


def _dtensor(local, spec, mesh, placements):
    import torch
    from torch.distributed.tensor import DTensor

    stride = tuple(prod(spec.shape[d + 1:]) for d in range(len(spec.shape)))
    return DTensor.from_local(local, mesh, placements, run_check=False,
                              shape=torch.Size(spec.shape), stride=stride)


def _check_local(local, spec, shape, offset, seed: int, rows: str) -> bool:
    """Do the loaded values equal the synthetic global values (``rows``: all or first/last)?"""
    got = as_raw(local, spec.dtype)
    if got.size == 0:
        return True
    if rows == "all":
        return np.array_equal(got, synth_region(spec, Region(offset, shape), seed))
    for r in {0, shape[0] - 1}:
        region = Region((offset[0] + r,) + offset[1:], (1,) + shape[1:])
        if not np.array_equal(got[r:r + 1], synth_region(spec, region, seed)):
            return False
    return True


def _dcp_worker(rank: int, world: int, init_method: str, conn, threads: int, model: str, layout: str) -> None:
    """A rank of the DCP job: waits for commands from the benchmark on ``conn``."""
    try:
        import torch
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
        from torch.distributed.device_mesh import init_device_mesh

        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
        cfg = ParallelConfig.parse(layout)
        ptc = model_ptc(model, cfg)
        mesh = init_device_mesh("cpu", (cfg.pp, cfg.dp, cfg.tp), mesh_dim_names=("pp", "dp", "tp"))
        sub = mesh["dp", "tp"]  # this rank's pipeline stage
        items = _dcp_items(ptc, rank, sub)
        conn.send(("ok", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return

    def save_from(src: str, out: str) -> dict:
        """Setup: this rank's state in ``layout`` from a scalai checkpoint, saved with DCP."""
        state, nbytes = {}, 0
        with Checkpoint.open(src) as ckpt:
            for name, spec, placements, shape, offset in items:
                if prod(shape):
                    local = to_torch(ckpt.read_global(name, Region(offset, shape)), spec.dtype)
                else:
                    local = torch.empty(shape, dtype=getattr(torch, spec.dtype))
                nbytes += local.nbytes
                state[name] = _dtensor(local, spec, sub, placements)
        dcp.save(state, storage_writer=FileSystemWriter(out, thread_count=threads, sync_files=True))
        return {"nbytes": nbytes}

    def load(src: str, out: str | None, verify: list[str] | None, seed: int) -> dict:
        """Timed: empty state dict in ``layout``, ``dcp.load``, then (``out``) ``dcp.save``."""
        dist.barrier()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        state = {name: _dtensor(torch.empty(shape, dtype=getattr(torch, spec.dtype)), spec, sub, placements)
                 for name, spec, placements, shape, offset in items}
        dcp.load(state, storage_reader=FileSystemReader(src))
        dist.barrier()
        t1, c1 = time.perf_counter(), _cpu_seconds()
        if out:
            dcp.save(state, storage_writer=FileSystemWriter(out, thread_count=threads, sync_files=True))
            dist.barrier()
        t2, c2 = time.perf_counter(), _cpu_seconds()
        result = {"load": t1 - t0, "save": t2 - t1, "total": t2 - t0, "cpu_load": c1 - c0, "cpu": c2 - c0,
                  "nbytes": sum(state[n].to_local().nbytes for n in state)}
        if verify is not None:
            sample, bad = set(verify), []
            for name, spec, placements, shape, offset in items:
                rows = "all" if name in sample else "ends"
                if not _check_local(state[name].to_local(), spec, shape, offset, seed, rows):
                    bad.append(name)
            result.update(checked=len(items), checked_whole=len(sample & set(state)), bad=bad)
        return result

    handlers = {"save_from": save_from, "load": load}
    while True:
        cmd, kwargs = conn.recv()
        if cmd == "quit":
            break
        try:
            conn.send(("ok", handlers[cmd](**kwargs)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


class DcpJob:
    """``world`` DCP ranks (processes) of ``layout``, started once and driven by commands."""

    def __init__(self, model: str, layout: ParallelConfig, cores: int):
        import multiprocessing as mp

        self.world = layout.world_size
        self.threads = max(1, cores // self.world)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["OMP_NUM_THREADS"] = str(self.threads)  # read by the children at import
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(self.world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_dcp_worker, daemon=True,
                            args=(rank, self.world, f"tcp://127.0.0.1:{port}", child, self.threads,
                                  model, str(layout)))
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        self._gather()

    def _gather(self) -> list:
        results = []
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs)):
            while not conn.poll(1.0):
                if not proc.is_alive():
                    self.close()
                    raise RuntimeError(f"DCP rank {rank} died (exit code {proc.exitcode})")
            status, value = conn.recv()
            if status != "ok":
                self.close()
                raise RuntimeError(f"DCP rank {rank} failed:\n{value}")
            results.append(value)
        return results

    def call(self, cmd: str, **kwargs) -> list:
        for conn in self.conns:
            conn.send((cmd, kwargs))
        return self._gather()

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            try:
                if proc.is_alive():
                    conn.send(("quit", {}))
            except (OSError, BrokenPipeError):
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self.conns, self.procs = [], []


def dcp_sample(model: str, count: int = 12) -> list[str]:
    """Tensors whose whole DCP-loaded shards are checked: embeddings, a fused QKV, the
    output-side tensors, their optimizer state, plus a seeded random pick."""
    ptc = model_ptc(model, ParallelConfig())
    names = ptc.names
    fixed = [n for n in names if n.endswith("word_embeddings.weight") or ".0.self_attention.linear_qkv.weight" in n]
    rng = np.random.default_rng(1234)
    return sorted(set(fixed) | set(rng.choice(names, size=min(count, len(names)), replace=False).tolist()))


# ---------------------------------------------------------------------------------------
# driver


@dataclass
class Result:
    transition: Transition
    nbytes: int
    dcp_nbytes: int = 0
    dcp_saved_nbytes: int = 0
    samples: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def stats(self, method: str, part: str = "total") -> Stats | None:
        runs = self.samples.get(method)
        return Stats.of([r[part] for r in runs]) if runs else None


def scalai_revision() -> str:
    """The commit of the scalai sources measured, and whether they had local changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"git {sha}" + (f" + uncommitted changes to {len(dirty)} files under src/" if dirty else "")


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _rm(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.model, self.seed, self.workers = args.model, args.seed, args.workers
        self.cores = os.cpu_count() or 1
        self.transitions = [Transition.parse(t) for t in (args.transition or DEFAULT_TRANSITIONS)]
        self.methods = [m for m in METHODS if m in args.methods.split(",")]
        size = {str(c): sum(new_layout_nbytes(self.model, c)) for t in self.transitions for c in (t.old, t.new)}
        state = sum(s.nbytes for s in model_ptc(self.model, ParallelConfig()).specs)
        # on storage at once: old + new checkpoints, DCP's copy, consolidated tensors, one output;
        # in RAM besides: the RAM -> RAM arrays (old + new), DCP's loaded ranks, (c)'s buffers
        files = max(size[str(t.old)] + 2 * size[str(t.new)] + 2 * state for t in self.transitions)
        ram = max(size[str(t.old)] + 2 * size[str(t.new)] for t in self.transitions) + 2 * _MEMCPY_BUFFER
        self.workdir, self.storage = choose_workdir(files, ram, args.workdir, "scalai-reshard-bench")
        self.ckpts: dict[str, str] = {}
        self.jobs: dict[str, DcpJob] = {}

    def job(self, config: ParallelConfig) -> DcpJob:
        """The DCP ranks of ``config`` (started on first use: process start-up is not timed)."""
        key = str(config)
        if key not in self.jobs:
            t0 = time.perf_counter()
            self.jobs[key] = job = DcpJob(self.model, config, self.cores)
            log(f"  DCP: started {job.world} ranks of {key} ({job.threads} threads each), "
                f"{time.perf_counter() - t0:.1f} s")
        return self.jobs[key]

    def release_jobs(self, keep: set[str]) -> None:
        for key in list(self.jobs):
            if key not in keep:
                self.jobs.pop(key).close()

    def checkpoint(self, config: ParallelConfig) -> str:
        """The synthetic checkpoint of ``config`` (written on first use)."""
        key = str(config)
        if key not in self.ckpts:
            path = os.path.join(self.workdir, "synth-" + key.replace(",", "_").replace("=", ""))
            t0 = time.perf_counter()
            write_synthetic_checkpoint(self.model, path, config, self.seed)
            log(f"  synthesized {self.model} in {key}: {_dir_bytes(path) / 1e9:.2f} GB, "
                f"{time.perf_counter() - t0:.1f} s")
            self.ckpts[key] = path
        return self.ckpts[key]

    def release(self, keep: set[str]) -> None:
        for key in list(self.ckpts):
            if key not in keep:
                _rm(self.ckpts.pop(key))

    def run(self) -> list[Result]:
        results = []
        for i, t in enumerate(self.transitions):
            log(f"transition {i + 1}/{len(self.transitions)}: {t} ({t.label})")
            later = {str(u.old) for u in self.transitions[i + 1:]} | {str(u.new) for u in self.transitions[i + 1:]}
            later_old = {str(u.old) for u in self.transitions[i + 1:]}
            results.append(self.run_transition(t, later, later_old))
            self.release(later)
        return results

    def run_transition(self, t: Transition, later: set[str], later_old: set[str]) -> Result:
        a, w = self.args, self.workers
        sizes = new_layout_nbytes(self.model, t.new)
        result = Result(t, sum(sizes))
        src = self.checkpoint(t.old)
        ref = self.checkpoint(t.new)
        out = lambda name: os.path.join(self.workdir, name)  # noqa: E731
        dcp_src, job = out("dcp-old"), None
        in_memory = None
        try:
            # -- setup and verification (untimed) -----------------------------------
            if "dcp" in self.methods:
                log(f"  DCP setup: {t.old.world_size} ranks save the old layout with dcp.save")
                self.job(t.old).call("save_from", src=src, out=dcp_src)
                self.release_jobs({str(t.new)} | later_old)
                job = self.job(t.new)
            log("  verifying every method against the synthesized new layout")
            if "scalai" in self.methods:
                run_scalai(src, out("scalai"), t.new, w)
                self.expect_equal(out("scalai"), ref, "scalai reshard")
                _rm(out("scalai"))
            for method, from_files in (("scalai-mem", False), ("scalai-load", True)):
                if method in self.methods:
                    in_memory = InMemoryReshard(src, t.new, w, from_files)
                    in_memory.run()
                    diff = in_memory.differs_from(ref)
                    in_memory = None
                    if diff:
                        raise SystemExit(f"{method} produced wrong values in {diff}")
                    log(f"  {method}: new arrays equal the synthesized new layout")
            if "consolidate" in self.methods:
                run_consolidate_split(src, out("consolidated"), out("split"), t.new, w)
                self.expect_equal(out("split"), ref, "consolidate-then-split")
                _rm(out("consolidated"))
                _rm(out("split"))
            if job is not None:
                runs = job.call("load", src=dcp_src, out=None, verify=dcp_sample(self.model), seed=self.seed)
                bad = [n for r in runs for n in r["bad"]]
                if bad:
                    raise SystemExit(f"DCP loaded wrong values into {', '.join(sorted(set(bad)))}")
                result.dcp_nbytes = sum(r["nbytes"] for r in runs)
                log(f"  DCP: loaded values equal the synthetic ones ({sum(r['checked'] for r in runs)} local "
                    f"tensors checked on their first and last rows, {sum(r['checked_whole'] for r in runs)} "
                    f"whole); ranks hold {result.dcp_nbytes / 1e9:.2f} GB")
            if str(t.new) not in later:
                self.release({str(t.old)} | later)  # the reference is no longer needed

            # -- timed rounds, interleaved ------------------------------------------
            runners = {
                "scalai": lambda: run_scalai(src, out("scalai"), t.new, w),
                "dcp": lambda: _dcp_round(job.call("load", src=dcp_src, out=out("dcp-new"), verify=None,
                                                   seed=self.seed)),
                "consolidate": lambda: run_consolidate_split(src, out("consolidated"), out("split"), t.new, w),
                "scalai-mem": lambda: InMemoryReshard.once(src, t.new, w),
                "scalai-load": lambda: InMemoryReshard.once(src, t.new, w, from_files=True),
                "memcpy": lambda: MemoryCopy.once(result.nbytes, w),
                "filecopy": lambda: run_file_copy(src, out("filecopy"), sizes, w),
            }
            for r in range(a.repeats):
                order = self.methods[r % len(self.methods):] + self.methods[:r % len(self.methods)]
                for m in order:
                    c0 = _cpu_seconds()
                    sample = runners[m]()
                    sample.setdefault("cpu", _cpu_seconds() - c0)
                    result.samples.setdefault(m, []).append(sample)
                    if m == "dcp" and not result.dcp_saved_nbytes:
                        result.dcp_saved_nbytes = _dir_bytes(out("dcp-new"))
                    for d in ("scalai", "dcp-new", "consolidated", "split", "filecopy"):
                        _rm(out(d))
                line = ", ".join(f"{m} {result.samples[m][-1]['total']:.2f}s" for m in self.methods)
                log(f"  round {r + 1}/{a.repeats}: {line}")
        finally:
            self.release_jobs(later_old)
            _rm(dcp_src)
            del in_memory
        return result

    def expect_equal(self, out: str, ref: str, what: str) -> None:
        with Checkpoint.open(out) as x, Checkpoint.open(ref) as y:
            diff = compare_checkpoints(x, y)
        if diff is not None:
            raise SystemExit(f"{what} produced a wrong checkpoint: {diff}")
        log(f"  {what}: output equals the synthesized new layout")


# ---------------------------------------------------------------------------------------
# report


def _fmt(s: float) -> str:
    return f"{s:.2f}" if s < 100 else f"{s:.0f}"


def table_rows(results: list[Result], workers: int) -> tuple[list[list[str]], list[int]]:
    rows, sections = [], []
    names = {
        "scalai": "scalai reshard",
        "scalai-load": "scalai load, files → RAM",
        "scalai-mem": "scalai, RAM → RAM",
        "dcp_load": "(a) DCP load",
        "dcp": "(a) DCP load + save",
        "consolidate": "(b) consolidate → split",
        "memcpy": "(c) memory copy",
        "filecopy": "(c') file copy",
    }
    for res in results:
        sections.append(len(rows))
        base = res.stats("scalai")
        entries = []
        for key in ("scalai", "scalai-load", "scalai-mem", "dcp_load", "dcp", "consolidate", "memcpy", "filecopy"):
            method, part = ("dcp", "load") if key == "dcp_load" else (key, "total")
            st = res.stats(method, part)
            if st is None:
                continue
            parts = ""
            if key == "scalai":
                parts = " · ".join(f"{short} {_fmt(res.stats('scalai', p).median)}" for p, short in
                                   (("plan", "plan"), ("copy", "copy"), ("checksum", "crc"), ("sync", "fsync")))
            elif key in ("scalai-mem", "scalai-load"):
                parts = (f"plan {_fmt(res.stats(key, 'plan').median)} · "
                         f"copy {_fmt(res.stats(key, 'copy').median)}")
            elif key == "dcp":
                parts = f"load {_fmt(res.stats('dcp', 'load').median)} · save {_fmt(res.stats('dcp', 'save').median)}"
            elif key == "consolidate":
                parts = (f"consol. {_fmt(res.stats(key, 'consolidate').median)} · "
                         f"split {_fmt(res.stats(key, 'split').median)} "
                         f"(crc {_fmt(res.stats(key, 'checksum').median)})")
            ratio = f"{st.median / base.median:.2f}" if base else ""
            cpu = res.stats(method, "cpu_load" if key == "dcp_load" else "cpu")
            entries.append([names[key], _fmt(st.median), f"{_fmt(st.min)}–{_fmt(st.max)}",
                            f"{res.nbytes / st.median / 1e9:.2f}", ratio, _fmt(cpu.median) if cpu else "", parts])
        t = res.transition
        labels = [t.label, str(t.old), f"→ {t.new}", f"{res.nbytes / 1e9:.2f} GB, {t.new.world_size} ranks"]
        for j, e in enumerate(entries):
            rows.append([labels[j] if j < len(labels) else "", *e])
    return rows, sections


def targets(results: list[Result]) -> list[str]:
    lines = []
    for res in results:
        s = res.stats("scalai")
        if s is None:
            continue
        checks = []
        for method, part, what in (("dcp", "load", "faster than DCP load"),
                                   ("dcp", "total", "faster than DCP load+save"),
                                   ("consolidate", "total", "faster than consolidate-then-split")):
            st = res.stats(method, part)
            if st:
                ok = st.median > s.median
                checks.append(f"{what}: {st.median / s.median:.2f}x {'met' if ok else 'MISSED'}")
        st = res.stats("memcpy")
        if st:
            frac = st.median / s.median
            checks.append(f">= 0.5 of memory copy: {frac:.2f} {'met' if frac >= 0.5 else 'MISSED'}")
            mem = res.stats("scalai-mem")
            if mem:
                checks.append(f"(RAM → RAM: {st.median / mem.median:.2f})")
            cs, cm = res.stats("scalai", "cpu"), res.stats("memcpy", "cpu")
            if cs and cm and cs.median > 0:
                checks.append(f"(by CPU seconds: {cm.median / cs.median:.2f})")
        load, dcp_load = res.stats("scalai-load"), res.stats("dcp", "load")
        if load and dcp_load:
            ok = dcp_load.median > load.median
            checks.append(f"like for like, scalai load vs DCP load (files -> RAM): "
                          f"{dcp_load.median / load.median:.2f}x {'met' if ok else 'MISSED'}")
        lines.append(f"{res.transition.label}: " + "; ".join(checks))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-small", help="model shape (scalai synth names; default gpt2-small)")
    p.add_argument("--transition", action="append",
                   help="OLD:NEW layouts, e.g. 'tp=2,pp=1,dp=1:tp=1,pp=2,dp=1' (repeatable; "
                        "default: a TP, a PP and a DP/ZeRO change)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per transition (default 3)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="threads for scalai, (b), (c), (c') (default: scalai's, one per core up to 8)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--workdir", help="scratch parent directory (default /dev/shm when it has room, else /tmp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("rich", "markdown", "plain"), default="rich")
    p.add_argument("--json", help="also write the raw samples to this file")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")

    bench = Bench(args)
    machine = machine_description()
    revision = scalai_revision()
    load_before = os.getloadavg()
    log(f"model {args.model}, {len(bench.transitions)} transitions, {args.repeats} rounds, "
        f"{args.workers} workers; scratch {bench.storage}")
    try:
        results = bench.run()
    finally:
        bench.release_jobs(set())
        if not args.keep:
            _rm(bench.workdir)

    rows, sections = table_rows(results, args.workers)
    title = (f"Reshard of {args.model} state, median of {args.repeats} rounds (wall seconds); GB/s = bytes of "
             f"the new layout / time; ÷scalai = time / scalai's time; CPU s = user + system CPU seconds "
             f"(all threads; all ranks for DCP)")
    print_table(title, ["transition", "method", "median s", "min–max s", "GB/s", "÷scalai", "CPU s", "parts (median s)"],
                rows, sections, args.format)
    print()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}; {machine['os']}; "
          f"python {machine['python']}, numpy {machine.get('numpy')}, torch {machine.get('torch')}; "
          f"{machine['date']}")
    print(f"scalai: {revision}; {args.workers} threads for scalai, (b), (c), (c'); "
          f"DCP: one process per new rank, cores / ranks threads each")
    print(f"storage: {bench.storage}; every method fsyncs its output")
    load_after = os.getloadavg()
    print(f"load average (1 min) at start {load_before[0]:.1f}, at end {load_after[0]:.1f} "
          f"({machine['cores']} cores; above that count, other processes competed for the CPU)")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    for res in results:
        if res.dcp_nbytes:
            print(f"{res.transition.label}: DCP ranks hold {res.dcp_nbytes / 1e9:.2f} GB (no vocabulary padding), "
                  f"dcp.save writes {res.dcp_saved_nbytes / 1e9:.2f} GB (replicas once)")
    small = [r for r in results if r.nbytes < 1e9]
    if small:
        print(f"note: {len(small)} transition(s) move less than 1 GB; use --model gpt2-small or larger for the record")
    print("targets (issue 2): " + ("\n  ".join([""] + targets(results)) if results else "none"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "storage": bench.storage, "argv": sys.argv, "scalai": revision,
                       "loadavg": [load_before[0], load_after[0]],
                       "results": [{"transition": str(r.transition), "label": r.transition.label,
                                    "nbytes": r.nbytes, "dcp_nbytes": r.dcp_nbytes,
                                    "dcp_saved_nbytes": r.dcp_saved_nbytes, "samples": r.samples}
                                   for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
