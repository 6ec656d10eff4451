"""Distributed vs central transformation of a GPT checkpoint across simulated hosts.

One run prints one table measured in that run. The job state (default gpt2-small with
bf16 weights, fp32 masters and Adam moments: 1.74 GB of global state, ~2.6 GB stored in
``tp=2,pp=2,dp=2,zero=1``) is pushed once into stores on ``--hosts`` simulated hosts
(default 4 hosts x 2 GPUs), each behind a link of ``--link`` each way (default 400 Mbit/s;
network namespaces + veth + ``tc`` as root, else the stores' own rate limiter: see
``src/scalai/store/simnet.py``). Then, for each change of one degree (halving and
doubling tp, pp and dp; halving uses 4 GPUs on 2 hosts, doubling 16 GPUs, 4 per host),
the same source version is transformed twice, into the same new placement (``--placement
auto``: the hosts whose busiest one must receive the least, e.g. which 2 of the 4 hosts
to keep; ``first``: the first hosts in order):

- **distributed** (scalai): every destination host's store pulls its slices in parallel,
  by memory copy from itself and by ranged reads from the stores the planner chose;
- **central** (the consolidate-then-split baseline): the first destination host pulls the
  whole state into one consolidated copy, then every destination host pulls its shards
  from it.

Times are the coordinator's wall time from the request to the new version committed on
every store (planning included; the old version is kept for the next case). Cross-host
bytes are counted by the stores' transport (payload bytes of the ranged reads) and,
in namespace mode, also on the wire (interface counters: TCP/IP and HTTP headers and the
control requests included). The two results are checked against each other: every new
tensor's CRC-32 must be the same in both.

    python benchmarks/distributed.py                       # the full table (~10 min)
    python benchmarks/distributed.py --model gpt-tiny --cases dp- --link 50mbit   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import log, machine_description, markdown_table, print_table  # noqa: E402

BASE = "tp=2,pp=2,dp=2,zero=1"
# name -> (new layout, GPUs per host after)
CASES = {
    "dp-": ("tp=2,pp=2,dp=1,zero=1", 2), "tp-": ("tp=1,pp=2,dp=2,zero=1", 2), "pp-": ("tp=2,pp=1,dp=2,zero=1", 2),
    "dp+": ("tp=2,pp=2,dp=4,zero=1", 4), "tp+": ("tp=4,pp=2,dp=2,zero=1", 4), "pp+": ("tp=2,pp=4,dp=2,zero=1", 4),
}


def _crcs(cluster, job: str, version: str) -> dict:
    out = {}
    for host, client in cluster.by_host.items():
        try:
            ranks = client.version(job, version)["ranks"]
        except Exception:  # noqa: BLE001 - a host that holds none of this version
            continue
        for rank, tensors in ranks.items():
            out.update({(int(rank), t): info["crc32"] for t, info in tensors.items()})
    return out


def _wire(hosts) -> int:
    return sum(v["received"] for v in hosts.wire_bytes().values())


def run_case(cluster, hosts, job: str, name: str, central: bool, placement) -> dict:
    from scalai.store import reshard

    layout, g = CASES[name]
    w0 = _wire(hosts)
    r = reshard(cluster, job, layout, gpus_per_host=g, hosts=placement, central=central, keep_old=True)
    wire = _wire(hosts) - w0 if hosts.mode == "netns" else None
    crcs = _crcs(cluster, job, r.target)
    cluster.drop(job, r.target)
    log(f"{name} {'central' if central else 'distributed'}: {r.seconds:.1f} s, "
        f"{r.cross_host_bytes / 1e9:.3f} GB across hosts ({', '.join(f'{k} {v:.1f}' for k, v in r.phases.items())})")
    return {"result": r.to_json(), "seconds": r.seconds, "counted": r.cross_host_bytes, "wire": wire, "crcs": crcs,
            "stats": r.stats, "placement": r.placement}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--gpus-per-host", type=int, default=2, help="GPUs per host of the base layout")
    ap.add_argument("--link", default="400mbit", help="per-host link rate each way (e.g. 1gbit, 400mbit)")
    ap.add_argument("--mode", default="auto", choices=["auto", "netns", "transport"])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated from {', '.join(CASES)}")
    ap.add_argument("--placement", default="auto", choices=["auto", "first"],
                    help="new hosts: 'auto' = those whose busiest one receives least (both modes use "
                         "the same), 'first' = the first hosts in order")
    ap.add_argument("--ckpt", default=None, help="reuse a checkpoint of --model in the base layout")
    ap.add_argument("--workdir", default=None, help="where to synthesize the checkpoint (default /tmp)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--format", default="rich", choices=["rich", "markdown", "plain"])
    args = ap.parse_args()

    from scalai.config import ParallelConfig
    from scalai.models import model_ptc
    from scalai.models.synth import write_synthetic_checkpoint
    from scalai.store import StoreCluster
    from scalai.store.simnet import SimulatedHosts

    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; use {', '.join(CASES)}")
    base = ParallelConfig.parse(BASE)
    ptc = model_ptc(args.model, base)
    global_bytes = sum(s.nbytes for s in ptc.specs)
    workdir = None
    ckpt = args.ckpt
    if ckpt is None:
        workdir = os.path.join(args.workdir or "/tmp", f"scalai-dist-bench-{os.getpid()}")
        os.makedirs(workdir)
        ckpt = os.path.join(workdir, "ckpt")
        log(f"synthesizing {args.model} in {BASE} ({global_bytes / 1e9:.2f} GB of global state) in {ckpt}")
        write_synthetic_checkpoint(args.model, ckpt, base, seed=0)
    rows, results = [], {}
    try:
        with SimulatedHosts(args.hosts, link=args.link, mode=args.mode) as hosts:
            log(f"{args.hosts} hosts ({hosts.mode} mode), link {args.link} each way; stores {hosts.urls}")
            cluster = StoreCluster(hosts.urls, hosts.token)
            t0 = time.perf_counter()
            src = cluster.push(ckpt, "bench", args.gpus_per_host)
            log(f"pushed {src.name} in {time.perf_counter() - t0:.1f} s")
            for name in cases:
                dist = run_case(cluster, hosts, "bench", name, False, args.placement if args.placement == "auto" else None)
                cen = run_case(cluster, hosts, "bench", name, True, list(dist["placement"]))
                if dist["crcs"] != cen["crcs"] or not dist["crcs"]:
                    raise SystemExit(f"{name}: distributed and central results differ")
                s = dist["stats"]
                layout, g = CASES[name]
                world = ParallelConfig.parse(layout).world_size
                ok = dist["counted"] == s.cross_host_bytes == s.cross_host_lower_bound_bytes
                results[name] = {"to": layout, "gpus_per_host": g, "hosts": dist["placement"],
                                 "moved_bytes": s.total_bytes,
                                 "lower_bound_bytes": s.cross_host_lower_bound_bytes,
                                 "distributed": {k: dist[k] for k in ("seconds", "counted", "wire", "result")},
                                 "central": {k: cen[k] for k in ("seconds", "counted", "wire", "result")},
                                 "ratio": cen["seconds"] / dist["seconds"], "counted_equals_lower_bound": ok}
                gb = lambda n: f"{n / 1e9:.3f}" if n is not None else "-"  # noqa: E731
                rows.append([f"{name[:2].upper()} {'÷2' if name.endswith('-') else '×2'}",
                             f"{BASE.removesuffix(',zero=1')} -> {layout.removesuffix(',zero=1')}",
                             f"8 -> {world}", ",".join(h.removeprefix("host") for h in dist["placement"]),
                             gb(s.total_bytes), gb(s.cross_host_lower_bound_bytes),
                             gb(dist["counted"]) + (" =" if ok else " ≠"), gb(dist["wire"]),
                             gb(cen["counted"]), f"{dist['seconds']:.1f}", f"{cen['seconds']:.1f}",
                             f"{cen['seconds'] / dist['seconds']:.2f}x"])
            mode = hosts.mode
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    headers = ["change", "layout (zero=1)", "GPUs", "new hosts", "moved GB", "lower bound GB", "distributed GB (counted)",
               "on the wire GB", "central GB (counted)", "distributed s", "central s", "central / distributed"]
    title = (f"{args.model}: {args.hosts} simulated hosts, link {args.link} each way ({mode}); "
             f"base {BASE} on {args.gpus_per_host} GPUs per host; new hosts: {args.placement}")
    print_table(title, headers, rows, fmt=args.format)
    print(f"machine: {machine_description()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "hosts": args.hosts, "link": args.link, "mode": mode,
                       "machine": machine_description(), "cases": results,
                       "table": markdown_table(headers, rows)}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
