"""``scalai agent`` as a user starts it: bad input in one line, a wrong token refused, SIGTERM
before it joined."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess

from elastic_helpers import run_cli, scalai_cmd
from scalai.elastic.coordinator import AgentService


def _one_line(result, code: int, fragment: str) -> None:
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("scalai agent ")]
    assert result.returncode == code and len(lines) == 1 and fragment in lines[0], result.stderr


def test_bad_agent_input_is_one_line_and_creates_nothing(tmp_path):
    root = tmp_path / "agent"
    for args, fragment in [
        (["--join", "nowhere", "--name", "a"], "must look like HOST:PORT"),
        (["--join", "127.0.0.1:9", "--name", "../a"], "--name"),
        (["--join", "127.0.0.1:9", "--name", "a", "--devices", "0"], "0 is out of range: it must be an integer >= 1"),
        (["--join", "127.0.0.1:9", "--name", "a", "--address", "10.254.254.1"],
         "refusing to serve a store on 10.254.254.1 without a token"),
    ]:
        _one_line(run_cli("agent", *args, "--root", root, timeout=120), 2, fragment)
    assert not root.exists()


def test_an_agent_with_a_wrong_token_is_refused_in_one_line(tmp_path):
    service = AgentService(queue.Queue().put, {"job": "j", "trainer": {"module": "m"}}, dict, dict,
                           token="right-" + "x" * 20)
    try:
        (tmp_path / "token").write_text("wrong-" + "y" * 20)
        address = service.url.split("://")[1]
        result = run_cli("agent", "--join", address, "--name", "a", "--root", tmp_path / "agent", "--token-file",
                         tmp_path / "token", timeout=120)
        _one_line(result, 1, f"the coordinator at http://{address} refused a: missing or wrong token")
        assert "y" * 20 not in result.stderr and "x" * 20 not in result.stderr
    finally:
        service.close()


def test_an_agent_that_never_joined_leaves_on_sigterm(tmp_path):
    """SIGTERM while the coordinator is not (yet) reachable: nothing of a job is here to hand
    off, so the agent stops its store and exits 0 (it used to keep waiting for ever)."""
    with socket.socket() as s:  # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % s.getsockname()[1]
        proc = subprocess.Popen(scalai_cmd("agent", "--join", address, "--name", "a", "--root", tmp_path / "agent",
                                           "--standby", 0),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            lines = []
            for line in proc.stdout:  # the store is up and the first join failed
                lines.append(line)
                if "waiting for the coordinator" in line:
                    break
            proc.send_signal(signal.SIGTERM)
            rest, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "SIGTERM before joining" in rest, rest
