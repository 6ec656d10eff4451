"""Real store processes for the tests: started as a user would (``python -m scalai.cli store
serve``), on loopback, each with its own root; killed and restarted at will."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from scalai.config import Placement
from scalai.models import model_ptc
from scalai.planner import Deployment
from scalai.store import StoreClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # simulate: the independent oracle
from simulate import host_lower_bounds, host_unchanged_bytes  # noqa: E402

TOKEN = "test-token-0123456789abcdef"


def deployment(layout: str, gpus_per_host: int, hosts, model: str = "gpt-tiny") -> Deployment:
    """``model`` in ``layout`` on ``hosts`` (in order), built from the model, not from a store."""
    return Deployment(model_ptc(model, layout), Placement(gpus_per_host, tuple(hosts)))


def assert_pulled_the_lower_bound(report: dict, old: Deployment, new: Deployment, unavailable=()) -> None:
    """Every destination store pulled from its peers (bytes counted by the stores' transport,
    ``report`` as ``ReshardResult.to_json()`` or ``scalai store reshard --json`` gives it)
    exactly the per-host lower bound computed independently by element masks
    (``simulate.host_lower_bounds``), and the plan reported that bound. Every store linked
    exactly the tensors that an old rank of its host holds unchanged
    (``simulate.host_unchanged_bytes``), and copied the rest of the plan's bytes."""
    expected = host_lower_bounds(old, new, unavailable)
    pulled = {h: n for h, r in report["hosts"].items() if (n := sum(r["fetched_bytes"].values()))}
    assert pulled == expected, f"stores pulled {pulled}, the lower bound is {expected}"
    unchanged = host_unchanged_bytes(old, new, unavailable)
    linked = {h: n for h, r in report["hosts"].items() if (n := r["linked_bytes"])}
    assert linked == unchanged, f"stores linked {linked}, the tensors unchanged on their hosts: {unchanged}"
    assert report["copied_bytes"] == report["plan"]["total_bytes"] - sum(unchanged.values())
    reported = (report["cross_host_bytes"], report["plan"]["cross_host_lower_bound_bytes"])
    assert reported == (sum(expected.values()),) * 2, f"counted, planner's bound: {reported}; bound {expected}"


class StoreProc:
    """One store process. ``port=0`` picks a free port the first time; restarts keep it."""

    def __init__(self, root: Path, name: str, token: str | None = None, link: str | None = None,
                 extra: tuple[str, ...] = (), log_level: str = "WARNING"):
        self.root, self.name, self.token, self.link, self.extra = Path(root), name, token, link, extra
        self.log_level = log_level
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.root.parent / f"{name}.log"

    def start(self, timeout: float = 30.0) -> StoreProc:
        url_file = self.root.parent / f"{self.name}.url"
        url_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "scalai.cli", "store", "serve", "--root", str(self.root), "--name", self.name,
               "--port", str(self.port), "--url-file", str(url_file), *self.extra]
        env = {**os.environ, "SCALAI_STORE_LOG": self.log_level}
        env.pop("SCALAI_TOKEN", None)
        if self.token:
            token_file = self.root.parent / f"{self.name}.token"
            token_file.write_text(self.token)
            cmd += ["--token-file", str(token_file)]
        if self.link:
            cmd += ["--link", self.link]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while not url_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"store {self.name} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.url = url_file.read_text().strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def client(self, **kw) -> StoreClient:
        return StoreClient(self.url, self.token, **kw)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> StoreProc:
        self.kill()
        for _ in range(100):  # the old socket may linger a moment
            try:
                return self.start()
            except RuntimeError:
                if "address already in use" not in self.log.read_text().lower():
                    raise
                time.sleep(0.1)
        return self.start()


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


def run_cli(capsys, *args) -> Result:
    """Run the ``scalai`` CLI in this process and capture what a user would see."""
    from scalai.cli.main import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)
