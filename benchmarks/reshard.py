"""Reshard throughput: scalai against PyTorch DCP, consolidate-then-split and two floors.

One run prints one table measured in that run. For every transition (default: a TP, a PP
and a DP/ZeRO change of gpt2-small: bf16 parameters, fp32 masters and two fp32 Adam
moments, 1.74 GB of global state) the same job state is moved from the old layout to the
new one by every method below. What each side does:

- **scalai reshard**: ``scalai reshard SRC OUT --to NEW --json`` run in-process through
  ``scalai.cli.main`` (the command's own code; Python start-up and imports are not timed):
  it plans, then copies into a new checkpoint directory, checking by default every CRC-32
  of the source (``verify``; the commit waits for it): the source tensors whose bytes the
  copy reads whole as runs (moved unchanged, the sides of a ZeRO split, whole rows
  assembled) are checked from the CRC-32s of the 4 MiB blocks it writes with ``pwrite``
  (computed while the block is in cache; runs read with ``pread`` into a buffer of each
  thread's, rows assembled from the source's memory maps), the others
  (replicas no copy reads) on half its threads alongside. Without the check, runs of a
  source tensor's bytes that stay runs in the new file (adjacent copies merged) go file
  to file in the kernel (``copy_file_range``) with their CRC-32 carried over (recorded, or
  derived from the recorded one and the few bytes around the run). Other windows are
  gathered through a 4 MiB buffer and ``pwrite``, their CRC-32 computed while in cache;
  writeback of every finished tensor started at once; fsync + renames at commit. Each
  replica is written once. **scalai reshard --no-verify**: the same without the check.
- **scalai load, files → RAM**: what a resuming job does (``scalai.training.load``): the
  source's CRC-32s checked (its default; ``--no-verify`` line: skipped), a plan, and the
  new layout's arrays filled from the memory-mapped files. **scalai, RAM → RAM**: the same
  planner and plan runner between arrays in memory (old shards read into RAM untimed): the
  copy engine without storage. Destination arrays of both are allocated and every page
  written before the clock starts (a resuming job's tensors exist), as for DCP below.
- **(a) PyTorch DCP** (``reshard_dcp.py``): the state ``dcp.save``d in the old layout
  (untimed); one gloo process per *new* rank (started before timing, ``OMP_NUM_THREADS`` =
  cores / ranks) ``dcp.load``s it into a state dict of DTensors of the new layout that was
  built and pre-faulted before the clock: DCP's reshard on load. "load + save" then
  ``dcp.save``s the result (``FileSystemWriter(thread_count=cores / ranks,
  sync_files=True)``: fsync). Times are the slowest rank's; CPU is summed over the ranks.
  Tensors get the nearest DTensor layout (DCP cannot express Megatron's QKV interleave or
  vocabulary padding); the same global tensors move.
- **(b) consolidate → split** (``reshard_baselines.py``; DeepSpeed's universal checkpoint):
  every global tensor written whole into a scratch file of its own (straight from the
  shards' maps, or assembled in 4 MiB blocks of rows; no fsync, no checksum), then every
  new rank file cut from those through scalai's own checkpoint writer: 4 MiB blocks with
  their CRC-32 (zlib-ng, scalai's) computed while writing, writeback started per tensor,
  fsync at commit.
- **(c) memory copy**: ``np.copyto`` of as many bytes as scalai reshard writes, RAM to RAM,
  between two pre-faulted 512 MiB buffers: the physical limit.
- **(c-t) the plan's windows copied**: the RAM → RAM plan made and every window selected
  before the clock, then each ``np.copyto``'d from the old arrays into the new ones by the
  threads, dealt largest first to the least loaded: what any runner copying tensor by
  tensor must do, without planning, grouping or books. (c) → (c-t) is the cost of many
  separate, partly strided windows against one buffer; (c-t) → RAM → RAM is scalai's own.
- **(c') file copy**: as many bytes as scalai reshard writes into each new rank file,
  copied by the kernel (``copy_file_range``) from the old rank files in 64 MiB chunks
  shared out over the threads (each takes its next chunk from the file with the most
  left that no other thread copies into; one new file gets them all), writeback started
  per chunk, fsynced: the storage's own floor, no layout logic.
- **(c'b) file copy through a buffer**: the same bytes, but through the process in 1 MiB
  blocks (the fastest size here) read with ``pread`` into a buffer of each thread's, then
  ``pwrite``d (as ``dd`` or ``rsync`` copy). Which of (c') and (c'b) is faster depends on
  the file system and the transition (one new file written by every thread favours
  (c'b)); the summary holds scalai against the faster of the two by median, and pairs its
  rounds with that one's.
- **(c'') file copy + CRC-32**: (c'b) with each block's CRC-32 computed (zlib-ng,
  scalai's) before its ``pwrite``: the floor of a copy that reads its source, as a source
  check must.

Threads: ``--workers`` (default one per core, at most 8) for scalai, (b), (c), (c-t), (c'), (c'b) and (c'').

Bytes: every method's GB/s is the bytes *it* writes over its time, and the table prints
them: the new checkpoint's rank files for scalai reshard, (b), (c), (c'), (c'b) and (c'') (each replica
once, vocabulary padding included), the new layout's arrays in RAM for the loads and
(c-t) (every rank holds its replicas), DCP's ranks' tensors for its load and its saved files for load +
save.

Storage: one scratch directory for every method, ``/dev/shm`` (tmpfs) when memory leaves
room, else ``/tmp``; ``--workdir`` picks (run it on both to compare scalai with the file
system's own floor on each). Every method that writes files fsyncs them.

Correctness is checked before timing: scalai's and (b)'s outputs compare equal
(``scalai.compare``) to a checkpoint synthesized directly in the new layout, the in-memory
arrays equal its local tensors, and DCP's loaded tensors equal the synthetic global values
(whole shards for a sample of tensors, first and last rows of every tensor on every rank).

Repeats are interleaved (each round runs every method, in an order shuffled anew each
round from ``--seed``: a rotated order kept each method right after the same one, whose
freed memory it then met every round) so that the noise of a shared machine hits every
method alike; the table shows median, min and max.
One untimed warm-up round of every method comes first (``--warmup``): on a VM whose host
takes back the memory it frees (free page reporting), the first writes into fresh memory
wait for the host, at up to 2 s a GB here, which falls on whichever method comes first.
Before the clock, each process that runs a method (this one, each DCP rank) moves the
objects alive out of the cyclic garbage collector's reach (``gc.freeze``): this process
holds torch's and DCP's heap, which ``scalai reshard`` in its own process would not walk.

Usage::

    .venv/bin/python benchmarks/reshard.py                        # defaults (5 rounds)
    .venv/bin/python benchmarks/reshard.py --model gpt-tiny --repeats 1   # smoke test
    .venv/bin/python benchmarks/reshard.py --methods scalai,scalai-noverify,filecopy --workdir /tmp
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import random
import shutil
import signal
import sys
import time
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Stats, choose_workdir, log, machine_description, print_table  # noqa: E402
from reshard_baselines import MemoryCopy, WindowCopy, consolidate_then_split, file_copy  # noqa: E402
from reshard_dcp import DcpJob, cpu_seconds, dcp_sample  # noqa: E402

from scalai.checkpoint import Checkpoint, default_workers  # noqa: E402
from scalai.compare import compare_checkpoints  # noqa: E402
from scalai.config import ParallelConfig, Placement  # noqa: E402
from scalai.dtypes import raw_numpy  # noqa: E402
from scalai.models import model_ptc  # noqa: E402
from scalai.models.synth import write_synthetic_checkpoint  # noqa: E402
from scalai.planner import Deployment, make_plan  # noqa: E402
from scalai.storage import ArraysSink, ArraysSource, run_plan  # noqa: E402

DEFAULT_TRANSITIONS = (
    "tp=2,pp=1,dp=1:tp=1,pp=1,dp=1",  # TP 2 -> 1
    "tp=1,pp=1,dp=1:tp=1,pp=2,dp=1",  # PP 1 -> 2
    "tp=1,pp=2,dp=1:tp=1,pp=2,dp=2,zero=1",  # DP 1 -> 2 with ZeRO-1
)


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


# ---------------------------------------------------------------------------------------
# the methods: one function each. ``prepare(case)`` does the untimed setup and returns the
# timed run, which returns its parts in seconds (a method timed in other processes, DCP,
# returns its own ``total`` and ``cpu``).


@dataclass
class Case:
    """One transition's inputs, shared by every method."""

    src: str                 # the old layout's checkpoint
    new: ParallelConfig
    workdir: str
    workers: int
    seed: int
    file_sizes: list[int] = field(default_factory=list)  # scalai's new rank files, bytes
    dcp: DcpJob | None = None
    dcp_src: str = ""
    last_arrays: dict | None = None  # the in-memory destination of the last load, for checking

    def out(self, name: str) -> str:
        return os.path.join(self.workdir, name)


