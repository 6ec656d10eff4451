"""The downtime benchmark across simulated machines (``benchmarks/reconfigure.py
--machines``), end to end: one tiny case of a killed machine on both sides, its report's
structure, and nothing left behind (namespaces, links, processes, the scratch directory).

Slow (about a minute and a half on 2 cores); needs root, iproute2 and unshare.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

netns = pytest.importorskip("netns_machines")

ROOT = Path(__file__).resolve().parents[2]


def _ours(folder: Path) -> list[str]:
    """Live processes whose working directory or command line is inside ``folder``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and (str(folder) in cmd or cwd.startswith(str(folder))):
            found.append(f"{entry.name}: {cmd[:200]}")
    return found


@pytest.mark.slow
@pytest.mark.skipif(not netns.available(), reason="needs root, iproute2 and unshare (network and mount namespaces)")
def test_a_killed_machine_is_measured_on_both_sides_and_nothing_is_left_behind(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "reconfigure.py"), "--machines", "2", "--gpus-per-machine", "1",
           "--link", "1gbit", "--model", "gpt-tiny", "--rounds", "1", "--scenario", "kill", "--at-step", "8",
           "--workdir", str(tmp_path), "--format", "plain"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "SCALAI_CACHE": str(tmp_path / "cache")})
    try:
        out, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-4000:]

    # the summary: scalai's downtime and the baseline's, and their ratio
    summary = [line for line in out.splitlines() if line.lstrip().startswith("shrink 2 -> 1 (dp)")]
    assert summary and " s vs " in summary[0] and "x " in summary[0], out[-3000:]
    # both sides' phases, detection first; each side's recovery and the steps it lost
    assert "detect" in out and "first step" in out
    assert "failure of host m1: recovered from" in out
    assert "torchrun restarted the survivors at tp=1,pp=1,dp=1 from" in out
    assert out.count("steps lost") >= 2
    assert "elastic torchrun per machine" in out and "s3fs" in out

    # nothing left behind
    tag = f"reconfigure-{proc.pid}-"
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in namespaces, namespaces
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"ea{proc.pid % 100000}" not in links, links
    assert not _ours(tmp_path)
    assert not list(tmp_path.glob("scalai-reconfigure-*")), list(tmp_path.iterdir())
