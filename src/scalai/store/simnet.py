"""Several hosts on one machine: a store per simulated host, each behind a limited link.

Two ways, chosen by :func:`netns_available` (``mode="auto"``):

- ``netns`` (root, with ``ip`` and ``tc`` from iproute2): every host is a network
  namespace with one veth pair into a bridge in the root namespace. ``tc`` token-bucket
  filters on both ends of each pair limit what the host sends (egress of its end) and what
  it receives (egress of the bridge's end) to ``link`` bits per second: a full-duplex NIC.
  Stores listen on their namespace's address (so they need the token); a store's traffic
  with itself stays on its own loopback, unlimited, like a memory copy. Interface
  counters give the bytes on the wire (headers included).
- ``transport`` (anywhere): stores on 127.0.0.1, each limiting its own reads served to,
  and reads made from, other hosts with a token bucket (``scalai store serve --link``,
  see ``ratelimit.py``). The coordinator's requests count as another host's.

Use as a context manager::

    with SimulatedHosts(4, link="1gbit") as hosts:
        cluster = StoreCluster(hosts.urls, hosts.token)
        ...
        hosts.kill(2); hosts.restart(2)
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .client import StoreClient
from .errors import StoreError

__all__ = ["SimulatedHosts", "netns_available", "parse_rate"]

PORT = 7070
MTU = 9000  # jumbo frames, as cluster networks use: 6x fewer packets for the stores to handle


def parse_rate(text: str) -> float:
    """``"1gbit"`` / ``"400mbit"`` / ``"50MB"`` -> bytes per second."""
    t = text.strip().lower()
    for suffix, scale in (("gbit", 1e9 / 8), ("mbit", 1e6 / 8), ("kbit", 1e3 / 8), ("gb", 1e9), ("mb", 1e6)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * scale
    return float(t)


def _run(*cmd: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    out = subprocess.run(full, capture_output=True, text=True)
    if check and out.returncode:
        raise StoreError(f"{' '.join(full)} failed: {out.stderr.strip()}")
    return out


def netns_available() -> bool:
    """Root, ``ip`` and ``tc`` present, and a namespace can actually be made here."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        return False
    probe = f"scprobe{os.getpid()}"
    ok = _run("ip", "netns", "add", probe, check=False).returncode == 0
    _run("ip", "netns", "del", probe, check=False)
    return ok


def _free_subnet() -> int:
    used = _run("ip", "-4", "-o", "addr", check=False).stdout
    for k in range(os.getpid() % 200 + 10, 250):
        if f"10.250.{k}." not in used:
            return k
    raise StoreError("no free 10.250.X.0/24 subnet for the simulated hosts")