def scalai_cli(case: Case, verify: bool = True) -> Callable[[], dict[str, float]]:
    """``scalai reshard`` as a user runs it (in-process); its phases from its JSON report."""
    from scalai.cli.main import main as cli_main

    args = ["reshard", case.src, case.out("scalai"), "--to", str(case.new), "--workers", str(case.workers),
            "--json"] + ([] if verify else ["--no-verify"])

    def run() -> dict[str, float]:
        buf = io.StringIO()
        with redirect_stdout(buf):
            code = cli_main(args)
        if code:
            raise RuntimeError(f"scalai {' '.join(args)} exited with {code}")
        report = json.loads(buf.getvalue())
        phases = report["phases"]
        return {**{k: phases[k] for k in ("verify", "plan", "copy", "checksum", "sync")},
                "verified": phases["verified_alongside"],
                **{f"run_{k}": v for k, v in report["runner"].items()}}
    return run


def _arrays(case: Case, with_source: bool):
    """``(old PTC, old arrays or None, new PTC, new arrays)`` for the RAM sides: the old
    local tensors read into RAM (``with_source``), the new ones allocated with every page
    written (a resuming job's tensors exist); the new ones kept for the untimed check."""
    with Checkpoint.open(case.src) as ckpt:
        old_ptc = ckpt.ptc
        source = None if not with_source else {
            r: {n: np.array(ckpt.view(r, n)) for n, _ in old_ptc.rank_shards(r)}
            for r in range(old_ptc.config.world_size)}
    new_ptc = old_ptc.relayout(case.new)
    dest = {r: {n: np.ones(s.shape, raw_numpy(new_ptc.spec(n).dtype)) for n, s in new_ptc.rank_shards(r)}
            for r in range(case.new.world_size)}  # ones: every page written before the clock
    case.last_arrays = dest
    return old_ptc, source, new_ptc, dest


