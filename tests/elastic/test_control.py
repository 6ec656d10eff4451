"""``scalai scale``'s side of the coordinator: requests parsed strictly, the registry, the
token when the run has one, hostile bodies refused in one line."""

import json
import queue
import urllib.request

import pytest

from scalai.config import ParallelConfig
from scalai.elastic.control import find_endpoint, parse_request, register, send_scale, unregister
from scalai.elastic.coordinator import AgentService

TOKEN = "t" * 24


def test_parse_request():
    assert parse_request({"devices": 4}) == ("devices", 4)
    assert parse_request({"layout": "tp=2,pp=1,dp=2"}) == ("layout", ParallelConfig(tp=2, dp=2))
    assert parse_request({"redeploy": True}) == ("redeploy", True)
    for bad in ({}, {"devices": 0}, {"devices": True}, {"devices": 2, "layout": "tp=1"}, [4], {"grow": 1},
                {"redeploy": 1}):
        with pytest.raises(ValueError):
            parse_request(bad)


@pytest.fixture
def server(monkeypatch, tmp_path):
    monkeypatch.setenv("SCALAI_CACHE", str(tmp_path / "cache"))
    asked = []

    def scale(body):
        action, value = parse_request(body)
        if value == 99:
            raise ValueError("only 4 healthy devices are left")
        asked.append((action, value))
        return {"layout": "tp=1,pp=1,dp=2", "hosts": ["host0"]}

    made = []

    def make(token=None):
        s = AgentService(queue.Queue().put, {}, lambda: {"job": "j", "state": "running"}, scale,
                         token=token or "a" * 24, control_token=token)
        register("j", s.url, tmp_path)
        made.append(s)
        return s, asked

    yield make
    for s in made:
        s.close()
    unregister("j")


def test_scale_and_status_over_http(server, tmp_path):
    s, asked = server()
    assert find_endpoint("j") == s.url == json.loads((tmp_path / "control.json").read_text())["url"]
    assert send_scale(s.url, {"devices": 2})["accepted"]["layout"] == "tp=1,pp=1,dp=2"
    assert asked == [("devices", 2)]
    with urllib.request.urlopen(f"{s.url}/v1/status") as resp:
        assert json.loads(resp.read())["state"] == "running"
    with pytest.raises(ValueError, match="the runner refused: only 4 healthy devices"):
        send_scale(s.url, {"devices": 99})
    with pytest.raises(ValueError, match="give exactly one of"):
        send_scale(s.url, {"devices": 2, "redeploy": True})
    unregister("j")
    with pytest.raises(FileNotFoundError, match="no running job named 'j'"):
        find_endpoint("j")
    s.close()
    with pytest.raises(ConnectionError, match="no runner answers"):
        send_scale(s.url, {"devices": 2}, timeout=2)


def test_a_token_is_required_when_the_run_has_one(server):
    s, asked = server(token=TOKEN)
    with pytest.raises(ValueError, match="missing or wrong token"):
        send_scale(s.url, {"devices": 2})
    with pytest.raises(ValueError, match="missing or wrong token"):
        send_scale(s.url, {"devices": 2}, token="x" * 24)
    assert send_scale(s.url, {"devices": 2}, token=TOKEN)["accepted"]


def test_a_busy_port_is_refused_in_one_line(server):
    s, _ = server()
    port = int(s.url.rsplit(":", 1)[1])
    with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}.*choose another address or port"):
        AgentService(queue.Queue().put, {}, dict, dict, port=port)


@pytest.mark.parametrize("body, fragment", [
    (b"[" * 2000 + b"]" * 2000, "nests JSON 2000 levels deep"),
    (b'{"devices": NaN}', "NaN is not a JSON number"),
    (b'{"devices": 4', "not valid JSON"),
])
def test_a_hostile_body_is_a_400_with_one_line(server, body, fragment):
    import urllib.error

    s, asked = server()
    req = urllib.request.Request(f"{s.url}/v1/scale", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 400
    error = json.loads(refused.value.read())["error"]
    assert fragment in error and "\n" not in error
    assert asked == []