class SimulatedHosts:
    """``n`` stores named ``host0``... on simulated hosts (see the module docstring).

    Args:
        n: hosts.
        link: per-host link rate each way (e.g. ``"1gbit"``), ``None`` for unlimited.
        mode: ``"auto"`` (netns when possible), ``"netns"`` or ``"transport"``.
        root: where the stores keep their shards (default: a fresh directory in /dev/shm).
        token: the shared token (default: a random one; always set in netns mode).
    """

    def __init__(self, n: int, link: str | None = "1gbit", mode: str = "auto", root: str | None = None,
                 token: str | None = None):
        if mode == "auto":
            mode = "netns" if netns_available() else "transport"
        if mode not in ("netns", "transport"):
            raise ValueError(f"mode {mode!r}: use auto, netns or transport")
        self.n, self.link, self.mode = n, link, mode
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.root = root or tempfile.mkdtemp(prefix="scalai-simhosts-", dir=base)
        self.token = token or secrets.token_urlsafe(24)
        self.hosts = [f"host{i}" for i in range(n)]
        self.tag = f"sc{os.getpid() % 100000}"
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.urls: list[str] = [""] * n
        self._subnet: int | None = None
        self._token_file = os.path.join(self.root, "token")

    # -- network ----------------------------------------------------------------------
    def _ns(self, i: int) -> str:
        return f"{self.tag}h{i}"

    def _veth(self, i: int) -> tuple[str, str]:
        return f"{self.tag}v{i}", f"{self.tag}p{i}"  # bridge side, host side

    def _address(self, i: int) -> str:
        return f"10.250.{self._subnet}.{i + 1}" if self.mode == "netns" else "127.0.0.1"

    def _make_network(self) -> None:
        self._subnet = _free_subnet()
        br = f"{self.tag}br"
        _run("ip", "link", "add", br, "mtu", str(MTU), "type", "bridge")
        _run("ip", "addr", "add", f"10.250.{self._subnet}.254/24", "dev", br)
        _run("ip", "link", "set", br, "up")
        for i in range(self.n):
            ns, (vb, vh) = self._ns(i), self._veth(i)
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", vb, "mtu", str(MTU), "type", "veth", "peer", "name", vh, "mtu", str(MTU))
            _run("ip", "link", "set", vh, "netns", ns)
            _run("ip", "link", "set", vb, "master", br)
            _run("ip", "link", "set", vb, "up")
            _run("ip", "link", "set", "lo", "up", ns=ns)
            _run("ip", "addr", "add", f"{self._address(i)}/24", "dev", vh, ns=ns)
            _run("ip", "link", "set", vh, "up", ns=ns)
            if self.link:
                bits = parse_rate(self.link) * 8
                burst = max(int(bits / 8 / 100), 256 * 1024)  # 10 ms of traffic, at least a GSO burst
                for dev, where in ((vb, None), (vh, ns)):
                    _run("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(bits)}bit",
                         "burst", str(burst), "latency", "100ms", ns=where)

    def _drop_network(self) -> None:
        for i in range(self.n):
            _run("ip", "link", "del", self._veth(i)[0], check=False)  # the pair goes with it, at once
            _run("ip", "netns", "del", self._ns(i), check=False)
        _run("ip", "link", "del", f"{self.tag}br", check=False)

    def wire_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes on each host's link so far (netns mode; headers included): sent, received."""
        if self.mode != "netns":
            return {}
        out = {}
        for i, host in enumerate(self.hosts):
            stats = f"/sys/class/net/{self._veth(i)[0]}/statistics"
            with open(f"{stats}/rx_bytes") as rx, open(f"{stats}/tx_bytes") as tx:
                out[host] = {"sent": int(rx.read()), "received": int(tx.read())}
        return out

    # -- stores -----------------------------------------------------------------------
    def start(self, i: int, timeout: float = 30.0) -> str:
        """Start (or restart) host ``i``'s store on its root; returns its URL."""
        host_root = os.path.join(self.root, self.hosts[i])
        url_file = os.path.join(self.root, f"{self.hosts[i]}.url")
        if os.path.exists(url_file):
            os.unlink(url_file)
        cmd = [sys.executable, "-m", "scalai.cli", "store", "serve", "--root", host_root, "--name", self.hosts[i],
               "--host", self._address(i), "--port", str(PORT if self.mode == "netns" else 0),
               "--token-file", self._token_file, "--url-file", url_file]
        if self.mode == "transport" and self.link:
            cmd += ["--link", self.link]
        if self.mode == "netns":
            cmd = ["ip", "netns", "exec", self._ns(i)] + cmd
        log = open(os.path.join(self.root, f"{self.hosts[i]}.log"), "ab")
        self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "SCALAI_STORE_LOG": "WARNING"})
        log.close()
        deadline = time.monotonic() + timeout
        while not os.path.exists(url_file):
            if self.procs[i].poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(self.root, f"{self.hosts[i]}.log"), "rb") as f:
                    tail = f.read()[-2000:].decode("utf-8", "replace")
                raise StoreError(f"store {self.hosts[i]} did not start: {tail}")
            time.sleep(0.05)
        with open(url_file) as f:
            self.urls[i] = f.read().strip()
        StoreClient(self.urls[i], self.token).health()
        return self.urls[i]

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Stop host ``i``'s store at once (its shards stay in its memory-backed root)."""
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            p.wait(10)
        self.procs[i] = None

    def restart(self, i: int) -> str:
        self.kill(i)
        return self.start(i)

    def __enter__(self) -> SimulatedHosts:
        os.makedirs(self.root, exist_ok=True)
        with open(os.open(self._token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(self.token)
        try:
            if self.mode == "netns":
                self._make_network()
            for i in range(self.n):
                self.start(i)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for i in range(self.n):
            self.kill(i, signal.SIGTERM)
        if self.mode == "netns":
            self._drop_network()
        shutil.rmtree(self.root, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()