def _plan(old_ptc, new_ptc):
    """The plan of a load: both layouts on one host (every rank reads its own)."""
    both = Placement(gpus_per_host=max(old_ptc.config.world_size, new_ptc.config.world_size))
    return make_plan(Deployment(old_ptc, both), Deployment(new_ptc, both))


def scalai_load(case: Case, verify: bool = True, from_files: bool = True) -> Callable[[], dict[str, float]]:
    """The new layout's arrays filled by scalai's planner and plan runner, from the checkpoint's
    files (``from_files``, with the source's CRC-32s checked first if ``verify``) or from
    the old local tensors read into RAM (untimed). Destinations pre-faulted, untimed."""
    old_ptc, source, new_ptc, dest = _arrays(case, with_source=not from_files)

    def run() -> dict[str, float]:
        t0 = time.perf_counter()
        ckpt = Checkpoint.open(case.src) if from_files else None
        try:
            if ckpt is not None and verify:
                ckpt.verify(case.workers)
            t1 = time.perf_counter()
            plan = _plan(old_ptc, new_ptc)
            t2 = time.perf_counter()
            report = run_plan(plan, ckpt if ckpt is not None else ArraysSource(old_ptc, source),
                              ArraysSink(new_ptc, dest), workers=case.workers)
        finally:
            if ckpt is not None:
                ckpt.close()
        t3 = time.perf_counter()
        return {"verify": t1 - t0, "plan": t2 - t1, "copy": t3 - t2,
                **{f"run_{k}": v for k, v in report.seconds.items() if k != "total"}}
    return run


def dcp_load_save(case: Case) -> Callable[[], dict[str, float]]:
    """(a): ``dcp.load`` into pre-faulted DTensors of the new layout, then ``dcp.save``."""
    return lambda: case.dcp.round(case.dcp_src, case.out("dcp-new"), case.seed)


def consolidate_split(case: Case) -> Callable[[], dict[str, float]]:
    """(b), see ``reshard_baselines.consolidate_then_split``."""
    return lambda: consolidate_then_split(case.src, case.out("consolidated"), case.out("split"), case.new,
                                          case.workers)


def memory_copy(case: Case) -> Callable[[], dict[str, float]]:
    """(c): as many bytes as scalai reshard writes, RAM to RAM (buffers pre-faulted)."""
    return MemoryCopy(sum(case.file_sizes), case.workers).run


def window_copy(case: Case) -> Callable[[], dict[str, float]]:
    """(c-t): the RAM → RAM plan's windows alone, copied between the same arrays
    (planned and selected before the clock), see ``reshard_baselines.WindowCopy``."""
    old_ptc, source, new_ptc, dest = _arrays(case, with_source=True)
    for arrays in dest.values():
        for a in arrays.values():
            a[...] = 0  # padding no window writes, as scalai's runner zeroes it (untimed)
    return WindowCopy(_plan(old_ptc, new_ptc), source, dest, case.workers).run


