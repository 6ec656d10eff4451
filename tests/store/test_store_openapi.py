"""The OpenAPI document against the server: the same routes, answers that match the
response schemas, and a fuzzing run over every operation that never gets a 5xx."""

from __future__ import annotations

import http.client
import json
import string
from urllib.parse import quote, urlencode, urlsplit

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store_helpers import TOKEN, StoreProc
from scalai import PTC, ParallelConfig, Placement, TensorSpec
from scalai.planner import Deployment, make_plan
from scalai.planner.serial import copies_to_json
from scalai.store import VersionManifest
from scalai.store.openapi import SCHEMAS, SPEC, schema


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A store with a token holding j/v0 (w: 3x4 float32), so that fuzzed requests can reach it."""
    proc = StoreProc(tmp_path_factory.mktemp("openapi") / "host0", "host0", TOKEN).start()
    c = proc.client()
    c.put("j", "v0", 0, "w", np.arange(12, dtype=np.uint32).reshape(3, 4), "float32")
    ptc = PTC(ParallelConfig(), [TensorSpec("w", (3, 4), "float32")], 0)
    c.commit("j", "v0", VersionManifest("j", "v0", 0, ptc, Placement(1, ("host0",)), {}).to_json())
    yield proc
    proc.kill()


def call(url: str, method: str, path: str, query: dict | None = None, body: bytes | None = None,
         token: str | None = TOKEN, content_type: str = "application/json", headers: dict | None = None):
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    headers = {"Content-Type": content_type, **(headers or {})}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path + ("?" + urlencode(query) if query else ""), body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type", ""), data


def check_response(template: str, method: str, status: int, ctype: str, data: bytes) -> None:
    """The answer matches what the document declares for this operation and status."""
    op = SPEC["paths"][template][method.lower()]
    assert str(status) in op["responses"], f"{method} {template} answered {status}, not in the document"
    content = op["responses"][str(status)].get("content", {})
    if "application/json" in content:
        assert ctype.startswith("application/json"), ctype
        ref = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        jsonschema.validate(json.loads(data), schema(ref), cls=jsonschema.Draft202012Validator)
    elif "application/octet-stream" in content:
        assert ctype == "application/octet-stream"


def test_routes_are_exactly_the_documented_operations(tmp_path):
    from scalai.store.server import StoreConfig, make_app

    app = make_app(StoreConfig(root=str(tmp_path / "r"), name="host0"))
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()}
    documented = {(m, p) for p, ops in SPEC["paths"].items() for m in ops}
    assert served == documented


def test_document_is_well_formed():
    assert SPEC["openapi"].startswith("3.1")
    for name, s in SCHEMAS.items():
        jsonschema.Draft202012Validator.check_schema(s)
    text = json.dumps(SPEC)
    for ref in {r for r in text.split('"$ref": "')[1:]}:
        name = ref.split('"', 1)[0].rsplit("/", 1)[1]
        assert name in SCHEMAS, name
    for path, ops in SPEC["paths"].items():
        params = {p["name"] for op in ops.values() for p in op["parameters"] if p["in"] == "path"}
        assert params == set(part[1:-1] for part in path.split("/") if part.startswith("{")), path
        for op in ops.values():
            assert "401" in op["responses"] and any(s.startswith("2") for s in op["responses"])


def test_answers_match_the_document(live):
    """A session through every operation; each answer checked against its schema."""
    url = live.url
    t = "/v1/jobs/{job}/versions/{version}/ranks/{rank}/tensors/{tensor}"
    lease = "/v1/jobs/{job}/versions/{version}/lease"
    a = np.arange(12, dtype=np.uint32).reshape(3, 4)
    steps = [
        ("/v1/health", "GET", "/v1/health", None, None),
        ("/v1/openapi.json", "GET", "/v1/openapi.json", None, None),
        (t, "PUT", "/v1/jobs/d/versions/v0/ranks/0/tensors/w", {"dtype": "float32", "shape": "3,4"}, a.tobytes()),
        ("/v1/jobs/{job}/versions/{version}", "GET", "/v1/jobs/d/versions/v0", None, None),
    ]
    ptc = PTC(ParallelConfig(), [TensorSpec("w", (3, 4), "float32")], 0)
    manifest = VersionManifest("d", "v0", 0, ptc, Placement(1, ("host0",)), {"step": 1}).to_json()
    deployment = Deployment(ptc, Placement(1, ("host0",)))
    plan = make_plan(deployment, deployment)  # the coordinator's; the store gets its part
    steps += [
        ("/v1/jobs/{job}/versions/{version}/commit", "POST", "/v1/jobs/d/versions/v0/commit", None,
         json.dumps({"manifest": manifest}).encode()),
        (t, "GET", "/v1/jobs/d/versions/v0/ranks/0/tensors/w", {"region": "1:3,0:2"}, None),
        (t, "GET", "/v1/jobs/d/versions/v0/ranks/0/tensors/w", {"region": "9:9,0:2"}, None),
        ("/v1/jobs", "GET", "/v1/jobs", None, None),
        ("/v1/jobs/{job}", "GET", "/v1/jobs/d", None, None),
        ("/v1/usage", "GET", "/v1/usage", None, None),
        ("/v1/jobs/{job}/transform", "POST", "/v1/jobs/d/transform", None, json.dumps({
            "from_version": "v0", "to_version": "v1", "old": {"ptc": manifest["ptc"],
                                                              "placement": manifest["placement"]},
            "new": {"layout": "tp=1,pp=1,dp=1", "placement": manifest["placement"]},
            "peers": {"host0": url}, "plan": copies_to_json(plan, "host0")}).encode()),
        ("/v1/jobs/{job}/versions/{version}", "DELETE", "/v1/jobs/d/versions/v1", None, None),
        ("/v1/jobs/{job}/versions/{version}", "DELETE", "/v1/jobs/d/versions/v1", None, None),
        (lease, "POST", "/v1/jobs/d/versions/v5/lease", {"create": "true"}, None),
        (lease, "POST", "/v1/jobs/d/versions/v5/lease", None, None),
        (lease, "POST", "/v1/jobs/d/versions/v6/lease", None, None),
        (lease, "POST", "/v1/jobs/d/versions/v0/lease", None, None),
        ("/v1/jobs/{job}/versions/{version}", "DELETE", "/v1/jobs/d/versions/v5", None, None),
    ]
    writer = {"X-Scalai-Owner": "doc-writer", "X-Scalai-Lease": "30"}
    steps = [(*step, writer) for step in steps] + [
        (lease, "POST", "/v1/jobs/d/versions/v0/lease", None, None, {"X-Scalai-Owner": "another"}),
        ("/v1/jobs/{job}", "DELETE", "/v1/jobs/d", None, None, {}),
        ("/v1/jobs/{job}", "GET", "/v1/jobs/d", None, None, {}),
    ]
    statuses = []
    for template, method, path, query, body, headers in steps:
        ctype = "application/octet-stream" if method == "PUT" else "application/json"
        status, got_type, data = call(url, method, path, query, body, content_type=ctype, headers=headers)
        check_response(template, method, status, got_type, data)
        statuses.append(status)
    assert statuses == [200, 200, 201, 200, 200, 200, 400, 200, 200, 200, 200, 200, 404,
                        200, 200, 404, 200, 200, 409, 200, 404]


# -- fuzzing ----------------------------------------------------------------------------
_NAMES = st.one_of(st.sampled_from(["j", "v0", "host0", "..", ".", "a..b", "%2e%2e", "a%2Fb", "-x", "0"]),
                   st.text(string.ascii_letters + string.digits + "._-/%\\:~ ", min_size=0, max_size=20),
                   st.text(min_size=1, max_size=8))
_VALUES = st.one_of(st.sampled_from(["0:1", "0:3,0:4", "1:0", "", "3,4", "float32", "-1", "a", "0:1" * 30]),
                    st.text(max_size=30))
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | st.text(max_size=10),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=5),
                     max_leaves=20)
_KEYS = ["manifest", "from_version", "to_version", "old", "new", "peers", "ptc", "placement", "layout",
         "format", "job", "version", "sequence", "tensors", "hosts", "gpus_per_host", "config", "num_layers"]
_BODY = st.one_of(
    _JSON.map(lambda o: json.dumps(o).encode()),
    st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=8).map(lambda o: json.dumps(o).encode()),
    st.binary(max_size=64), st.none())
_OPS = [(path, method) for path, ops in SPEC["paths"].items() for method in ops]
_PTC = PTC(ParallelConfig(), [TensorSpec("w", (3, 4), "float32")], 0)
_MANIFEST = VersionManifest("j", "v0", 0, _PTC, Placement(1, ("host0",)), {"step": 1}).to_json()
_VALID = {
    "commit": {"manifest": _MANIFEST},
    "transform": {"from_version": "v0", "to_version": "v1",
                  "old": {"ptc": _MANIFEST["ptc"], "placement": _MANIFEST["placement"]},
                  "new": {"layout": "tp=1,pp=1,dp=1", "placement": _MANIFEST["placement"]},
                  "peers": {"host0": "http://127.0.0.1:9"}, "checksum": True},
}


@st.composite
def _mutated(draw, template):
    """A valid body with one value somewhere inside replaced: reaches past the schema check."""
    obj = json.loads(json.dumps(template))
    paths = []

    def walk(node, trail):
        paths.append(trail)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            walk(v, trail + [k])
    walk(obj, [])
    trail = draw(st.sampled_from(paths[1:]))
    node = obj
    for k in trail[:-1]:
        node = node[k]
    node[trail[-1]] = draw(_JSON | _VALUES)
    return json.dumps(obj).encode()


@st.composite
def requests(draw):
    template, method = draw(st.sampled_from(_OPS))
    path = template
    for part in [p[1:-1] for p in template.split("/") if p.startswith("{")]:
        value = draw(st.integers(-5, 2**21).map(str) | _NAMES) if part == "rank" else draw(_NAMES)
        path = path.replace("{" + part + "}", quote(value, safe="%/.:~") or "x")
    params = [p["name"] for p in SPEC["paths"][template][method]["parameters"] if p["in"] == "query"]
    query = draw(st.dictionaries(st.sampled_from(params + ["x"]), _VALUES, max_size=4))
    body = draw(_BODY) if method in ("put", "post") else None
    kind = template.rsplit("/", 1)[1]
    if kind in _VALID and draw(st.booleans()):
        body = draw(_mutated(_VALID[kind]) | st.just(json.dumps(_VALID[kind]).encode()))
    if method == "put" and draw(st.booleans()):  # a well-formed upload somewhere
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        query = {"dtype": "float32", "shape": ",".join(map(str, shape))}
        body = b"\1" * (4 * int(np.prod(shape)))
    token = draw(st.sampled_from([TOKEN, TOKEN, TOKEN, None, "x" * 20]))
    return template, method.upper(), path, query, body, token


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(req=requests())
def test_fuzzing_never_gets_a_server_error(live, req):
    template, method, path, query, body, token = req
    try:
        status, ctype, data = call(live.url, method, path, query, body, token)
    except http.client.InvalidURL:
        return  # the client library refuses to send it at all
    assert status < 500, (method, path, query, body, status, data[:300])
    if status >= 400:
        err = json.loads(data)["error"]
        assert err["message"] and "Traceback" not in err["message"]
    assert live.proc.poll() is None
