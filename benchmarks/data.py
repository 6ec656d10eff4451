"""Read throughput of a rank's samples: FUSE view vs Python API vs plain reads of the sources.

    .venv/bin/python benchmarks/data.py [--size-mb 512] [--seq-len 1024] [--cold]

Builds a uint16 token file of ``--size-mb`` MiB, indexes it, then reads every sample once:

(c) baseline   plain sequential reads of the source file, one ``readinto`` per sample
(c') bulk      plain sequential reads of the source file in 1 MiB chunks (an upper bound)
(b) API        ``TokenDataset.batch`` over the shuffled micro-batches of rank 0 of dp=1,
               in the global order (random access), uint16 tokens as they are stored
(b') loader    ``ElasticDataLoader`` with 2 workers, int64 token tensors (what training gets)
(a) FUSE       ``MOUNT/rank-0/samples.bin`` read sequentially in 1 MiB chunks

Ratios are against (c), measured in the same run. ``--cold`` drops the page cache before
each measurement (root only); without it every reader sees the file in the page cache.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scalai.data import (DataState, Division, ElasticDataLoader, TokenDataset,  # noqa: E402
                         build_index, rank_plan)
from scalai.data.vfs import fuse_unavailable_reason, is_mounted  # noqa: E402


def _drop_caches(cold: bool) -> None:
    if cold:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _timed(fn, cold: bool) -> tuple[float, int]:
    _drop_caches(cold)
    start = time.perf_counter()
    nbytes = fn()
    return time.perf_counter() - start, nbytes


def plain_reads(path: Path, chunk: int) -> int:
    buffer, total = bytearray(chunk), 0
    with open(path, "rb", buffering=0) as f:
        while (got := f.readinto(buffer)) > 0:
            total += got
    return total


def api_reads(dataset: TokenDataset, micro_batches: list[np.ndarray]) -> int:
    total = 0
    for ids in micro_batches:
        total += dataset.reader.tokens(ids).nbytes
    return total


def loader_reads(index, state: DataState, steps: int, micro: int) -> int:
    loader = ElasticDataLoader(index, state, dp=1, rank=0, micro_batch_size=micro, steps=steps, num_workers=2)
    return sum(item["tokens"].shape[0] for item in loader) * index.sample_bytes


def fuse_reads(index_path: Path, mnt: Path, global_batch: int, steps: int) -> int:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from scalai.cli.main import main; sys.exit(main())",
                             "data", "mount", str(index_path), str(mnt), "--seed", "0", "--global-batch",
                             str(global_batch), "--dp", "1", "--steps", str(steps)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (is_mounted(mnt) and (mnt / "state.json").exists()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the mount did not come up")
            time.sleep(0.05)
        (mnt / "rank-0" / "index.json").read_bytes()  # plan the view before timing
        return plain_reads(mnt / "rank-0" / "samples.bin", 1 << 20)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="scalai-bench-") as tmp:
        tmp = Path(tmp)
        source = tmp / "train.bin"
        rng = np.random.default_rng(0)
        with open(source, "wb") as f:
            for _ in range(args.size_mb):
                rng.integers(0, 50_000, 1 << 19, dtype=np.uint16).tofile(f)
        start = time.perf_counter()
        index = build_index([source], tmp / "idx", args.seq_len)
        build_s = time.perf_counter() - start
        n, sb = index.num_samples, index.sample_bytes
        batch = args.micro_batch * 8
        steps = n // batch
        state = DataState(seed=0, global_batch=batch, num_samples=n)
        ids = rank_plan(state, Division(batch, 1, micro_batch_size=args.micro_batch), 0, steps).sample_ids
        micro_batches = np.split(ids, len(ids) // args.micro_batch)
        dataset = TokenDataset(index)
        plain_reads(source, 1 << 20)  # warm the page cache (and the file system) once

        rows = [("(c) plain reads, one per sample", lambda: plain_reads(source, sb)),
                ("(c') plain reads, 1 MiB chunks", lambda: plain_reads(source, 1 << 20)),
                ("(b) Python API, shuffled micro-batches", lambda: api_reads(dataset, micro_batches)),
                ("(b') ElasticDataLoader, 2 workers", lambda: loader_reads(index, state, steps, args.micro_batch))]
        reason = fuse_unavailable_reason()
        if reason is None:
            mnt = tmp / "mnt"
            mnt.mkdir()
            rows.append(("(a) FUSE rank-0/samples.bin, 1 MiB reads",
                         lambda: fuse_reads(index.path, mnt, batch, steps)))
        results = [(name, *_timed(fn, args.cold)) for name, fn in rows]

    base = results[0][2] / results[0][1]
    print(f"corpus {args.size_mb} MiB uint16, {n:,} samples of {args.seq_len}+1 tokens ({sb} B); "
          f"index built in {build_s:.3f} s ({args.size_mb / 1024 / build_s:.1f} GiB/s of input); "
          f"{'cold' if args.cold else 'warm'} page cache; {os.cpu_count()} CPUs")
    print(f"{'reader':44} {'MiB':>8} {'s':>7} {'MiB/s':>9} {'vs (c)':>7}")
    for name, seconds, nbytes in results:
        rate = nbytes / seconds
        print(f"{name:44} {nbytes / 2**20:8.0f} {seconds:7.3f} {rate / 2**20:9.0f} {rate / base:7.2f}")
    if reason is not None:
        print(f"(a) FUSE not measured: {reason}")


if __name__ == "__main__":
    main()