def plain_file_copy(case: Case, mode: str = "kernel") -> Callable[[], dict[str, float]]:
    """(c'): scalai reshard's rank file sizes, copied by the kernel from the old files;
    (c'b), ``mode="buffered"``: every byte through a buffer of this process; (c''),
    ``mode="checked"``: the same, its CRC-32 computed on the way."""
    return lambda: file_copy(case.src, case.out("filecopy"), case.file_sizes, case.workers, mode)


@dataclass(frozen=True)
class Method:
    prepare: Callable[[Case], Callable[[], dict[str, float]]]
    outputs: tuple[str, ...] = ()  # scratch directories to delete after every run


METHODS: dict[str, Method] = {
    "scalai": Method(scalai_cli, ("scalai",)),
    "scalai-noverify": Method(lambda c: scalai_cli(c, verify=False), ("scalai",)),
    "scalai-load": Method(scalai_load),
    "scalai-load-noverify": Method(lambda c: scalai_load(c, verify=False)),
    "scalai-mem": Method(lambda c: scalai_load(c, verify=False, from_files=False)),
    "dcp": Method(dcp_load_save, ("dcp-new",)),
    "consolidate": Method(consolidate_split, ("consolidated", "split")),
    "memcpy": Method(memory_copy),
    "windowcopy": Method(window_copy),
    "filecopy": Method(plain_file_copy, ("filecopy",)),
    "filecopy-rw": Method(lambda c: plain_file_copy(c, mode="buffered"), ("filecopy",)),
    "filecopy-crc": Method(lambda c: plain_file_copy(c, mode="checked"), ("filecopy",)),
}


def measure(method: Method, case: Case) -> dict[str, float]:
    """The shared timing harness: untimed setup, then wall and CPU seconds of the run
    (overridden by what a run that times itself reports), its parts; outputs deleted.

    Before the clock, every object alive is moved out of the cyclic garbage collector's
    reach (``gc.freeze``): this process holds torch's and DCP's heap (about 250,000
    objects, a full collection over them 0.1 s here), which a method run in its own process
    (``scalai reshard``: the CLI does not import torch; 30,000 objects, 6.5 ms) would not
    walk; a collection during the timed call walks only what the call made, as there."""
    run = method.prepare(case)
    gc.collect()
    gc.freeze()
    t0, c0 = time.perf_counter(), cpu_seconds()
    parts = run()
    sample = {"total": time.perf_counter() - t0, "cpu": cpu_seconds() - c0, **parts}
    case.last_arrays = None
    for d in method.outputs:
        _rm(case.out(d))
    return sample


# ---------------------------------------------------------------------------------------
# the table: one row per (method, part); each row's bytes are what that method writes


@dataclass(frozen=True)
class Row:
    label: str
    method: str
    part: str
    cpu: str
    nbytes: str      # key of Result.nbytes
    parts: tuple[tuple[str, str], ...] = ()  # (part, short name) shown in the last column


# The plan runner's parts inside "copy" (scalai.storage.RunReport): its prepare (checking and
# grouping the plan, creating the files), then seconds summed over its threads: write
# (pwrite and kernel copies, waiting for the file's turn included), gather (strided windows
# through a buffer or into arrays), crc (CRC-32 of written blocks, and of the bytes around
# a run whose CRC is derived; with the source check, of every block of a source tensor the
# copy reads whole). scalai reshard's "verify‖" is the own time of the check of the other
# source tensors, alongside the copy (not a part of the total); "verify wait" what the
# commit waited for it.
_RUNNER = (("run_prepare", "prep"), ("run_write", "write·thr"), ("run_copy", "gather·thr"),
           ("run_checksum", "crc·thr"))
ROWS = (
    Row("scalai reshard", "scalai", "total", "cpu", "files",
        (("plan", "plan"), ("copy", "copy"), ("verify", "verify wait"), ("checksum", "crc"), ("sync", "fsync"),
         *_RUNNER, ("verified", "verify‖"))),
    Row("scalai reshard --no-verify", "scalai-noverify", "total", "cpu", "files",
        (("plan", "plan"), ("copy", "copy"), *_RUNNER, ("checksum", "crc"), ("sync", "fsync"))),
    Row("scalai load, files → RAM", "scalai-load", "total", "cpu", "ram",
        (("verify", "verify"), ("plan", "plan"), ("copy", "copy"))),
    Row("scalai load --no-verify", "scalai-load-noverify", "total", "cpu", "ram", (("plan", "plan"), ("copy", "copy"))),
    Row("scalai, RAM → RAM", "scalai-mem", "total", "cpu", "ram",
        (("plan", "plan"), ("copy", "copy"), ("run_prepare", "prep"), ("run_copy", "copy·thr"))),
    Row("(a) DCP load", "dcp", "load", "cpu_load", "dcp_ram"),
    Row("(a) DCP load + save", "dcp", "total", "cpu", "dcp_files", (("load", "load"), ("save", "save"))),
    Row("(b) consolidate → split", "consolidate", "total", "cpu", "files",
        (("consolidate", "consol."), ("split", "split"), ("commit", "commit"))),
    Row("(c) memory copy", "memcpy", "total", "cpu", "files"),
    Row("(c-t) the plan's windows copied", "windowcopy", "total", "cpu", "ram"),
    Row("(c') file copy", "filecopy", "total", "cpu", "files"),
    Row("(c'b) file copy through a buffer", "filecopy-rw", "total", "cpu", "files"),
    Row("(c'') file copy + CRC-32", "filecopy-crc", "total", "cpu", "files"),
)


