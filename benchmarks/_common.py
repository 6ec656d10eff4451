"""Helpers shared by the benchmark scripts: progress lines, timing statistics, scratch
storage, a description of the machine and table output.

Benchmarks print one table measured in one run, with ratios against baselines measured in
the same run (the machines we run on are shared and noisy); nothing here asserts on time.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Sequence

__all__ = ["log", "Stats", "machine_description", "mem_available", "choose_workdir",
           "fs_type", "print_table", "markdown_table"]

_T0 = time.perf_counter()


def log(message: str) -> None:
    """One progress line on stderr, prefixed with the seconds since the script started."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Stats:
    """Median, minimum and maximum of repeated measurements (seconds)."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))


def mem_available() -> int:
    """Bytes of memory the kernel says are available (``MemAvailable``), 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fs_type(path: str) -> str:
    """File-system type of the mount holding ``path`` (``tmpfs``, ``ext4``...), or ``?``."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) > len(best):
                        best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def choose_workdir(need_bytes: int, ram_bytes: int, requested: str | None, tag: str) -> tuple[str, str]:
    """A fresh scratch directory and a description of its storage.

    ``requested`` wins when given. Otherwise the tmpfs ``/dev/shm`` (RAM: it measures the
    software rather than a disk) is used when it has room for ``need_bytes`` of files and
    the memory available still holds them, ``ram_bytes`` that the run allocates besides,
    and 4 GiB to spare; else ``/tmp`` (through the page cache, which the kernel can evict).
    """
    if requested:
        parent = requested
        _check_room(requested, need_bytes, ram_bytes)
    else:
        parent = "/tmp"
        if os.path.isdir("/dev/shm"):
            free = shutil.disk_usage("/dev/shm").free
            if free >= need_bytes and mem_available() - need_bytes - ram_bytes >= 4 << 30:
                parent = "/dev/shm"
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f"{tag}-{os.getpid()}")
    os.makedirs(path)
    kind = fs_type(path)
    what = "RAM-backed, no disk I/O" if kind == "tmpfs" else "disk, through the page cache"
    return path, f"{path} ({kind}, {what})"


def _check_room(parent: str, need_bytes: int, ram_bytes: int) -> None:
    """Refuse, in one line, a requested scratch directory without room for the run's files
    (on tmpfs: in memory, besides what the run allocates): better than an OOM kill halfway."""
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise SystemExit(f"--workdir {parent}: the run writes about {gb(need_bytes)} of files there and "
                         f"{gb(free)} are free; free some space or choose another directory")
    available = mem_available()
    if fs_type(probe) == "tmpfs" and available and available < need_bytes + ram_bytes:
        raise SystemExit(f"--workdir {parent} is in memory (tmpfs): the run needs about {gb(need_bytes)} of "
                         f"files there and {gb(ram_bytes)} of memory besides, and {gb(available)} are available; "
                         f"free memory (old files in {probe}?) or choose a directory on disk")


def machine_description() -> dict[str, str]:
    """CPU, cores, memory, OS and library versions, for the record next to the figures."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    total = 0
    try:
        with open("/proc/meminfo") as f:
            total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "cores": str(os.cpu_count()), "memory": f"{total / 2**30:.1f} GiB",
           "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    for module in ("numpy", "torch"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            pass
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (numbers right-aligned)."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    aligns = ["---:" if rows and all(_numeric(r[i]) for r in rows if r[i]) else "---"
              for i in range(len(headers))]
    lines = ["| " + " | ".join(map(cell, headers)) + " |", "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    t = str(text).strip().rstrip("x×%").replace("–", "").replace(".", "").replace(" ", "")
    return t.isdigit()


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]],
                sections: Sequence[int] = (), fmt: str = "rich") -> None:
    """Print a table on stdout: ``rich`` (a box table, when rich is installed), ``markdown``
    or ``plain``. ``sections`` are row indices before which a separator is drawn."""
    if fmt == "markdown":
        print(f"**{title}**\n\n{markdown_table(headers, rows)}")
        return
    if fmt == "rich":
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            fmt = "plain"
        else:
            table = Table(title=title, title_justify="left")
            for i, h in enumerate(headers):
                table.add_column(h, justify="right" if rows and all(_numeric(r[i]) for r in rows if r[i])
                                 else "left")
            for i, r in enumerate(rows):
                if i in sections and i:
                    table.add_section()
                table.add_row(*map(str, r))
            Console(width=max(160, shutil.get_terminal_size().columns)).print(table)
            return
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print(title)
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    for i, r in enumerate(rows):
        if i in sections and i:
            print("  ".join("-" * w for w in widths))
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
