"""Security of the store: tokens on every request, names that cannot escape the root,
regions checked against shapes, bounded bodies, JSON errors without tracebacks, and no
listening off loopback without a token."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from urllib.parse import urlsplit

import numpy as np
import pytest

from store_helpers import TOKEN, StoreProc
from scalai import PTC, ParallelConfig, Placement, TensorSpec
from scalai.store import StoreRequestError, VersionManifest

TENSOR = "/v1/jobs/j/versions/v0/ranks/0/tensors/w"


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """Send exactly ``path`` (no client-side normalization); returns (status, parsed JSON or bytes)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _commit_w(client, array):
    client.put("j", "v0", 0, "w", array, "float32")
    ptc = PTC(ParallelConfig(), [TensorSpec("w", array.shape, "float32")], 0)
    client.commit("j", "v0", VersionManifest("j", "v0", 0, ptc, Placement(1, (client.name,)), {}).to_json())


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One store with a token, holding j/v0 (w: 4x4 float32) and k/v0 (w: 16 float32, flat)."""
    proc = StoreProc(tmp_path_factory.mktemp("sec") / "host0", "host0", TOKEN).start()
    c = proc.client()
    _commit_w(c, np.zeros((4, 4), np.uint32))
    c.put("k", "v0", 0, "w", np.arange(16, dtype=np.uint32), "float32")
    ptc = PTC(ParallelConfig(), [TensorSpec("w", (16,), "float32")], 0)
    c.commit("k", "v0", VersionManifest("k", "v0", 0, ptc, Placement(1, (c.name,)), {}).to_json())
    yield proc
    proc.kill()


ROUTES = [("GET", "/v1/health"), ("GET", "/v1/usage"), ("GET", "/v1/openapi.json"), ("GET", "/v1/jobs"),
          ("GET", "/v1/jobs/j"), ("DELETE", "/v1/jobs/j"), ("GET", "/v1/jobs/j/versions/v0"),
          ("DELETE", "/v1/jobs/j/versions/v0"), ("POST", "/v1/jobs/j/versions/v0/commit"),
          ("GET", TENSOR), ("PUT", TENSOR + "?dtype=float32&shape=2"), ("POST", "/v1/jobs/j/transform"),
          ("GET", "/v1/no/such/route")]


@pytest.mark.parametrize("headers", [{}, auth("wrong-token-0123456789"), {"Authorization": TOKEN},
                                     {"Authorization": "Basic " + TOKEN}, auth(TOKEN + "x"), auth(TOKEN[:-1])],
                         ids=["none", "wrong", "no-scheme", "basic", "longer", "shorter"])
def test_every_route_needs_the_token(shared, headers):
    for method, path in ROUTES:
        status, body = raw(shared.url, method, path, body=b"{}" if method in ("POST", "PUT") else None,
                           headers=headers)
        assert status == 401, (method, path, status, body)
        assert body["error"]["code"] == "unauthorized"
    # nothing was deleted or changed by the refused requests
    np.testing.assert_array_equal(shared.client().read("j", "v0", 0, "w"), np.zeros((4, 4), np.uint32))


def test_right_token_passes_and_client_reports_refusal(shared):
    status, body = raw(shared.url, "GET", "/v1/health", headers=auth())
    assert status == 200 and body["name"] == "host0"
    from scalai.store import StoreClient

    with pytest.raises(StoreRequestError, match="requires a token") as e:
        StoreClient(shared.url).health()
    assert e.value.status == 401


@pytest.mark.parametrize("path", [
    "/v1/jobs/../versions/v0", "/v1/jobs/..%2F..%2Fetc/versions/v0", "/v1/jobs/j/versions/..%2Fx",
    "/v1/jobs/j/versions/v0/ranks/0/tensors/..%2F..%2Fpasswd", "/v1/jobs/j/versions/v0/ranks/0/tensors/..",
    "/v1/jobs/%2e%2e", "/v1/jobs/.hidden", "/v1/jobs/a%00b", "/v1/jobs/j/versions/v0/ranks/-1/tensors/w",
    "/v1/jobs/j/versions/v0/ranks/1e3/tensors/w", "/v1/jobs/" + "a" * 200,
    "/v1/jobs/j/versions/v0/ranks/0/tensors/.w"])
def test_traversal_and_bad_names_are_400(shared, path):
    for method in ("GET", "DELETE", "PUT"):
        p = path + ("?dtype=float32&shape=1" if method == "PUT" else "")
        status, body = raw(shared.url, method, p, body=b"\0" * 4 if method == "PUT" else None, headers=auth())
        assert status in (400, 405), (method, path, status, body)
        assert "error" in body
    assert not any(p.name not in ("jobs", "uploads") and not p.name.startswith(".") for p in shared.root.iterdir())
    assert not list((shared.root / "uploads").iterdir())
    assert sorted(p.name for p in (shared.root / "jobs").iterdir()) == ["j", "k"]


@pytest.mark.parametrize("query,why", [
    ("region=0:5,0:4", "does not lie inside"), ("region=0:4", "does not lie inside"),
    ("region=0:4,0:4,0:1", "does not lie inside"), ("region=3:2,0:4", "before start"),
    ("region=a:b,0:4", "malformed"), ("region=0:4;0:4", "malformed"), ("region=-1:2,0:4", "malformed"),
    ("region=0:99999999999999999999,0:4", "malformed"), ("region=0:4,0:4&view=16&sub=0:16", "1-d"),
    ("view=4,4", "need a region"), ("region=0:4,0:4&bogus=1", "unknown query"),
    ("region=" + ",".join(["0:1"] * 40), "more than 16")])
def test_bad_regions_are_400(shared, query, why):
    status, body = raw(shared.url, "GET", f"{TENSOR}?{query}", headers=auth())
    assert status == 400 and why in body["error"]["message"], body


def test_bad_views_of_flat_shards_are_400(shared):
    flat = TENSOR.replace("/jobs/j/", "/jobs/k/")
    for query, why in (("region=0:16&view=4,5&sub=0:1,0:1", "has 20 elements"),
                       ("region=0:16&view=4,4&sub=0:5,0:1", "does not lie inside"),
                       ("region=0:16&view=4,4", "together")):
        status, body = raw(shared.url, "GET", f"{flat}?{query}", headers=auth())
        assert status == 400 and why in body["error"]["message"], body
    status, body = raw(shared.url, "GET", f"{flat}?region=0:16&view=4,4&sub=1:3,1:2", headers=auth())
    assert status == 200 and np.frombuffer(body, np.uint32).tolist() == [5, 9]


def test_upload_sizes_are_bounded(stores):  # its own store: a small --max-upload
    s = stores(1, token=TOKEN, extra=("--max-upload", "1000"))[0]
    h = auth()
    status, body = raw(s.url, "PUT", TENSOR + "?dtype=float32&shape=300", b"\0" * 1200, h)
    assert status == 413 and "larger than this store accepts" in body["error"]["message"]
    # declared small, Content-Length too big
    status, body = raw(s.url, "PUT", TENSOR + "?dtype=float32&shape=2", b"\0" * 5000, h)
    assert status == 413
    # declared shape says more than the limit, whatever the body
    status, _ = raw(s.url, "PUT", TENSOR + "?dtype=float32&shape=100000", b"\0" * 8, h)
    assert status == 413
    # body and shape disagree
    status, body = raw(s.url, "PUT", TENSOR + "?dtype=float32&shape=2", b"\0" * 12, h)
    assert status == 400 and "needs 8" in body["error"]["message"]
    for q in ("dtype=complex64&shape=2", "dtype=float32&shape=2,x", "shape=2", "dtype=float32&shape=2&x=1"):
        status, body = raw(s.url, "PUT", TENSOR + "?" + q, b"\0" * 8, h)
        assert status == 400, (q, body)
    status, body = raw(s.url, "PUT", TENSOR + "?dtype=float32&shape=2", b"\0" * 8, h)
    assert status == 201
    assert s.client().usage()["memory_bytes"] == 8  # refused uploads left nothing behind
    assert not [p for p in (s.root / "jobs").rglob(".*tmp*")] and not list((s.root / "uploads").iterdir())
    assert s.client().usage()["uploading_bytes"] == 0


def test_json_bodies_are_bounded_and_validated(shared):
    s = shared
    h = {**auth(), "Content-Type": "application/json"}
    status, body = raw(s.url, "POST", "/v1/jobs/j/versions/v0/commit", b"[" * (65 << 20), h)
    assert status == 413
    for bad in (b"{", b"[]", b'{"manifest": 3}', b'{"manifest": {}, "x": 1}', b"\xff\xfe",
                json.dumps({"manifest": {"format": "scalai-store-version"}}).encode()):
        status, body = raw(s.url, "POST", "/v1/jobs/j/versions/v0/commit", bad, h)
        assert status == 400 and "Traceback" not in json.dumps(body), (bad, body)
    status, body = raw(s.url, "POST", "/v1/jobs/j/transform", b'{"from_version": "v0"}', h)
    assert status == 400 and "TransformRequest" in body["error"]["message"]


def test_errors_are_json_never_tracebacks(shared):
    for method, path in (("GET", "/v1/nope"), ("PATCH", "/v1/jobs/j"), ("GET", TENSOR + "x")):
        status, body = raw(shared.url, method, path, headers=auth())
        assert 400 <= status < 500 and set(body) == {"error"}, (method, path, status, body)
        assert "Traceback" not in body["error"]["message"]


def test_refuses_to_listen_off_loopback_without_token(tmp_path):
    out = subprocess.run([sys.executable, "-m", "scalai.cli", "store", "serve", "--root", str(tmp_path / "r"),
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in out.stderr
    assert "Traceback" not in out.stderr
    from scalai.store.daemon import check_bind, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("0.0.0.0")
    check_bind("10.0.0.1", TOKEN)


def test_weak_tokens_are_refused(tmp_path):
    from scalai.store import load_token

    (tmp_path / "t").write_text("short\n")
    with pytest.raises(ValueError, match="at least 16"):
        load_token(tmp_path / "t")
    with pytest.raises(ValueError, match="cannot read token file"):
        load_token(tmp_path / "missing")
    (tmp_path / "t").write_text(TOKEN + "\n")
    assert load_token(tmp_path / "t") == TOKEN


def test_file_paths_go_to_loopback_clients_only():
    from scalai.store.server import _loopback

    assert _loopback("127.0.0.1") and _loopback("127.0.0.12") and _loopback("::1")
    assert not _loopback("10.0.0.5") and not _loopback("192.168.1.2") and not _loopback(None)
    assert not _loopback("not an address")