@dataclass
class Result:
    transition: Transition
    nbytes: dict[str, int] = field(default_factory=dict)  # files, ram, dcp_ram, dcp_files, scratch
    samples: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def stats(self, method: str, part: str = "total") -> Stats | None:
        runs = self.samples.get(method)
        return Stats.of([r[part] for r in runs]) if runs and part in runs[0] else None

    def rate(self, row: Row) -> float | None:
        st = self.stats(row.method, row.part)
        return self.nbytes.get(row.nbytes, 0) / st.median if st and st.median else None


def _fmt(s: float) -> str:
    return f"{s:.2f}" if s < 100 else f"{s:.0f}"


def table_rows(results: list[Result]) -> tuple[list[list[str]], list[int]]:
    rows, sections = [], []
    for res in results:
        sections.append(len(rows))
        base = res.stats("scalai")
        entries = []
        for row in ROWS:
            st = res.stats(row.method, row.part)
            if st is None:
                continue
            cpu = res.stats(row.method, row.cpu)
            parts = " · ".join(f"{short} {_fmt(res.stats(row.method, p).median)}"
                               for p, short in row.parts if res.stats(row.method, p))
            if row.method == "consolidate" and res.nbytes.get("scratch"):
                parts += f" (+{res.nbytes['scratch'] / 1e9:.2f} GB scratch)"
            nbytes = res.nbytes.get(row.nbytes, 0)
            entries.append([row.label, f"{nbytes / 1e9:.2f}", _fmt(st.median), f"{_fmt(st.min)}–{_fmt(st.max)}",
                            f"{nbytes / st.median / 1e9:.2f}", f"{st.median / base.median:.2f}" if base else "",
                            _fmt(cpu.median) if cpu else "", parts])
        t = res.transition
        labels = [t.label, str(t.old), f"→ {t.new}", f"{t.old.world_size} → {t.new.world_size} ranks"]
        for j, e in enumerate(entries):
            rows.append([labels[j] if j < len(labels) else "", *e])
    return rows, sections


def _ratio(a: Stats | None, b: Stats | None) -> float | None:
    return a.median / b.median if a and b and b.median else None


def _paired(res: Result, a: str, b: str) -> Stats | None:
    """``a``'s time over ``b``'s, round by round (each round runs both within seconds of
    each other, so that a slow spell of a shared machine hits both sides of one ratio alike)."""
    ra, rb = res.samples.get(a), res.samples.get(b)
    if not ra or not rb or len(ra) != len(rb):
        return None
    return Stats.of([x["total"] / y["total"] for x, y in zip(ra, rb)])


_COPIES = {"filecopy": "(c') the kernel's copy", "filecopy-rw": "(c'b) the copy through a buffer"}


def _plain_copy(res: Result) -> str | None:
    """The plain file copy that scalai reshard is held against: the faster (by median) of
    (c') and (c'b) that ran, since which is faster depends on the file system."""
    ran = [m for m in _COPIES if res.stats(m)]
    return min(ran, key=lambda m: res.stats(m).median) if ran else None


def _per_round(res: Result, method: str, floor: str) -> str:
    paired = _paired(res, floor, method)
    if paired is None or paired.n < 2:
        return ""
    return f"; round by round: median {paired.median:.2f}, {paired.min:.2f}–{paired.max:.2f}"


def _where(res: Result, method: str, floor: float) -> str:
    """scalai reshard's median wall time cut into its phases, each also as a share of the
    file copy's time, and the plan runner's thread-seconds inside the copy phase."""
    med = lambda part: (res.stats(method, part).median if res.stats(method, part) else 0.0)  # noqa: E731
    phases = [("plan", med("plan")), ("copy", med("copy")), ("verify wait", med("verify")),
              ("crc read-back", med("checksum")), ("fsync + renames", med("sync"))]
    keys = ("plan", "copy", "verify", "checksum", "sync")  # the rest: per round, then its median
    rest = Stats.of([max(0.0, r["total"] - sum(r.get(k, 0.0) for k in keys)) for r in res.samples[method]])
    phases.append(("rest (open, CLI)", rest.median))
    text = ", ".join(f"{k} {v:.2f} s ({v / floor:.2f} of the file copy)" for k, v in phases if v >= 0.005)
    threads = " · ".join(f"{short} {med(p):.2f}" for p, short in _RUNNER[1:] + (("run_complete", "complete·thr"),)
                         if med(p) >= 0.005)
    checked = med("verified")
    return (text + (f"; inside copy, thread-seconds: {threads}" if threads else "")
            + (f"; the check of the source tensors the copy does not read whole ran alongside for {checked:.2f} s"
               if checked else ""))


