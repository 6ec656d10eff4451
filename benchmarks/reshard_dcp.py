"""Side (a) of ``reshard.py``: PyTorch Distributed Checkpoint, one process per rank (gloo).

A :class:`DcpJob` starts the ranks of one layout once (process start-up, imports and
rendezvous are not timed) and drives them by commands over pipes:

- ``save_from`` (setup, untimed): every rank reads its shard of a scalai checkpoint into
  DTensors of the nearest DTensor layout and ``dcp.save``s them;
- ``load`` (timed): every rank builds its state dict of DTensors in the new layout and
  fills every page of it *before* the clock starts (like scalai's destination arrays: a
  resuming job's tensors exist already), then ``dcp.load`` reshards on load; with ``out``
  the loaded state is ``dcp.save``d in the new layout (``FileSystemWriter(thread_count=
  cores / ranks, sync_files=True)``). Wall times are rank 0's; every phase ends on a
  barrier, so they are the slowest rank's. CPU seconds are summed over the ranks.

DCP cannot express Megatron's layouts, so each tensor gets the nearest DTensor layout on a
``(dp, tp)`` mesh per pipeline stage: column-parallel, fused QKV, fused gate/up and
vocabulary-parallel tensors are ``Shard(dim)`` on tp (contiguous chunks of the global
tensor: no per-head-group QKV interleave, no vocabulary padding, an uneven last chunk),
row-parallel ``Shard(1)``, the rest ``Replicate``; ``Replicate`` on dp except optimizer
state under ZeRO-1, which is ``Shard(0)`` on dp (DCP has no flat buffer cut across
replicas); pipeline parallelism is which ranks hold which names (tied embeddings on the
first and last stage). DCP thus moves the same global tensors, minus vocabulary padding.
"""

from __future__ import annotations

import gc
import os
import resource
import socket
import time
import traceback
from math import prod

import numpy as np

from scalai.checkpoint import Checkpoint
from scalai.storage.arrays import as_raw, to_torch
from scalai.config import ParallelConfig
from scalai.models import model_ptc
from scalai.models.synth import synth_region
from scalai.regions import Region

__all__ = ["DcpJob", "dcp_sample", "cpu_seconds"]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


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
        dp = Shard(0) if (ptc.config.zero and spec.is_optimizer_state) else Replicate()
        placements = (dp, _tp_placement(spec.split))
        shape, offset = dtensor_utils.compute_local_shape_and_global_offset(spec.shape, mesh, placements)
        items.append((spec.name, spec, placements, tuple(shape), tuple(offset)))
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


def _worker(rank: int, world: int, init_method: str, conn, threads: int, model: str, layout: str) -> None:
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
        """Timed: ``dcp.load`` into a pre-faulted state dict of ``layout``, then (``out``)
        ``dcp.save``. The state dict is built and every page written before the clock, and
        the objects alive then are moved out of the cyclic collector's reach (``gc.freeze``,
        as the harness does for the methods it runs in its own process)."""
        state = {name: _dtensor(torch.ones(shape, dtype=getattr(torch, spec.dtype)), spec, sub, placements)
                 for name, spec, placements, shape, offset in items}  # ones: every page written, untimed
        gc.collect()
        gc.freeze()
        dist.barrier()
        t0, c0 = time.perf_counter(), cpu_seconds()
        dcp.load(state, storage_reader=FileSystemReader(src))
        dist.barrier()
        t1, c1 = time.perf_counter(), cpu_seconds()
        if out:
            dcp.save(state, storage_writer=FileSystemWriter(out, thread_count=threads, sync_files=True))
            dist.barrier()
        t2, c2 = time.perf_counter(), cpu_seconds()
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
            p = ctx.Process(target=_worker, daemon=True,
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

    def round(self, src: str, out: str | None, seed: int) -> dict[str, float]:
        """One timed load (+ save into ``out``): rank 0's wall times, CPU of all ranks."""
        runs = self.call("load", src=src, out=out, verify=None, seed=seed)
        sample = {k: runs[0][k] for k in ("load", "save", "total")}
        sample.update(cpu=sum(r["cpu"] for r in runs), cpu_load=sum(r["cpu_load"] for r in runs))
        return sample

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
