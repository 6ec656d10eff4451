"""One rank's save into the store of its own machine: written into the store's upload
directory and adopted (scalai's fast path, :mod:`scalai.store.local`) against the same
tensors streamed over loopback HTTP (``SCALAI_STORE_LOCAL=0``: what every save did before).

One store process (``scalai store serve``, root in a fresh scratch directory: ``/dev/shm``
when it has room), one client process (this one). Each round saves rank 0's local tensors
of ``--model`` in ``--layout`` with ``save_rank`` (4 tensors at a time, both sides) into a
new version, once each way, interleaved; the version is deleted after each round. Both
sides write the same bytes and record the same CRC-32s. Reported: wall time, this
process's CPU time and the store process's CPU time (``/proc``), medians over rounds.

Usage::

    .venv/bin/python benchmarks/store_save.py                          # gpt2-small tp=4 rank 0, 3 rounds
    .venv/bin/python benchmarks/store_save.py --model gpt-tiny --rounds 1   # smoke test
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stats, choose_workdir, log, machine_description, print_table  # noqa: E402


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--layout", default="tp=4,pp=1,dp=1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--format", default="rich", choices=["rich", "markdown", "plain"])
    args = parser.parse_args()

    import numpy as np

    from scalai.config import Placement
    from scalai.dtypes import raw_numpy
    from scalai.models import model_ptc
    from scalai.models.synth import fill_local
    from scalai.store import StoreCluster
    from scalai.store.training import save_rank

    ptc = model_ptc(args.model, args.layout)
    tensors = {}
    for name, shard in ptc.rank_shards(0):
        tensors[name] = np.zeros(shard.shape, raw_numpy(ptc.spec(name).dtype))
        fill_local(ptc.spec(name), shard, tensors[name], 1)
    nbytes = sum(a.nbytes for a in tensors.values())
    base, where = choose_workdir(3 * nbytes, nbytes, args.workdir, "store-save")
    log(f"{args.model} {args.layout} rank 0: {len(tensors)} tensors, {nbytes / 2**20:.0f} MiB; store in {where}")
    url_file = os.path.join(base, "url")
    store = subprocess.Popen([sys.executable, "-m", "scalai.cli", "store", "serve", "--root",
                              os.path.join(base, "root"), "--name", "host0", "--port", "0", "--url-file", url_file],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not os.path.exists(url_file):
            if store.poll() is not None:
                raise SystemExit("the store did not start")
            time.sleep(0.05)
        url = Path(url_file).read_text().strip()
        samples: dict[str, list[tuple[float, float, float]]] = {"local": [], "http": []}
        place = Placement(1, ("host0",))
        for r in range(args.rounds):
            for kind in ("http", "local"):
                os.environ["SCALAI_STORE_LOCAL"] = "1" if kind == "local" else "0"
                cluster = StoreCluster([url], None)
                cluster.clients[0].local_dir()  # discovery is not part of the save
                version = f"v{r}{kind}"
                c0, s0, t0 = time.process_time(), _cpu(store.pid), time.perf_counter()
                save_rank(cluster, "bench", version, 0, ptc, place, tensors, owner="bench")
                wall, cpu, scpu = time.perf_counter() - t0, time.process_time() - c0, _cpu(store.pid) - s0
                assert cluster.clients[0].adoptions == (len(tensors) if kind == "local" else 0)
                samples[kind].append((wall, cpu, scpu))
                cluster.clients[0].delete("bench", version)
                log(f"round {r} {kind}: {wall:.3f} s wall, {cpu:.3f} s client CPU, {scpu:.3f} s store CPU")
    finally:
        store.kill()
        store.wait()
        shutil.rmtree(base, ignore_errors=True)
    rows = []
    http = [Stats.of([s[i] for s in samples["http"]]).median for i in range(3)]
    for kind, label in (("http", "HTTP upload (before)"), ("local", "write + adopt (fast path)")):
        med = [Stats.of([s[i] for s in samples[kind]]).median for i in range(3)]
        rows.append([label, f"{med[0]:.3f}", f"{nbytes / med[0] / 2**30:.2f}", f"{med[1]:.3f}", f"{med[2]:.3f}",
                     f"{http[0] / med[0]:.2f}x"])
    print_table(f"save of rank 0 of {args.model} {args.layout} ({nbytes / 2**20:.0f} MiB) into its own machine's "
                f"store ({where}), median of {args.rounds}; {machine_description()['cpu']}",
                ["path", "wall s", "GiB/s", "client CPU s", "store CPU s", "speed-up vs HTTP"], rows, fmt=args.format)


if __name__ == "__main__":
    main()
