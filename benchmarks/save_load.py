"""Save and load of the reference job's state: scalai.training against PyTorch DCP.

One run prints one table measured in that run. The job is the reference trainer's GPT
(``--model``, default ``gpt-bench``: 26 M parameters; fp32 weights and two fp32 Adam moments
per weight, ~300 MiB of state), built with PyTorch's own APIs under layout A on one process
per rank (gloo, ``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), its optimizer state
filled with deterministic values, then:

1. **save at A**, every rank at once, each side into a fresh directory:
   - scalai: :func:`scalai.training.save`. Each rank ``pwrite``s the bytes of its live local
     tensors (no staging copy) into its own preallocated safetensors file, each replica
     once (the rank ``PTC.replica_owner`` names), computes their CRC-32s with a pool of
     ``THREADS`` threads, fsyncs the file; rank 0 writes the manifest, fsyncs and renames
     the directory into place.
   - DCP: ``dcp.save`` of ``get_state_dict(model, optimizer)`` with
     ``FileSystemWriter(sync_files=True, thread_count=THREADS)``: the same thread count per
     rank; DCP plans the save collectively, writes each replicated tensor once, one file per
     rank (``torch.save`` serialization), fsyncs, and rank 0 writes the metadata.
2. **load at B**, into the same processes rebuilt under layout B (another TP x PP x DP,
   ZeRO on or off), from the files saved at A; before every load the live tensors are
   overwritten with a sentinel (untimed), so that a load that skipped a tensor would show:
   - scalai: :func:`scalai.training.load` as a job calls it by default (``verify=True``):
     every saved byte's CRC-32 recomputed (each rank 1/world of the saved files, ``THREADS``
     threads), one plan, region copies from memory-mapped files straight into the live
     tensors (one thread per rank) with the exactly-once check, non-tensor state restored.
     ``verify=False`` (not the default) is printed too, labelled so.
   - DCP: ``dcp.load`` into ``get_state_dict(model_b, optimizer_b)`` then
     ``set_state_dict`` (resharding on load; ``FileSystemReader`` reads on one thread per
     rank). DCP has no checksums.
   After every round the live tensors of B are compared bit for bit across the loads.

Times are wall seconds of the slowest rank (each timed step starts after a barrier).
Throughput is the job's global state (one copy of every tensor) over the time, for both
systems alike; the files each side wrote are printed. Repeats are interleaved and the order
of the methods rotates every round; the table shows median, min and max. Loads read files
the saves just wrote (page cache warm on disk, RAM on tmpfs), so the figures measure the
software, not a cold disk.

Usage::

    .venv/bin/python benchmarks/save_load.py                     # gpt-bench, 3 repeats, ~2 minutes
    .venv/bin/python benchmarks/save_load.py --model gpt-tiny --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stats, choose_workdir, log, machine_description, print_table  # noqa: E402

#: Threads per rank for both sides: scalai's default (one per core, at most 8) for its
#: checksums, and DCP's ``FileSystemWriter(thread_count=...)``.
THREADS = max(1, min(8, os.cpu_count() or 1))

#: A TP+PP job moving to ZeRO with PP, that one moving to TP+DP, and a replicated DP job
#: (each replica written once by both sides).
DEFAULT_TRANSITIONS = ("tp=2,pp=2,dp=1:tp=1,pp=2,dp=2,zero=1", "tp=1,pp=2,dp=2,zero=1:tp=2,pp=1,dp=2",
                       "tp=1,pp=1,dp=4:tp=2,pp=2,dp=1")


def _fill_optimizer(job) -> None:
    """Deterministic non-zero Adam moments and step count (a job mid-training)."""
    import torch

    for name, tensor in job.local_tensors().items():
        if name.startswith("optimizer."):
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # same on every replica
            tensor.copy_(torch.rand(tensor.shape, generator=g) + (0.0 if "exp_avg_sq" in name else -0.5))
    for state in job.optimizer.state.values():
        state["step"].fill_(100.0)
    job.step = 100


def _timed(fn):
    """Run ``fn`` after a barrier on every rank; the slowest rank's seconds."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    box = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return float(box.item())