def summary(results: list[Result], fs: str) -> list[str]:
    """Per transition: scalai against each baseline (time ratios, same work) and against
    the floors (rates, since the bytes differ)."""
    lines = []
    rows = {r.method + ":" + r.part: r for r in ROWS}
    for res in results:
        s, checks = res.stats("scalai"), []
        for key, what in (("dcp:total", "DCP load + save (files → files)"),
                          ("consolidate:total", "consolidate → split")):
            r = _ratio(res.stats(*key.split(":")), s)
            if r:
                checks.append(f"scalai reshard {r:.2f}x faster than {what}" if r >= 1 else
                              f"scalai reshard {1 / r:.2f}x slower than {what}")
        r = _ratio(res.stats("dcp", "load"), res.stats("scalai-load"))
        if r:
            nv = _ratio(res.stats("dcp", "load"), res.stats("scalai-load-noverify"))
            checks.append(f"files → RAM: DCP load takes {r:.2f}x scalai load's time (source verified)"
                          + (f", {nv:.2f}x scalai load --no-verify's" if nv else ""))
        plain = _plain_copy(res)
        floor = plain and res.stats(plain)
        if floor:
            if res.stats("filecopy") and res.stats("filecopy-rw"):
                other = "filecopy-rw" if plain == "filecopy" else "filecopy"
                checks.append(f"the faster plain file copy here: {_COPIES[plain]} "
                              f"({res.stats(other).median / floor.median:.2f}x faster than {_COPIES[other]})")
            for method in ("scalai", "scalai-noverify"):
                st = res.stats(method)
                if st:
                    copy = res.stats(method, "copy")
                    label = next(r.label for r in ROWS if r.method == method)
                    checks.append(f"{label} takes {st.median / floor.median:.2f}x the file copy's time on {fs} "
                                  f"(its copy phase alone {copy.median / floor.median:.2f}x; issue 13's target: "
                                  f"the file copy's time is at least 0.9 of scalai's, {floor.median / st.median:.2f} "
                                  f"here{_per_round(res, method, plain)})")
                    checks.append(f"where {label}'s time goes: " + _where(res, method, floor.median))
        checked = res.stats("filecopy-crc")
        if checked and res.stats("scalai"):
            line = (f"the checked file copy (c'': every byte read for its CRC-32 on the way, as scalai reshard's "
                    f"source check does) takes {checked.median / res.stats('scalai').median:.2f} of scalai "
                    f"reshard's time{_per_round(res, 'scalai', 'filecopy-crc')}")
            if floor:
                line += f"; the checked copy takes {checked.median / floor.median:.2f}x the plain copy's time"
            checks.append(line)
        mem = res.rate(rows["memcpy:total"])
        if mem:
            shares = [f"{label} {rate / mem:.2f}" for label, key in (("scalai reshard", "scalai:total"),
                                                                    ("RAM → RAM", "scalai-mem:total"),
                                                                    ("(c-t) the plan's windows copied alone",
                                                                     "windowcopy:total"),
                                                                    ("file copy", "filecopy:total"))
                      if (rate := res.rate(rows[key]))]
            checks.append("rate as a share of memory copy's: " + ", ".join(shares)
                          + " (issue 13's target for RAM → RAM: 0.8)")
        lines += [f"{res.transition.label}:"] + [f"  - {c}" for c in checks]
    return lines


# ---------------------------------------------------------------------------------------
# driver


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


def _dir_bytes(path: str, suffix: str = "") -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs if f.endswith(suffix))


