"""Schedule files: validation and ordering."""

import json

import pytest

from scalai.config import ParallelConfig
from scalai.elastic.schedule import load_schedule, parse_schedule


def test_events_parse_and_sort_by_trigger(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"time": 5, "redeploy": True}, {"step": 20, "fail": 1},
                                {"step": 10, "layout": "tp=1,pp=2,dp=2"}, {"step": 3, "devices": 4}]))
    events = load_schedule(path)
    assert [e.action for e in events] == ["devices", "layout", "fail", "redeploy"]
    assert events[1].value == ParallelConfig(pp=2, dp=2)
    assert events[3].time == 5.0 and events[3].step is None
    assert parse_schedule([e.to_json() for e in events]) == [
        type(e)(e.action, e.value, e.step, e.time, i) for i, e in enumerate(events)]


@pytest.mark.parametrize("raw, fragment", [
    ({"devices": 4}, "exactly one of \"step\" and \"time\""),
    ({"step": 1, "time": 2, "devices": 4}, "exactly one of"),
    ({"step": 1}, "exactly one action"),
    ({"step": 1, "devices": 0}, "devices=0 must be an integer >= 1"),
    ({"step": -1, "devices": 2}, "step=-1"),
    ({"step": 1, "layout": "tp=x"}, "bad value"),
    ({"step": 1, "redeploy": False}, "redeploy must be true"),
    ({"step": 1, "grow": 2}, "unknown key"),
    ("step 1", "must be a JSON object"),
])
def test_bad_events_name_the_event_and_the_fix(raw, fragment):
    with pytest.raises(ValueError, match="schedule event 1: .*" + fragment.replace("(", r"\(")):
        parse_schedule([{"step": 0, "devices": 1}, raw])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_schedule(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_schedule(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="must be a JSON list"):
        parse_schedule({"step": 1})


def test_events_and_requests_name_one_device_in_the_singular():
    from scalai.elastic.controller import request_reason

    one, two = parse_schedule([{"step": 3, "devices": 1}, {"step": 4, "devices": 2}])
    assert (one.describe(), two.describe()) == ("scale to 1 device at step 3", "scale to 2 devices at step 4")
    assert request_reason("devices", 1) == "scale to 1 device (request)"
