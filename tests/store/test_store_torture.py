"""Store torture (issue 11): concurrent pushes, reshards and pulls of one job from several
client processes, killed at random moments, against three stores. Afterwards:

- every committed version reads back bit-exact (CRC-checked pull) and equals a local
  ``reshard`` of the same source into its layout (the file executor: an oracle that shares
  no code with the stores' transformation), and so does every pull that succeeded;
- no uncommitted version outlives its lease: with every writer gone, each store reports
  no uncommitted version whose lease runs longer than the lease, and all are deleted
  within the lease plus the store's expiry period;
- the stores' memory returns to its baseline: once the job is deleted, no file is left
  under their roots, and their resident memory is back within a bound of its start.

About a minute on 2 cores (``slow``)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from scalai.checkpoint import Checkpoint
from scalai.reshard import reshard_checkpoint
from scalai.store import StoreCluster, StoreRequestError, pull

pytestmark = pytest.mark.slow

LEASE_S = 3
IDLE_S = 5  # the stores' idle timeout (default 30 s): bounds when a dead writer's upload file is swept
STORM_S = 25
SCALAI = str(Path(sys.executable).parent / "scalai")
LAYOUTS = [("tp=1,pp=2,dp=4,zero=1", 3), ("tp=2,pp=1,dp=2", 2), ("tp=1,pp=1,dp=3,zero=1", 1),
           ("tp=2,pp=2,dp=2", 4), ("tp=4,pp=1,dp=1", 2)]


def _rss(pid: int) -> int:
    """Resident memory of a process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _files(root: Path) -> list[Path]:
    return [p for sub in ("jobs", "uploads") for p in (root / sub).rglob("*") if p.is_file()]


class Storm:
    """Client processes of one role, started one after the other until the deadline; each
    is killed (SIGKILL) at a random moment with probability ``kill_p``."""

    def __init__(self, role: str, argv, deadline: float, rng: random.Random, kill_p: float, env: dict):
        self.role, self.argv, self.deadline, self.rng, self.kill_p, self.env = role, argv, deadline, rng, kill_p, env
        self.ok: list[tuple[list[str], str]] = []
        self.failed: list[str] = []
        self.killed = 0
        self.thread = threading.Thread(target=self.run, name=role)

    def run(self) -> None:
        n = 0
        while time.monotonic() < self.deadline:
            argv = self.argv(n)
            n += 1
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env)
            kill_at = time.monotonic() + self.rng.uniform(0.2, 3.0) if self.rng.random() < self.kill_p else None
            while proc.poll() is None:
                if kill_at is not None and time.monotonic() > kill_at:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    self.killed += 1
                    break
                time.sleep(0.02)
            out = proc.stdout.read().decode(errors="replace")
            if proc.returncode == 0:
                self.ok.append((argv, out))
            elif proc.returncode != -signal.SIGKILL:
                self.failed.append(out.strip().splitlines()[-1] if out.strip() else f"exit {proc.returncode}")

    def summary(self) -> str:
        return f"{self.role}: {len(self.ok)} ok, {len(self.failed)} refused/failed, {self.killed} killed"


def _oracle(source: Path, layout: str, cache: Path, memo: dict) -> Path:
    if layout not in memo:
        out = cache / f"oracle-{len(memo)}"
        reshard_checkpoint(source, out, layout, sync=False)
        memo[layout] = out
    return memo[layout]


def _equal(a: Path, b: Path) -> None:
    """Same layout, same local tensors byte for byte, same step and data position."""
    with Checkpoint.open(a) as ca, Checkpoint.open(b) as cb:
        assert str(ca.ptc.config) == str(cb.ptc.config)
        for rank in range(ca.ptc.config.world_size):
            for name, _ in ca.ptc.rank_shards(rank):
                x, y = np.asarray(ca.view(rank, name)), np.asarray(cb.view(rank, name))
                assert x.shape == y.shape and x.tobytes() == y.tobytes(), (a, b, rank, name)
        assert ca.state["step"] == cb.state["step"] and ca.state["data"] == cb.state["data"]
        cb.verify()


