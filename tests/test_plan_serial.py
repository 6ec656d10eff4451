"""Plan slices as JSON: what a coordinator ships each host instead of planning again."""

from __future__ import annotations

import json

import pytest

from scalai.config import Placement
from scalai.models import model_ptc
from scalai.planner import Deployment, make_plan
from scalai.planner.serial import copies_from_json, copies_to_json, plan_slice


@pytest.mark.parametrize("a, b", [("tp=2,pp=2,dp=2", "tp=1,pp=2,dp=4,zero=1"),
                                  ("tp=1,pp=1,dp=4,zero=1", "tp=4,pp=2,dp=1")])
def test_every_hosts_slice_round_trips_through_json(a, b):
    old = Deployment(model_ptc("llama-tiny", a), Placement(2, ("h0", "h1", "h2", "h3")))
    new = Deployment(model_ptc("llama-tiny", b), Placement(2, ("h2", "h3", "h0", "h1")))
    plan = make_plan(old, new)
    assert any(c.from_new for c in plan.copies) and any(w.view is not None for c in plan.copies for w in (c.src, c.dst))
    rebuilt = []
    for host in ("h0", "h1", "h2", "h3"):
        text = json.dumps(copies_to_json(plan, host))
        copies = copies_from_json(json.loads(text), old, new)
        assert copies == tuple(c for c in plan.copies if c.dst_host == host)
        part = plan_slice(old, new, copies)
        assert part.stats.total_bytes == sum(c.nbytes for c in copies)
        assert part.stats.cross_host_bytes == sum(c.nbytes for c in copies if c.src_host != c.dst_host)
        rebuilt.extend(copies)
    assert sorted(rebuilt, key=repr) == sorted(plan.copies, key=repr)


def test_malformed_slices_are_refused_with_what_is_wrong():
    old = Deployment(model_ptc("gpt-tiny", "tp=2,pp=1,dp=1"), Placement(2))
    new = Deployment(model_ptc("gpt-tiny", "tp=1,pp=1,dp=2"), Placement(2))
    good = copies_to_json(make_plan(old, new))
    name = good["tensors"][0]
    for bad, match in [
        ([], "must be {tensors"),
        ({"tensors": [name], "copies": [[0, 0, 0, [[0], [1]], [[0], [1]]]]}, "must be \\[tensor"),
        ({"tensors": ["nope"], "copies": []}, "names tensor 'nope'"),
        ({"tensors": [name], "copies": [[1, 0, 0, [[0], [1]], [[0], [1]], False]]}, "names tensor #1"),
        ({"tensors": [name], "copies": [[0, 2, 0, [[0], [1]], [[0], [1]], False]]}, "lies outside"),
        ({"tensors": [name], "copies": [[0, 0, 0, [[0], [-1]], [[0], [1]], False]]}, "integers >= 0"),
        ({"tensors": [name], "copies": [[0, 0, 0, [[0, 0], [1]], [[0], [1]], False]]}, "2 offsets and 1 sizes"),
        ({"tensors": [name], "copies": [[0, 0, 0, [[0], [1], [0], [0], [1]], [[0], [1]], False]]}, "view"),
        ({"tensors": [name], "copies": [[0, 0, 0, [[0], [True]], [[0], [1]], False]]}, "integers"),
    ]:
        with pytest.raises(ValueError, match=match):
            copies_from_json(bad, old, new)
