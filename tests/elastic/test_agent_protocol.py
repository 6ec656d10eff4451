"""The coordinator-agent protocol without a training job: the JSON/HTTP layer, the agent
service (join, reports, long-polled commands, detection of silent agents, fencing by 410),
the relay of workers' local files, and standby workers taking torchrun's place."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time

import pytest

from scalai.elastic.coordinator import AgentService, overdue, parse_join
from scalai.elastic.events import RankLog, write_json_atomic
from scalai.elastic.machine import interface_for
from scalai.elastic.relay import Relay
from scalai.elastic.wire import HttpError, JsonClient, JsonServer, WireError, check_listen, split_address

TOKEN = "t" * 24


def test_addresses_and_listening_rules():
    assert split_address("10.0.0.1:7000") == ("10.0.0.1", 7000)
    assert split_address("[::1]:80") == ("::1", 80)
    for bad in ("10.0.0.1", "host:port", "a:70000"):
        with pytest.raises(ValueError, match="HOST:PORT|0-65535"):
            split_address(bad)
    check_listen("127.0.0.1", None)
    with pytest.raises(ValueError, match="refusing to listen on 10.0.0.1 without a token"):
        check_listen("10.0.0.1", None)
    assert interface_for("127.0.0.1") == "lo"


def test_json_server_routes_tokens_and_errors():
    def echo(request):
        if request.params["name"] == "teapot":
            raise HttpError(418, "short and stout")
        if request.body == "bad":
            raise ValueError("a bad body")
        return 200, {"name": request.params["name"], "body": request.body, "q": request.query}

    server = JsonServer({("POST", "/v1/x/{name}"): (echo, True), ("GET", "/v1/open"): (lambda r: (200, "hi"), False)},
                        token=TOKEN, name="test server")
    try:
        ok = JsonClient(server.url, TOKEN)
        assert ok.post("/v1/x/abc?k=v", {"a": 1}) == {"name": "abc", "body": {"a": 1}, "q": {"k": "v"}}
        assert JsonClient(server.url).get("/v1/open") == "hi"  # a route without the token
        for client, path, body, status, text in [
            (JsonClient(server.url), "/v1/x/abc", {}, 401, "missing or wrong token"),
            (JsonClient(server.url, "w" * 24), "/v1/x/abc", {}, 401, "missing or wrong token"),
            (ok, "/v1/x/teapot", {}, 418, "short and stout"),
            (ok, "/v1/x/abc", "bad", 400, "a bad body"),
            (ok, "/v1/nothing", {}, 404, "no route /v1/nothing on the test server"),
        ]:
            with pytest.raises(WireError) as err:
                client.post(path, body)
            assert (err.value.status, text in err.value.message) == (status, True)
            assert TOKEN not in err.value.message
        with pytest.raises(WireError, match="use POST"):
            ok.get("/v1/x/abc")
    finally:
        server.close()
    with pytest.raises(ConnectionError, match="does not answer"):
        JsonClient(server.url, timeout=2).get("/v1/open")


def _join(client, name="m0", incarnation="i0", **kw):
    body = {"name": name, "incarnation": incarnation, "address": "127.0.0.1", "store": "http://127.0.0.1:9",
            "devices": {"count": 2, "kind": "cpu", "memory_gib": 0}, **kw}
    return client.post("/v1/agents/join", body)


@pytest.fixture
def service():
    items: queue.Queue = queue.Queue()
    svc = AgentService(items.put, {"job": "j", "trainer": {"module": "m"}, "data": None}, lambda: {"state": "x"},
                       lambda body: {"asked": body}, token=TOKEN, dead_after_s=1.0)
    svc.items = items
    yield svc
    svc.close()


def test_agents_join_report_and_fetch_commands(service):
    client = JsonClient(service.url, TOKEN)
    with pytest.raises(WireError, match="devices.count must be at least 1"):
        _join(client, devices={"count": 0, "kind": "cpu"})
    welcome = _join(client)
    assert welcome["epoch"] == service.epoch and welcome["job"] == "j" and welcome["dead_after_s"] == 1.0
    kind, record, previous = service.items.get_nowait()
    assert (kind, record.name, record.devices, previous) == ("joined", "m0", 2, None)
    assert _join(client)["epoch"] == service.epoch  # the same incarnation again: idempotent
    with pytest.raises(WireError, match="an agent named m0 is registered and alive"):
        _join(client, incarnation="i1")
    q = f"incarnation=i0&epoch={service.epoch}"
    report = {"incarnation": "i0", "epoch": service.epoch, "metrics": [[3, {"step": 1}]],
              "ptcs": [[3, True, {"p": 1}]], "reports": [[3, 0, {"times": {}}]], "exits": [[3, 1, 75]],
              "leaving": True, "data": {"digest": "d"}}
    client.post("/v1/agents/m0/report", report)
    got = [service.items.get_nowait() for _ in range(service.items.qsize())]
    assert [g[0] for g in got] == ["row", "ptc", "report", "exit", "data", "leaving"]  # the order that counts
    assert got[0] == ("row", 3, {"step": 1}) and got[3] == ("exit", 3, 1, 75)
    t0 = time.monotonic()
    assert client.get(f"/v1/agents/m0/commands?{q}&after=0&wait=0.3") == {"commands": []}
    assert time.monotonic() - t0 >= 0.25  # a long poll
    threading.Timer(0.2, lambda: service.send("m0", "signal", generation=3, what="stop")).start()
    got = client.get(f"/v1/agents/m0/commands?{q}&after=0&wait=10")["commands"]
    assert [(c["seq"], c["kind"], c["what"]) for c in got] == [(1, "signal", "stop")]
    service.send("m0", "kill", generation=3)
    assert [c["seq"] for c in client.get(f"/v1/agents/m0/commands?{q}&after=1")["commands"]] == [2]
    assert service.delivered(1.0)
    assert client.post("/v1/scale", {"devices": 2}) == {"accepted": {"asked": {"devices": 2}}}


def test_a_silent_agent_is_declared_dead_and_must_join_again(service):
    client = JsonClient(service.url, TOKEN)
    _join(client)
    assert overdue({"a": 9.9, "b": 10.0, "c": 9.0}, 15.0, 5.0) == ["a", "c"]  # more than 5 s
    assert service.overdue() == []
    time.sleep(1.3)
    assert service.overdue() == ["m0"] and service.overdue() == []
    body = {"incarnation": "i0", "epoch": service.epoch}
    with pytest.raises(WireError) as err:
        client.post("/v1/agents/m0/report", body)
    assert err.value.status == 410
    _join(client, incarnation="i1")  # a new incarnation may take the name of a dead one
    with pytest.raises(WireError) as err:
        client.post("/v1/agents/m0/report", {"incarnation": "i1", "epoch": "another coordinator"})
    assert err.value.status == 410
    with pytest.raises(WireError) as err:
        JsonClient(service.url).post("/v1/agents/join", {})
    assert err.value.status == 401
    with pytest.raises(ValueError, match="agent name"):
        parse_join({"name": "../x", "incarnation": "i", "address": "a", "store": "s",
                    "devices": {"count": 1, "kind": "cpu"}})


def test_a_silent_agent_whose_store_refuses_connections_is_found_before_the_detection_time(service):
    """What the runner probes: agents silent for a while (not yet overdue), with their store
    URL; a probe that finds the store's port closed declares the agent dead at once, unless
    it spoke meanwhile. A listening port (a frozen machine accepts) is not a refusal."""
    import socket

    from scalai.elastic.wire import refuses_connections

    listening = socket.create_server(("127.0.0.1", 0))
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        assert not refuses_connections(f"http://127.0.0.1:{listening.getsockname()[1]}")
        assert refuses_connections(f"http://127.0.0.1:{closed_port}")
        assert not refuses_connections("http://10.255.255.1:9", timeout=0.2)  # no answer: not a refusal
    finally:
        listening.close()
    client = JsonClient(service.url, TOKEN)
    _join(client, store=f"http://127.0.0.1:{closed_port}")
    assert service.silent(0.3) == []
    time.sleep(0.4)
    assert service.silent(0.3) == [("m0", f"http://127.0.0.1:{closed_port}")]
    client.post("/v1/agents/m0/report", {"incarnation": "i0", "epoch": service.epoch})
    assert not service.declare_dead("m0", 0.3)  # it spoke meanwhile: alive after all
    time.sleep(0.4)
    assert service.declare_dead("m0", 0.3) and not service.declare_dead("m0", 0.3)
    assert service.silent(0.0) == [] and service.overdue() == []  # dead once, not again


def test_the_relay_sends_what_workers_wrote_once_in_order(tmp_path):
    run = tmp_path / "run"
    relay = Relay(run)
    metrics = run / "metrics" / "g002.jsonl"
    metrics.parent.mkdir(parents=True)
    relay.watch(2, [0, 1], metrics)
    log = RankLog(run, 2, 0, host="m0")
    write_json_atomic(run / "events" / "g002" / "layout.json", {"config": "x"})
    metrics.write_text(json.dumps({"step": 5}) + "\n" + '{"step": 6')  # a torn last line waits
    relay.collect()
    body = relay.pending()
    assert body["metrics"] == [[2, {"step": 5}]] and body["ptcs"] == [[2, False, {"config": "x"}]]
    assert [r[:2] for r in body["reports"]] == [[2, 0]]
    log.mark("ready")  # changed while the body was on its way: sent next time
    relay.collect()
    relay.sent(body)
    again = relay.pending()
    assert again["metrics"] == [] and again["ptcs"] == [] and [r[:2] for r in again["reports"]] == [[2, 0]]
    assert "ready" in again["reports"][0][2]["times"]
    relay.sent(again)
    relay.collect()
    assert relay.empty() and relay.last_step == 5
    relay.exited(2, 1, 75, tail="boom")
    with open(metrics, "a") as f:
        f.write("}\n")
    relay.collect()
    relay.fenced()  # the coordinator gave up on generation 2: only the rows it ran are kept
    body = relay.pending()
    assert body == {"metrics": [[2, {"step": 6}]], "ptcs": [], "reports": [], "exits": []}


@pytest.mark.slow
def test_standby_workers_become_torchrun_like_workers(tmp_path):
    """A standby (torch imported) takes an assignment: torchrun's environment, the module
    run as __main__, its output in its log; a used standby is replaced at once, in the
    background (its imports at the lowest priority, its main thread at the normal one)."""
    import os

    from scalai.elastic.machine import StandbyPool, Workers

    (tmp_path / "probe_worker.py").write_text(
        "import os, sys, json\n"
        "print(json.dumps({k: os.environ.get(k) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'SCALAI_X')}"
        " | {'argv': sys.argv[1:], 'torch': 'torch' in sys.modules, 'name': __name__,"
        " 'nice': os.getpriority(os.PRIO_PROCESS, 0)}))\n"
        "sys.exit(int(os.environ['RANK']) + 3)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    nice = os.getpriority(os.PRIO_PROCESS, 0)  # ours, which every worker must have
    pool = StandbyPool({"module": "probe_worker"}, env, tmp_path, size=1)
    try:
        assert pool.wait_warm(120) and pool.warm() == 1
        first = pool._ready[0]
        workers = Workers(pool, tmp_path / "run", tmp_path)
        workers.launch(4, [6, 7], "probe_worker", ["--a", "b"], {"WORLD_SIZE": "8", "SCALAI_X": "y"})
        deadline = time.time() + 120
        exits = []
        while len(exits) < 2 and time.time() < deadline:
            exits += workers.exits()
            time.sleep(0.1)
        assert sorted(exits) == [(4, 6, 9), (4, 7, 10)]
        out = json.loads((tmp_path / "g004-rank7.log").read_text().splitlines()[-1])
        assert out == {"RANK": "7", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "SCALAI_X": "y", "argv": ["--a", "b"],
                       "torch": True, "name": "__main__", "nice": nice}
        assert json.loads((tmp_path / "g004-rank6.log").read_text().splitlines()[-1])["nice"] == nice
        assert pool.wait_warm(120)  # replaced in the background
        (spare,) = pool._ready
        assert spare is not first
        assert b"--background" in open(f"/proc/{spare.pid}/cmdline", "rb").read().split(b"\0")
        assert os.getpriority(os.PRIO_PROCESS, spare.pid) == nice  # its main thread, which will run the worker
    finally:
        pool.close()


def test_background_warm_up_runs_at_the_lowest_priority_in_its_own_thread():
    """The warm-up of a replacement standby runs niced in a thread of its own; the caller's
    priority, which the worker inherits, stays as it was (both read back from the kernel)."""
    import os
    import threading

    from scalai.elastic.standby import BACKGROUND_NICE, in_background

    seen = {}

    def work():
        tid = threading.get_native_id()
        seen["tid"], seen["nice"] = tid, os.getpriority(os.PRIO_PROCESS, tid)

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    in_background(work).join()
    assert seen["tid"] != threading.get_native_id()
    assert seen["nice"] == BACKGROUND_NICE
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


@pytest.mark.slow
def test_a_background_standby_assigned_before_its_imports_restarts_at_normal_priority(tmp_path):
    """A replacement standby still importing (its warm-up at the lowest priority) when its
    assignment comes does not make the worker wait on those imports: it starts again as a
    plain standby, which takes the assignment (the worker at our priority, no --background
    in its command line)."""
    import os
    import subprocess

    from scalai.elastic.standby import assignment

    (tmp_path / "slow_plugin.py").write_text(
        "import time\n"
        "from scalai.elastic.trainer import ScriptTrainer\n"
        "class Slow(ScriptTrainer):\n"
        "    def warm(self):\n"
        "        time.sleep(2)\n"
        "def trainer(spec):\n"
        "    return Slow(spec['module'], spec['plugin'])\n")
    (tmp_path / "probe_worker.py").write_text(
        "import os, json\n"
        "cmd = open('/proc/self/cmdline', 'rb').read().split(b'\\0')\n"
        "print(json.dumps({'background': b'--background' in cmd, 'nice': os.getpriority(os.PRIO_PROCESS, 0),"
        " 'pid': os.getpid()}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    spec = json.dumps({"module": "probe_worker", "plugin": "slow_plugin"})
    proc = subprocess.Popen([sys.executable, "-m", "scalai.elastic.standby", spec, "--background"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, cwd=tmp_path)
    try:
        proc.stdin.write(assignment("probe_worker", [], {}, str(tmp_path), str(tmp_path / "w.log")))
        proc.stdin.close()  # at once: long before its warm-up (2 s) is done
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = json.loads((tmp_path / "w.log").read_text().splitlines()[-1])
    assert out == {"background": False, "nice": os.getpriority(os.PRIO_PROCESS, 0), "pid": proc.pid}