def test_torture_concurrent_writers_killed_at_random(stores, tiny_ckpt, tmp_path):
    procs = stores(3, extra=("--lease", str(LEASE_S), "--idle-timeout", str(IDLE_S)))
    urls = ",".join(p.url for p in procs)
    cluster = StoreCluster(urls)
    for c in cluster.clients:
        c.health()
    base_rss = {p.name: _rss(p.proc.pid) for p in procs}
    assert not any(_files(p.root) for p in procs)
    env = {**os.environ, "SCALAI_STORE_LEASE": str(LEASE_S)}
    rng = random.Random(11)
    deadline = time.monotonic() + STORM_S
    pulls = tmp_path / "pulls"
    pulls.mkdir()

    def push(n):
        return [SCALAI, "store", "push", str(tiny_ckpt), "--job", "gpt", "--stores", urls, "-g", "4"]

    def reshard_argv(n):
        layout, g = LAYOUTS[rng.randrange(len(LAYOUTS))]
        keep = ["--keep-old"] if rng.random() < 0.5 else []  # old versions for the pulls to read
        return [SCALAI, "store", "reshard", "--job", "gpt", "--to", layout, "-g", str(g), "--stores", urls, *keep]

    def pull_cli(role):
        return lambda n: [SCALAI, "store", "pull", str(pulls / f"{role}-{n}"), "--job", "gpt", "--stores", urls]

    storms = [Storm("push", push, deadline, random.Random(1), 0.4, env),
              Storm("reshard-a", reshard_argv, deadline, random.Random(2), 0.4, env),
              Storm("reshard-b", reshard_argv, deadline, random.Random(3), 0.4, env),
              Storm("pull-a", pull_cli("a"), deadline, random.Random(4), 0.3, env),
              Storm("pull-b", pull_cli("b"), deadline, random.Random(5), 0.3, env)]
    subprocess.run([SCALAI, "store", "push", str(tiny_ckpt), "--job", "gpt", "--stores", urls, "-g", "4"],
                   check=True, capture_output=True, env=env)  # something to reshard and pull from the start
    for s in storms:
        s.thread.start()
    for s in storms:
        s.thread.join(STORM_S + 120)
    report = "; ".join(s.summary() for s in storms)
    print(report)
    for s in storms:  # refusals are one line from scalai, never a traceback
        assert not any("Traceback" in line for line in s.failed), (s.role, s.failed)
    assert sum(len(s.ok) for s in storms if s.role.startswith("reshard")) > 0, report
    assert sum(s.killed for s in storms) > 0, report

    # every writer is gone: the uncommitted versions they left expire within their lease
    def uncommitted():
        out = {}
        for host, c in cluster.by_host.items():
            try:
                versions = c.job("gpt")["versions"]
            except StoreRequestError:
                continue
            for v in versions:
                if not v["committed"]:
                    assert v["expires_in_s"] <= LEASE_S, (host, v)  # nobody renews beyond the lease
                    out[(host, v["version"])] = v
        return out

    t_end = time.monotonic()
    while uncommitted():
        assert time.monotonic() - t_end < LEASE_S + 30, uncommitted()
        time.sleep(0.25)

    # every committed version reads back bit-exact and equals a local reshard of the source
    cluster.drop_incomplete("gpt")  # fragments of commits interrupted by a kill (never the job's state)
    memo: dict = {}
    checked = 0
    for host, c in cluster.by_host.items():
        for v in c.job("gpt")["versions"]:
            name = v["version"]
            out = tmp_path / f"check-{name}"
            if out.exists() or not v["tensors"]:
                continue
            src = cluster.latest("gpt", name)
            pull(cluster, "gpt", str(out), name)
            _equal(_oracle(tiny_ckpt, str(src.manifest.ptc.config), tmp_path, memo), out)
            checked += 1
    assert checked >= 1
    for s in storms:
        for argv, _ in s.ok if s.role.startswith("pull") else ():
            with Checkpoint.open(argv[3]) as c:
                layout = str(c.ptc.config)
            _equal(_oracle(tiny_ckpt, layout, tmp_path, memo), Path(argv[3]))
            checked += 1
    print(f"{checked} checkpoints checked against local reshards of the source")

    # and memory returns: no file left once the job is deleted; resident memory near its start
    subprocess.run([SCALAI, "store", "rm", "--job", "gpt", "--stores", urls], check=True, capture_output=True)
    for p in procs:
        assert not [f for f in _files(p.root) if f.parent.name != "uploads"], _files(p.root)[:5]
    # a writer killed while writing a local upload file (before asking the store to adopt
    # it) leaves it until the store sweeps it: once nobody wrote it for max(lease, the idle
    # timeout), checked every second
    deadline = time.monotonic() + max(LEASE_S, IDLE_S) + 15
    while any(_files(p.root) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    for p in procs:
        assert not _files(p.root), _files(p.root)[:5]
        assert p.client().usage()["memory_bytes"] == 0
        grown = _rss(p.proc.pid) - base_rss[p.name]
        print(f"{p.name}: resident memory {base_rss[p.name] / 2**20:.0f} MiB at the start, "
              f"{grown / 2**20:+.0f} MiB at the end")
        assert grown < 96 << 20, f"{p.name}'s resident memory grew by {grown / 2**20:.0f} MiB"
