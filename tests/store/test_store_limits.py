"""A store against hostile requests (issue 11, items 4, 5 and 8): bodies that exceed a limit
or do not lay out get 4xx with one line, connections are bounded, a client that stalls or
disconnects costs one log line, and the store answers the next request."""

from __future__ import annotations

import http.client
import json
import os
import socket
from urllib.parse import urlsplit

import numpy as np
import pytest

from scalai import PTC, ParallelConfig, Placement, TensorSpec
from scalai.models import model_ptc
from scalai.store import VersionManifest

W = np.arange(1 << 20, dtype=np.uint32)  # 4 MiB


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A store with a short idle timeout and few connections, holding j/v0 (w: 4 MiB)."""
    from store_helpers import StoreProc

    proc = StoreProc(tmp_path_factory.mktemp("limits") / "host0", "host0",
                     extra=("--idle-timeout", "2", "--max-connections", "64")).start()
    c = proc.client()
    c.put("j", "v0", 0, "w", W, "float32")
    c.commit("j", "v0", _manifest("v0", [TensorSpec("w", W.shape, "float32")], 0))
    yield proc
    proc.kill()


def _manifest(version, specs, num_layers, config=ParallelConfig(), gpus=1):
    return VersionManifest("j", version, 0, PTC(config, specs, num_layers), Placement(gpus, ("host0",)),
                           {}).to_json()


def post(url: str, path: str, body: bytes):
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


def _one_line(answer) -> str:
    message = answer["error"]["message"]
    assert "\n" not in message and "Traceback" not in message
    return message


def _gpt_manifest(version="v1"):
    return VersionManifest("j", version, 1, model_ptc("gpt-tiny", "tp=2,pp=1,dp=1"), Placement(2, ("host0",)),
                           {}).to_json()


def _vocab_splits(manifest: dict) -> list[dict]:
    return [t["split"] for t in manifest["ptc"]["tensors"] if t["split"].get("kind") == "vocab"]


CASES = {  # name: (expected status, words of the message)
    "num_layers 10**12": (422, "SCALAI_MAX_LAYERS"),
    "a million ranks": (422, "SCALAI_MAX_RANKS"),
    "JSON 10**5 deep": (400, "nests JSON 100000 levels deep"),
    "state 200 deep": (400, "nests JSON 203 levels deep"),
    "vocab multiple 0": (400, "multiple"),
    "vocab dim 7": (400, "dim"),
}


def _body(name: str) -> bytes:
    if name == "JSON 10**5 deep":
        return b"[" * 100_000 + b"]" * 100_000
    if name.startswith("vocab"):
        m = _gpt_manifest()
        assert _vocab_splits(m)
        for s in _vocab_splits(m):
            s["multiple" if "multiple" in name else "dim"] = 0 if "multiple" in name else 7
        return json.dumps({"manifest": m}).encode()
    m = _manifest("v1", [TensorSpec("w", (4,), "float32")], 0)
    if name == "num_layers 10**12":
        m["ptc"]["num_layers"] = 10**12
    elif name == "a million ranks":
        m["ptc"]["config"] = "tp=1,pp=1,dp=1000000"
    else:
        nested: object = 1
        for _ in range(200):
            nested = [nested]
        m["state"] = {"x": nested}
    return json.dumps({"manifest": m}).encode()


@pytest.mark.parametrize("name", list(CASES))
def test_commit_bodies_that_exceed_or_do_not_lay_out(live, name):
    status, words = CASES[name]
    got, answer = post(live.url, "/v1/jobs/j/versions/v1/commit", _body(name))
    assert got == status, (name, answer)
    message = _one_line(answer)
    assert words in message or (words in ("multiple", "dim") and "cannot be laid out" in message), message
    assert live.client().health()["status"] == "ok"


def test_transform_to_an_absurd_layout_is_refused_at_once(live):
    m = _manifest("v0", [TensorSpec("w", W.shape, "float32")], 0)
    req = {"from_version": "v0", "to_version": "v2", "old": {"ptc": m["ptc"], "placement": m["placement"]},
           "new": {"layout": "tp=1,pp=1,dp=1000000", "placement": m["placement"]}, "peers": {"host0": live.url},
           "plan": {"tensors": [], "copies": []}}  # refused for its layout before its plan is read
    status, answer = post(live.url, "/v1/jobs/j/transform", json.dumps(req).encode())
    assert status == 422 and "SCALAI_MAX_RANKS" in _one_line(answer)
    assert "v2" not in [v["version"] for v in live.client().job("j")["versions"]]


def test_a_stalled_upload_is_cut_off_with_408(live):
    u = urlsplit(live.url)
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        s.sendall(b"PUT /v1/jobs/j/versions/v9/ranks/0/tensors/w?dtype=float32&shape=1024 HTTP/1.1\r\n"
                  b"Host: x\r\nContent-Length: 4096\r\n\r\n" + b"\0" * 1000)  # then nothing
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"sent nothing" in answer
    assert live.client().usage()["uploading_bytes"] == 0
    assert not list((live.root / "uploads").iterdir())


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_half_open_connections_cannot_exhaust_the_store(live):
    pid = live.proc.pid
    c = live.client()
    c.health()
    base = _fds(pid)
    u = urlsplit(live.url)
    socks = []
    try:
        for i in range(400):  # connect and send nothing, or half a request
            s = socket.create_connection((u.hostname, u.port), timeout=30)
            if i % 2:
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        assert c.health()["status"] == "ok"  # a working client still gets in
        assert _fds(pid) <= base + 64 + 8  # at most --max-connections of them held
        for s in socks:  # every one is closed by the store (evicted, or after the idle timeout)
            s.settimeout(60)
            try:
                assert s.recv(1024) == b""
            except ConnectionResetError:
                pass
        assert _fds(pid) <= base + 8
        assert c.health()["status"] == "ok"
    finally:
        for s in socks:
            s.close()


def test_a_client_that_disconnects_costs_one_log_line(tmp_path):
    from store_helpers import StoreProc

    proc = StoreProc(tmp_path / "host0", "host0", log_level="INFO").start()
    big = np.arange(16 << 20, dtype=np.uint32)  # 64 MiB: more than loopback's socket buffers hold
    try:
        c = proc.client()
        c.put("j", "v0", 0, "w", big, "float32")
        c.commit("j", "v0", _manifest("v0", [TensorSpec("w", big.shape, "float32")], 0))
        u = urlsplit(proc.url)
        for _ in range(5):
            with socket.create_connection((u.hostname, u.port), timeout=30) as s:
                s.sendall(b"GET /v1/jobs/j/versions/v0/ranks/0/tensors/w HTTP/1.1\r\nHost: x\r\n\r\n")
                s.recv(1000)  # a little of the 64 MiB, then gone
        assert c.health()["status"] == "ok"
        np.testing.assert_array_equal(c.read("j", "v0", 0, "w"), big)
    finally:
        proc.kill()
    log = proc.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert log.count("the client disconnected") == 5, log[-3000:]  # one line each, none lost


@pytest.mark.parametrize("option,value,words", [("--lease", "0.5", "--lease=0.5 is out of range"),
                                                ("--lease", "nan", "is not a finite number"),
                                                ("--idle-timeout", "0", "--idle-timeout"),
                                                ("--max-connections", "0", "--max-connections")])
def test_serve_refuses_bad_limits_before_creating_anything(capsys, tmp_path, option, value, words):
    from store_helpers import run_cli

    r = run_cli(capsys, "store", "serve", "--root", tmp_path / "root", "--port", "0", option, value)
    assert r.code == 2 and words in r.err and r.err.count("\n") == 1, r.err
    assert not (tmp_path / "root").exists()
