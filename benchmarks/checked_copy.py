"""How fast can a file be copied while every byte is checked? The floor under a reshard
whose source check is on.

``scalai reshard`` checks by default that every source tensor still has its recorded
CRC-32, so each byte it copies whole must also be read by the process; ``reshard.py``'s
(c'') line is one way to do that. This script holds several ways against the kernel's own
copy of the same bytes, in the same run, to show how close any checked copy can come:

- **kernel copy**: ``copy_file_range`` in 64 MiB chunks, no byte through the process (the
  (c') line of ``reshard.py``);
- **read + CRC + write**: ``pread`` into a buffer of each thread's (page-aligned, reused),
  CRC-32 while the block is in cache, ``pwrite``, for several block sizes (``reshard.py``'s
  (c''), and what scalai's runner does for the tensors its check reads);
- **CRC of a map, then kernel copy**: each block's CRC-32 computed through a read-only
  memory map of the source, then the block copied by the kernel (its bytes then come from
  the cache);
- **kernel copy, then CRC of a map**: each block copied by the kernel, then its CRC-32
  computed through a memory map of the destination (which checks what was written).

One source file of ``--gb`` gigabytes in ``--workdir`` (default ``/dev/shm``), split
between ``--workers`` threads, each writing its half into a file of its own; every method
fsyncs its files; the rounds are interleaved (every method once a round, in an order
shuffled each round). The table prints each method's median time, its rate, and the kernel
copy's time over its own (1.0 = as fast as the kernel copy). Nothing is asserted.

Usage::

    .venv/bin/python benchmarks/checked_copy.py                 # 1.74 GB (gpt2-small's state), 7 rounds
    .venv/bin/python benchmarks/checked_copy.py --gb 0.2 --rounds 3   # smoke run
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import signal
import sys
import threading
import time
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Stats, choose_workdir, log, machine_description, print_table  # noqa: E402

from scalai.storage.checksum import crc32  # noqa: E402

_KERNEL_CHUNK = 64 << 20
_PAGE = mmap.PAGESIZE


def _kernel(fi: int, fo: int, lo: int, hi: int, block: int) -> None:
    at = lo
    while at < hi:
        at += os.copy_file_range(fi, fo, min(_KERNEL_CHUNK, hi - at), at, at - lo)


def _read_crc_write(fi: int, fo: int, lo: int, hi: int, block: int) -> None:
    buf = np.empty(block + _PAGE, np.uint8)
    view = memoryview(buf[-buf.ctypes.data % _PAGE:][:block])  # page-aligned, as the file's blocks
    at = lo
    while at < hi:
        n = os.preadv(fi, [view[:min(block, hi - at)]], at)
        crc32(view[:n])
        os.pwrite(fo, view[:n], at - lo)
        at += n


def _mapped(fi: int, fo: int, lo: int, hi: int, block: int, crc_first: bool) -> None:
    if crc_first:
        m = mmap.mmap(fi, hi - lo, prot=mmap.PROT_READ, offset=lo)
    else:
        os.ftruncate(fo, hi - lo)
        m = mmap.mmap(fo, hi - lo, prot=mmap.PROT_READ)
    with m, memoryview(m) as mapped:
        at = lo
        while at < hi:
            n = min(block, hi - at)
            if crc_first:
                crc32(mapped[at - lo:at - lo + n])
            done = 0
            while done < n:
                done += os.copy_file_range(fi, fo, n - done, at + done, at - lo + done)
            if not crc_first:
                crc32(mapped[at - lo:at - lo + n])
            at += n


Copy = Callable[[int, int, int, int, int], None]


def methods(blocks: list[int]) -> dict[str, tuple[Copy, int]]:
    out: dict[str, tuple[Copy, int]] = {"kernel copy": (_kernel, _KERNEL_CHUNK)}
    for b in blocks:
        out[f"read + CRC + write, {b >> 10} KiB blocks"] = (_read_crc_write, b)
    out["CRC of the source's map, then kernel copy (4 MiB)"] = (
        lambda fi, fo, lo, hi, b: _mapped(fi, fo, lo, hi, b, True), 4 << 20)
    out["kernel copy, then CRC of the destination's map (4 MiB)"] = (
        lambda fi, fo, lo, hi, b: _mapped(fi, fo, lo, hi, b, False), 4 << 20)
    return out


def run_once(copy: Copy, block: int, src: str, out: str, workers: int) -> float:
    """Seconds to copy ``src`` into ``workers`` files (one part each, in parallel), fsynced."""
    size = os.path.getsize(src)
    per = size // workers // _PAGE * _PAGE
    fi = os.open(src, os.O_RDONLY)
    outs = [os.open(os.path.join(out, f"part-{w}"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            for w in range(workers)]
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            lo = w * per
            copy(fi, outs[w], lo, size if w == workers - 1 else lo + per, block)
            os.fsync(outs[w])
        except BaseException as exc:  # noqa: BLE001 - raised below
            errors.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    for fd in (fi, *outs):
        os.close(fd)
    for w in range(workers):
        os.unlink(os.path.join(out, f"part-{w}"))
    if errors:
        raise errors[0]
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gb", type=float, default=1.74, help="size of the source file (default: gpt2-small's state)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--workers", type=int, default=2, help="threads, each copying its part into a file of its own")
    p.add_argument("--workdir", default="/dev/shm")
    p.add_argument("--blocks", default="256,1024,4096", help="read + CRC + write block sizes, KiB")
    p.add_argument("--format", choices=("rich", "markdown", "plain"), default="rich")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.gb <= 64 or args.rounds < 1 or not 1 <= args.workers <= 64:
        p.error("--gb must be in (0, 64], --rounds at least 1, --workers in 1..64")
    try:
        blocks = [int(b) << 10 for b in args.blocks.split(",")]
    except ValueError:
        p.error(f"--blocks {args.blocks!r} is not a list of sizes in KiB such as 256,1024,4096")
    if any(not 4 <= b >> 10 <= 1 << 20 for b in blocks):
        p.error("--blocks: each size must be 4 KiB to 1 GiB")
    size = int(args.gb * 1e9) // _PAGE * _PAGE
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # remove the scratch directory on kill
    workdir, where = choose_workdir(2 * size, 0, args.workdir, "checked-copy")
    try:
        src = os.path.join(workdir, "source.bin")
        log(f"writing a {size / 1e9:.2f} GB source file in {where}")
        rng = np.random.default_rng(args.seed)
        with open(src, "wb") as f:
            for at in range(0, size, 64 << 20):
                f.write(rng.integers(0, 256, min(64 << 20, size - at), dtype=np.uint8).tobytes())
        table = methods(blocks)
        times: dict[str, list[float]] = {m: [] for m in table}
        order = list(table)
        shuffle = random.Random(args.seed)
        for m in order:  # warm-up, untimed: the first writes into memory the VM's host took back
            run_once(*table[m], src, workdir, args.workers)
        for r in range(args.rounds):
            shuffle.shuffle(order)
            for m in order:
                times[m].append(run_once(*table[m], src, workdir, args.workers))
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{times[m][-1]:.3f}s" for m in table))
    finally:
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
    floor = Stats.of(times["kernel copy"]).median
    rows = []
    for m in table:
        st = Stats.of(times[m])
        rows.append([m, f"{st.median:.3f}", f"{st.min:.3f}–{st.max:.3f}", f"{size / st.median / 1e9:.2f}",
                     f"{floor / st.median:.2f}"])
    print_table(f"Copying {size / 1e9:.2f} GB with {args.workers} threads, median of {args.rounds} rounds",
                ["method", "median s", "min–max s", "GB/s", "kernel copy's time ÷ its"], rows, fmt=args.format)
    machine = machine_description()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; {machine['os']}; python {machine['python']}; "
          f"{machine['date']}; storage: {where}; every method fsyncs its files")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