def _dcp_state(run):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(run.stage.module, run.optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _rotated(methods: list, r: int) -> list:
    k = r % len(methods)
    return methods[k:] + methods[:k]


def _writer_reader(base: str):
    """DCP's own storage for ``base``: its filesystem writer and reader, or for a URL its
    fsspec ones (``FsspecWriter``/``FsspecReader``, the same thread count)."""
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    if "://" in base:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

        from scalai.checkpoint.uploads import SINGLE_PUT_BYTES

        # no fsync on an object store: an upload is durable once it completes; s3fs's block
        # as large as scalai's one-PUT size, so that DCP's files below it go up in one PUT too
        # (with s3fs's default 50 MiB block a file of 50-100 MiB would be a multipart upload)
        return (lambda path: FsspecWriter(path, sync_files=False, thread_count=THREADS,
                                          default_block_size=SINGLE_PUT_BYTES)), FsspecReader
    return (lambda path: FileSystemWriter(path, sync_files=True, thread_count=THREADS)), FileSystemReader


def worker(args) -> None:
    """One rank: build A, save both ways (and in the background both ways); rebuild as B,
    load every way, compare."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from scalai.examples.gpt.options import TrainOptions
    from scalai.examples.gpt.train import build
    from scalai.training import close, load, save

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    async_group = dist.new_group(backend="gloo")  # DCP's async save runs its collectives on its own group
    rank = dist.get_rank()
    a, b = args.transition[0].split(":")
    base = args.base
    writer_of, reader_of = _writer_reader(base)
    results = {"save": {"scalai": [], "dcp": []},
               "background": {"scalai": [], "dcp": [], "scalai_total": [], "dcp_total": []},
               "load": {"scalai": [], "scalai_noverify": [], "dcp": []}}
    run_a = build(TrainOptions(layout=a, steps=1, model=args.model, data=args.data))
    _fill_optimizer(run_a.job)
    state_bytes = sum(s.nbytes for s in run_a.job.ptc.specs)
    written = 0
    for r in range(args.repeats):
        saves = [("scalai", lambda: save(run_a.job, f"{base}/s{r}")),
                 ("dcp", lambda: dcp.save(_dcp_state(run_a), storage_writer=writer_of(f"{base}/d{r}")))]
        for name, fn in _rotated(saves, r):
            results["save"][name].append(_timed(fn))
        if args.background:
            pending = []
            bg = [("scalai", lambda: save(run_a.job, f"{base}/bs{r}", background=True), lambda: close(run_a.job)),
                  ("dcp", lambda: pending.append(dcp.async_save(
                      _dcp_state(run_a), storage_writer=writer_of(f"{base}/bd{r}"), process_group=async_group)),
                   lambda: pending.pop().result())]
            for name, start, done in _rotated(bg, r):
                stall = _timed(start)   # what training waits for
                rest = _timed(done)     # until the version is complete
                results["background"][name].append(stall)
                results["background"][f"{name}_total"].append(stall + rest)
    if rank == 0:
        written = {k: _stored_bytes(f"{base}/{k}0") for k in ("s", "d")}

    run_b = build(TrainOptions(layout=b, steps=1, model=args.model, data=args.data))
    mismatches = 0
    for r in range(args.repeats):
        def dcp_load():
            state = _dcp_state(run_b)
            dcp.load(state, storage_reader=reader_of(f"{base}/d{r}"))
            set_state_dict(run_b.stage.module, run_b.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])

        loads = [("scalai", lambda: load(run_b.job, f"{base}/s{r}")),  # verify=True: the default
                 ("scalai_noverify", lambda: load(run_b.job, f"{base}/s{r}", verify=False)),
                 ("dcp", dcp_load)]
        loaded = {}
        for name, fn in _rotated(loads, r):
            with torch.no_grad():
                for t in run_b.job.local_tensors().values():
                    t.fill_(-7.0)  # a sentinel: a tensor the load skipped would differ (untimed)
            results["load"][name].append(_timed(fn))
            loaded[name] = {n: t.clone() for n, t in run_b.job.local_tensors().items()}
        ours = loaded["scalai"]
        mismatches += sum(not torch.equal(ours[n], other[n]) for other in loaded.values() for n in ours)
    box = torch.tensor([mismatches])
    dist.all_reduce(box)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"results": results, "state_bytes": state_bytes,
                                              "written": written, "mismatches": int(box.item()),
                                              "tensors": len(run_b.job.ptc.specs)}))
    dist.destroy_process_group()


def _stored_bytes(location: str) -> int:
    """Bytes of every file (or object) under ``location``."""
    if "://" in location:
        import fsspec

        fs, root = fsspec.core.url_to_fs(location)
        return int(fs.du(root))
    return sum(f.stat().st_size for f in Path(location).rglob("*") if f.is_file())


def _s3_server() -> tuple[subprocess.Popen, dict, str]:
    """moto's S3 server on loopback (the tests' one, in its own process) and a bucket:
    the process, the environment the workers get, the bucket."""
    import boto3

    script = Path(__file__).resolve().parent.parent / "tests" / "s3_server.py"
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    endpoint = f"http://127.0.0.1:{int(proc.stdout.readline())}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket="scalai-bench")
    return proc, env, "scalai-bench"


def _row(label: str, samples: list[float], nbytes: int, base: float | None) -> list[str]:
    s = Stats.of(samples)
    ratio = f"{base / s.median:.2f}x" if base else ""
    return [label, f"{s.median:.3f}", f"{s.min:.3f}–{s.max:.3f}", f"{nbytes / s.median / 2**30:.2f}", ratio]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt-bench")
    parser.add_argument("--transition", action="append", help="A:B layouts of equal world size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--format", default="rich", choices=["rich", "markdown", "plain"])
    parser.add_argument("--storage", default="file", choices=["file", "s3"],
                        help="file: a directory (--workdir); s3: moto's S3 server started here on loopback, "
                             "both sides through fsspec (s3fs)")
    parser.add_argument("--background", action="store_true",
                        help="also save in the background: scalai save(background=True) + close, DCP async_save")
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from scalai.config import ParallelConfig
    from scalai.examples.gpt.corpus import ensure_index
    from scalai.examples.gpt.model import preset

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the scratch directory on kill
    load_before = os.getloadavg()[0]
    cfg = preset(args.model)
    index = str(ensure_index(cfg.seq_len).path)
    transitions = args.transition or list(DEFAULT_TRANSITIONS)
    state = cfg.num_params() * 4 * 3
    work, where = choose_workdir(4 * state * args.repeats * 2, 4 * state, args.workdir, "scalai-saveload")
    server, s3_env, bucket = _s3_server() if args.storage == "s3" else (None, {}, None)
    if server is not None:
        where = f"moto's S3 server on loopback ({s3_env['AWS_ENDPOINT_URL']}, objects in its memory)"
    log(f"{args.model}: {cfg.num_params() / 1e6:.1f} M parameters, {state / 2**20:.0f} MiB of state; "
        f"files in {where}")
    rows, sections, notes = [], [], []
    try:
        for transition in transitions:
            a, b = (ParallelConfig.parse(x) for x in transition.split(":"))
            if a.world_size != b.world_size:
                raise SystemExit(f"{transition}: A and B must have the same world size (one launch)")
            tdir = os.path.join(work, f"t{len(sections)}")
            os.makedirs(tdir)
            out = os.path.join(tdir, "result.json")
            log(f"{a} -> {b}: {a.world_size} processes, {args.repeats} repeats")
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **s3_env)
            base = f"s3://{bucket}/t{len(sections)}" if bucket else tdir
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", str(a.world_size), __file__, "--worker", "--model", args.model,
                            "--transition", transition, "--repeats", str(args.repeats), "--data", index,
                            "--work", tdir, "--base", base, "--out", out] + (["--background"] if args.background
                                                                            else []), check=True, env=env)
            res = json.loads(Path(out).read_text())
            if res["mismatches"]:
                raise SystemExit(f"{transition}: {res['mismatches']} live tensors differ between the "
                                 f"scalai and DCP loads; the figures would compare different work")
            nbytes = res["state_bytes"]
            sections.append(len(rows))
            save, load = res["results"]["save"], res["results"]["load"]
            dcp_save, dcp_load = Stats.of(save["dcp"]).median, Stats.of(load["dcp"]).median
            rows.append([f"save at {a}: scalai"] + _row("", save["scalai"], nbytes, dcp_save)[1:])
            rows.append([f"save at {a}: DCP"] + _row("", save["dcp"], nbytes, None)[1:])
            if args.background:
                bg = res["results"]["background"]
                for kind, label in (("", "training waits"), ("_total", "until complete")):
                    base_t = Stats.of(bg[f"dcp{kind}"]).median
                    rows.append([f"background save at {a}, {label}: scalai"]
                                + _row("", bg[f"scalai{kind}"], nbytes, base_t)[1:])
                    rows.append([f"background save at {a}, {label}: DCP async_save"]
                                + _row("", bg[f"dcp{kind}"], nbytes, None)[1:])
            rows.append([f"load at {b}: scalai (default: verify)"] + _row("", load["scalai"], nbytes, dcp_load)[1:])
            rows.append([f"load at {b}: scalai, verify=False (not the default)"] + _row("", load["scalai_noverify"], nbytes,
                                                                    dcp_load)[1:])
            rows.append([f"load at {b}: DCP"] + _row("", load["dcp"], nbytes, None)[1:])
            notes.append(f"{a} -> {b}: files written by scalai {res['written']['s'] / 2**20:.0f} MiB, "
                         f"by DCP {res['written']['d'] / 2**20:.0f} MiB; {res['tensors']} tensors; "
                         f"loads equal bit for bit")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if server is not None:
            server.kill()
            server.wait()
    print_table(f"Save and load of {args.model} ({state / 2**20:.0f} MiB of state), "
                f"median of {args.repeats}", ["step", "seconds", "min–max", "GiB/s", "vs DCP"],
                rows, sections, args.format)
    for note in notes:
        print(note)
    machine = machine_description()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}; torch "
          f"{machine.get('torch')}; files on {where}; load average (1 min) at start {load_before:.1f}, at end {os.getloadavg()[0]:.1f}")
    if args.storage == "s3":
        print(f"scalai save: each rank's file below 100 MiB sent in one PUT once complete, a larger one "
              f"streamed out in 8 MiB parts as it fills (an S3 multipart upload); "
              f"CRC-32s from the bytes sent; rank 0 writes the manifest last; load (default): per saved file "
              f"the plan's windows in a few streamed GETs (runs closer than 2 MiB share one, 16 at once per "
              f"rank), each file read whole by the rank that needs most of it, every tensor checked against its "
              f"CRC-32 as its bytes pass. "
              f"DCP: FsspecWriter(sync_files=False, thread_count={THREADS}) over s3fs with its block at 100 MiB "
              f"(files below it in one PUT, as scalai's); load: FsspecReader, "
              f"dcp.load + set_state_dict, no checksums.")
    else:
        print(f"scalai save: pwrite from the live tensors, CRC-32 on {THREADS} threads per rank, fsync; load "
              f"(default): CRC-32 of every saved byte (split over the ranks), then region copies into the live "
              f"tensors. DCP save: FileSystemWriter(sync_files=True, thread_count={THREADS}); load: dcp.load + "
              f"set_state_dict, no checksums.")
    if args.background:
        print("background: scalai save(background=True) (a staging copy of each rank's tensors in host memory, "
              "then a thread writes them) and close() (commit); DCP async_save (its own staging copy, a thread, "
              "on a separate gloo group) and the future's result(). 'training waits' is the call until it "
              "returns, 'until complete' adds the wait for the version.")
    print("Order of the methods rotated every round; live tensors overwritten with a sentinel before every load.")


if __name__ == "__main__":
    main()
