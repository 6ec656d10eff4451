"""Property-based fuzzing of the store's request bodies (issue 11): random JSON, and valid
commit and transformation bodies of a real model's layout with a few values mutated,
replaced, deleted, nested or made extreme. Every answer is the store's own: a 2xx, or a
JSON error with one of its codes and a one-line message (502 only as ``peer_failed``);
never a 500, never a traceback in its log, and the store keeps answering."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from store_helpers import StoreProc
from scalai import Placement
from scalai.models import model_ptc
from scalai.store import VersionManifest

CODES = {"bad_request", "bad_body", "limit_exceeded", "not_found", "conflict", "storage_full",
         "request_entity_too_large", "request_timeout", "peer_failed"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A store holding j/v0: gpt-tiny in tp=2 (what the transformation bodies start from)."""
    from scalai.models.synth import write_synthetic_checkpoint
    from scalai.store import StoreCluster

    base = tmp_path_factory.mktemp("fuzz")
    write_synthetic_checkpoint("gpt-tiny", base / "ckpt", "tp=2,pp=1,dp=1")
    proc = StoreProc(base / "host0", "host0", log_level="INFO").start()
    StoreCluster([proc.url]).push(str(base / "ckpt"), "j", gpus_per_host=2, version="v0")
    yield proc
    proc.kill()
    log = proc.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def _templates(url: str) -> dict[str, dict]:
    from scalai.planner import Deployment, make_plan
    from scalai.planner.serial import copies_to_json

    ptc = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1")  # the layout of j/v0
    manifest = VersionManifest("j", "v1", 1, ptc, Placement(2, ("host0",)), {"step": 3, "data": {"epoch": 0}})
    m = manifest.to_json()
    place = Placement(2, ("host0",))
    plan = make_plan(Deployment(ptc, place), Deployment(ptc.relayout(ptc.config.with_(tp=1, pp=2)), place))
    return {
        "commit": {"manifest": m},
        "transform": {"from_version": "v0", "to_version": "v2",
                      "old": {"ptc": m["ptc"], "placement": m["placement"], "replicas": "all"},
                      "new": {"layout": "tp=1,pp=2,dp=1", "placement": m["placement"]},
                      "peers": {"host0": url}, "plan": copies_to_json(plan, "host0"), "checksum": True,
                      "concurrency": 2},
    }


_LEAF = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
         | st.text(max_size=12)
         | st.sampled_from([0, -1, 1, 7, 10**12, 2**63, 1.5, "", "tp=0", "tp=1,pp=1,dp=1000000", "tp=3,pp=1,dp=1",
                            "zero=2", "layer:99", "layer:-1", "vocab", "fused", "split", "bfloat16", "float128",
                            "a" * 300, "v0", "v1", "host9", "http://127.0.0.1:9"]))
_JSON = st.recursive(_LEAF, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                        max_size=4), max_leaves=12)


@st.composite
def _nested(draw) -> str:
    """The JSON text of a value nested 50 to 100,000 levels (lists or objects)."""
    depth = draw(st.sampled_from([50, 99, 100, 101, 1000, 100_000]))
    opening, closing = draw(st.sampled_from([("[", "]"), ('{"k":', "}")]))
    return f"{opening * depth}1{closing * depth}"


def _paths(node, trail=()):
    yield trail
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _paths(v, trail + (k,))


@st.composite
def _mutated(draw, template: dict) -> bytes:
    """The template with 1-3 edits at random places; some values become raw (deep) JSON."""
    obj = json.loads(json.dumps(template))
    raw: dict[str, str] = {}
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            break
        trail = draw(st.sampled_from(paths))
        parent = obj
        for k in trail[:-1]:
            parent = parent[k]
        key = trail[-1]
        edit = draw(st.sampled_from(["replace", "replace", "delete", "wrap", "extra", "nest"]))
        if edit == "replace":
            parent[key] = draw(_JSON)
        elif edit == "delete":
            if isinstance(parent, dict):
                del parent[key]
            else:
                parent.pop(key)
        elif edit == "wrap":
            parent[key] = [parent[key]] if draw(st.booleans()) else {"x": parent[key]}
        elif edit == "extra" and isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(_JSON)
        elif edit == "nest":
            marker = f"@@nested{len(raw)}@@"
            raw[marker] = draw(_nested())
            parent[key] = marker
    text = json.dumps(obj)
    for marker, value in raw.items():
        text = text.replace(json.dumps(marker), value)
    return text.encode()




def _post(url: str, path: str, body: bytes, headers: dict | None = None):
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


_TEMPLATES: dict[str, dict] = {}


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(kind=st.sampled_from(["commit", "transform"]),
       how=st.sampled_from(["mutated", "mutated", "mutated", "random", "bytes", "truncated"]), data=st.data())
def test_request_bodies_get_the_stores_own_answers(live, kind, how, data):
    if not _TEMPLATES:
        _TEMPLATES.update(_templates(live.url))
    template = _TEMPLATES[kind]
    if how == "mutated":
        body = data.draw(_mutated(template))
    elif how == "random":
        body = json.dumps(data.draw(_JSON)).encode()
    elif how == "bytes":
        body = data.draw(st.binary(max_size=200))
    else:  # a valid body cut short
        text = json.dumps(template).encode()
        body = text[:data.draw(st.integers(0, len(text) - 1))]
    path = "/v1/jobs/j/versions/v1/commit" if kind == "commit" else "/v1/jobs/j/transform"
    owner = data.draw(st.sampled_from([None, "fuzz-a", "fuzz-b"]))
    status, answer = _post(live.url, path, body, {"X-Scalai-Owner": owner} if owner else None)
    event(f"{kind} {how}: {status}")
    assert status < 500 or status == 502, (status, answer[:500], body[:300])
    if status >= 400:
        err = json.loads(answer)["error"]
        assert err["code"] in CODES, err
        assert (status == 502) == (err["code"] == "peer_failed"), err
        assert err["message"] and "\n" not in err["message"] and "Traceback" not in err["message"], err
    assert live.proc.poll() is None
    status, _ = _post(live.url, "/v1/jobs/j/versions/v9/lease", b"", {"X-Scalai-Owner": "fuzz-probe"})
    assert status == 404  # and it keeps answering


@settings(max_examples=60, deadline=None, derandomize=True)
@given(owner=st.text(max_size=40) | st.sampled_from(["", "a/b", "..", "x" * 200, "ok-owner"]),
       lease=st.text(max_size=12) | st.sampled_from(["0", "1", "3600", "3601", "nan", "inf", "-5", "1e9", "2.5"]))
def test_writer_headers_are_checked(live, owner, lease):
    try:
        status, answer = _post(live.url, "/v1/jobs/j/versions/v7/lease?create=true", b"",
                               {"X-Scalai-Owner": owner, "X-Scalai-Lease": lease})
    except (ValueError, http.client.InvalidURL):  # the client library refuses to send such a header
        return
    assert status in (200, 400), (status, answer)
    if not all(" " <= c <= "~" for c in owner + lease):  # not valid HTTP: the HTTP layer's plain 400
        assert status == 400
        return
    if status == 400:
        assert json.loads(answer)["error"]["code"] == "bad_request"
    else:
        assert json.loads(answer)["owner"] == owner
        http_delete(live.url, "/v1/jobs/j/versions/v7")


def http_delete(url: str, path: str) -> None:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("DELETE", path)
    conn.getresponse().read()
    conn.close()