def _rm(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.model, self.seed, self.workers = args.model, args.seed, args.workers
        self.cores = os.cpu_count() or 1
        self.transitions = [Transition.parse(t) for t in (args.transition or DEFAULT_TRANSITIONS)]
        self.methods = [m for m in METHODS if m in args.methods.split(",")]
        size = {str(c): sum(model_ptc(self.model, c).rank_nbytes(r) for r in range(c.world_size))
                for t in self.transitions for c in (t.old, t.new)}
        state = sum(s.nbytes for s in model_ptc(self.model, ParallelConfig()).specs)
        # on storage at once: old + new checkpoints, DCP's copy, consolidated tensors, one output;
        # in RAM besides: the in-memory arrays (old + new), DCP's loaded ranks, (c)'s buffers
        files = max(size[str(t.old)] + 2 * size[str(t.new)] + 2 * state for t in self.transitions)
        ram = max(size[str(t.old)] + 2 * size[str(t.new)] for t in self.transitions) + (1 << 30)
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
            log(f"transition {i + 1}/{len(self.transitions)}: {t.old} → {t.new} ({t.label})")
            later = {str(c) for u in self.transitions[i + 1:] for c in (u.old, u.new)}
            later_old = {str(u.old) for u in self.transitions[i + 1:]}
            results.append(self.run_transition(t, later, later_old))
            self.release(later)
        return results

    def verify(self, case: Case, ref: str, result: Result) -> None:
        """Every method's result checked against ``ref`` (the new layout synthesized
        directly), and the bytes each writes measured; nothing here is timed."""
        log("  verifying every method against the synthesized new layout")
        run = scalai_cli(case, verify=True)
        run()
        self.expect_equal(case.out("scalai"), ref, "scalai reshard")
        case.file_sizes = [os.path.getsize(os.path.join(case.out("scalai"), f))
                           for f in sorted(os.listdir(case.out("scalai"))) if f.endswith(".safetensors")]
        result.nbytes["files"] = sum(case.file_sizes)
        _rm(case.out("scalai"))
        new_ptc = model_ptc(self.model, case.new)
        result.nbytes["ram"] = sum(new_ptc.rank_nbytes(r) for r in range(case.new.world_size))
        for method, run in (("scalai-mem", lambda: scalai_load(case, verify=False, from_files=False)()),
                            ("scalai-load", lambda: scalai_load(case, verify=False)()),
                            ("windowcopy", lambda: window_copy(case)())):
            if method in self.methods or method + "-noverify" in self.methods:
                run()
                with Checkpoint.open(ref) as ckpt:
                    for r, tensors in case.last_arrays.items():
                        for n, array in tensors.items():
                            if not np.array_equal(array, ckpt.view(r, n)):
                                raise SystemExit(f"{method} produced wrong values in {n} of rank {r}")
                case.last_arrays = None
                log(f"  {method}: new arrays equal the synthesized new layout")
        if "consolidate" in self.methods:
            consolidate_split(case)()
            self.expect_equal(case.out("split"), ref, "consolidate → split")
            written = _dir_bytes(case.out("split"), ".safetensors")
            if written != result.nbytes["files"]:
                raise SystemExit(f"consolidate → split wrote {written} bytes of rank files, scalai "
                                 f"{result.nbytes['files']}: they would not compare the same work")
            result.nbytes["scratch"] = _dir_bytes(case.out("consolidated"), ".bin")
            _rm(case.out("consolidated"))
            _rm(case.out("split"))
        if case.dcp is not None:
            runs = case.dcp.call("load", src=case.dcp_src, out=case.out("dcp-new"), verify=dcp_sample(self.model),
                                 seed=self.seed)
            bad = sorted({n for r in runs for n in r["bad"]})
            if bad:
                raise SystemExit(f"DCP loaded wrong values into {', '.join(bad)}")
            result.nbytes["dcp_ram"] = sum(r["nbytes"] for r in runs)
            result.nbytes["dcp_files"] = _dir_bytes(case.out("dcp-new"))
            _rm(case.out("dcp-new"))
            log(f"  DCP: loaded values equal the synthetic ones ({sum(r['checked'] for r in runs)} local "
                f"tensors checked on their first and last rows, {sum(r['checked_whole'] for r in runs)} whole)")

    def run_transition(self, t: Transition, later: set[str], later_old: set[str]) -> Result:
        result = Result(t)
        case = Case(self.checkpoint(t.old), t.new, self.workdir, self.workers, self.seed)
        ref = self.checkpoint(t.new)
        try:
            if "dcp" in self.methods:
                log(f"  DCP setup: {t.old.world_size} ranks save the old layout with dcp.save")
                case.dcp_src = case.out("dcp-old")
                self.job(t.old).call("save_from", src=case.src, out=case.dcp_src)
                self.release_jobs({str(t.new)} | later_old)
                case.dcp = self.job(t.new)
            self.verify(case, ref, result)
            if str(t.new) not in later:
                self.release({str(t.old)} | later)  # the reference is no longer needed
            for r in range(self.args.warmup):  # untimed: first touches of fresh memory fall here
                for m in self.methods:
                    measure(METHODS[m], case)
                log(f"  warm-up round {r + 1}/{self.args.warmup} (not counted)")
            shuffle = random.Random(self.seed)
            for r in range(self.args.repeats):
                order = list(self.methods)
                shuffle.shuffle(order)  # no method always follows the same one
                for m in order:
                    result.samples.setdefault(m, []).append(measure(METHODS[m], case))
                log(f"  round {r + 1}/{self.args.repeats}: "
                    + ", ".join(f"{m} {result.samples[m][-1]['total']:.2f}s" for m in self.methods))
        finally:
            self.release_jobs(later_old)
            _rm(case.out("dcp-old"))
        return result

    def expect_equal(self, out: str, ref: str, what: str) -> None:
        with Checkpoint.open(out) as x, Checkpoint.open(ref) as y:
            diff = compare_checkpoints(x, y)
        if diff is not None:
            raise SystemExit(f"{what} produced a wrong checkpoint: {diff}")
        log(f"  {what}: output equals the synthesized new layout")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-small", help="model shape (scalai synth names; default gpt2-small)")
    p.add_argument("--transition", action="append",
                   help="OLD:NEW layouts, e.g. 'tp=2,pp=1,dp=1:tp=1,pp=2,dp=1' (repeatable; "
                        "default: a TP, a PP and a DP/ZeRO change)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds per transition (default 5: one round's ratio moves by a fifth on a shared VM)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed rounds of every method before the timed ones (default 1)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="threads for scalai, (b), (c), (c-t), (c'), (c'b), (c'') (default: scalai's, one per core up to 8)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--workdir", help="scratch parent directory (default /dev/shm when it has room, else /tmp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("rich", "markdown", "plain"), default="rich")
    p.add_argument("--json", help="also write the raw samples to this file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    try:
        for t in args.transition or ():
            Transition.parse(t)
    except ValueError as exc:
        p.error(str(exc))

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the scratch directory on kill
    bench = Bench(args)
    machine, revision, load_before = machine_description(), scalai_revision(), os.getloadavg()
    log(f"model {args.model}, {len(bench.transitions)} transitions, {args.repeats} rounds, "
        f"{args.workers} workers; scratch {bench.storage}")
    try:
        results = bench.run()
    finally:
        bench.release_jobs(set())
        _rm(bench.workdir)

    rows, sections = table_rows(results)
    title = (f"Reshard of {args.model} state, median of {args.repeats} rounds (wall seconds); GB = bytes the "
             f"method writes; GB/s = those bytes / time; ÷scalai = time / scalai reshard's; CPU s = user + "
             f"system CPU seconds (all threads; all ranks for DCP)")
    print_table(title, ["transition", "method", "GB", "median s", "min–max s", "GB/s", "÷scalai", "CPU s",
                        "parts (median s)"], rows, sections, args.format)
    print()
    fs = bench.storage.split("(")[1].split(",")[0] if "(" in bench.storage else "?"
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}; {machine['os']}; "
          f"python {machine['python']}, numpy {machine.get('numpy')}, torch {machine.get('torch')}; "
          f"{machine['date']}")
    print(f"scalai: {revision}; {args.workers} threads for scalai, (b), (c), (c-t), (c'), (c'b), (c''); "
          f"DCP: one process per new rank, cores / ranks threads each")
    print(f"storage: {bench.storage}; every method that writes files fsyncs them; destination arrays of the "
          f"loads (scalai and DCP) allocated and pre-faulted before timing; the objects alive before the clock "
          f"frozen out of the garbage collector's reach (gc.freeze) in every process that runs a method; "
          f"{args.warmup} untimed warm-up round(s) of every method before the timed ones")
    load_after = os.getloadavg()
    print(f"load average (1 min) at start {load_before[0]:.1f}, at end {load_after[0]:.1f} "
          f"({machine['cores']} cores; above that count, other processes competed for the CPU)")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print("bytes: scalai reshard, (b), (c), (c'), (c'b), (c''): the new rank files (replicas once, padding included); loads, "
          "RAM → RAM and (c-t): every new rank's arrays (replicas per rank); DCP load: its ranks' tensors (no "
          "padding); DCP load + save: the files dcp.save wrote")
    if any(r.nbytes.get("files", 0) < 1e9 for r in results):
        print("note: transitions that write less than 1 GB; use --model gpt2-small or larger for the record")
    print("summary (scalai reshard = the CLI's default, source verified):")
    for line in summary(results, fs):
        print("  " + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "storage": bench.storage, "argv": sys.argv, "scalai": revision,
                       "loadavg": [load_before[0], load_after[0]],
                       "results": [{"transition": f"{r.transition.old}:{r.transition.new}",
                                    "label": r.transition.label, "nbytes": r.nbytes, "samples": r.samples}
                                   for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
