"""The runner's control endpoint: requests parsed strictly, loopback by default, token otherwise."""

import json
import urllib.request

import pytest

from scalai.config import ParallelConfig
from scalai.elastic.control import ControlServer, find_endpoint, parse_request, send_scale

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

    def scale(action, value):
        if value == 99:
            raise ValueError("only 4 healthy devices are left")
        asked.append((action, value))
        return {"layout": "tp=1,pp=1,dp=2", "hosts": ["host0"]}

    made = []

    def make(token=None):
        s = ControlServer(lambda: {"job": "j", "state": "running"}, scale, token=token)
        s.register("j", tmp_path)
        made.append(s)
        return s, asked

    yield make
    for s in made:
        s.close("j")


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
    s.close("j")
    with pytest.raises(FileNotFoundError, match="no running job named 'j'"):
        find_endpoint("j")
    with pytest.raises(ConnectionError, match="no runner answers"):
        send_scale(s.url, {"devices": 2}, timeout=2)


def test_a_token_is_required_when_set_and_off_loopback(server):
    s, asked = server(token=TOKEN)
    with pytest.raises(ValueError, match="missing or wrong token"):
        send_scale(s.url, {"devices": 2})
    with pytest.raises(ValueError, match="missing or wrong token"):
        send_scale(s.url, {"devices": 2}, token="x" * 24)
    assert send_scale(s.url, {"devices": 2}, token=TOKEN)["accepted"]
    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0 without a token"):
        ControlServer(dict, lambda a, v: {}, host="0.0.0.0")


def test_a_busy_control_port_is_refused_in_one_line(server):
    s, _ = server()
    port = int(s.url.rsplit(":", 1)[1])
    with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}.*choose another --control-port"):
        ControlServer(dict, lambda a, v: {}, port=port)


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
    assert send_scale(s.url, {"devices": 2})["accepted"]  # and it still answers
