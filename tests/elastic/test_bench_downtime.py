"""The downtime benchmark's decisions (``benchmarks/downtime/``), without processes: both
sides start their new processes by the runner's own rule, a request lands in the middle of
a step, the sides must continue the same trajectory, and the baseline's elastic torchrun
restarts the survivors of a killed machine the way that recovers."""

import sys
from pathlib import Path

import pytest

from scalai.elastic.ahead import lead_steps

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from downtime.dcp_side import agent_env  # noqa: E402
from downtime.dcp_worker import recovering  # noqa: E402
from downtime.harness import SCENARIOS, Case, ahead_due, mid_step_time, trajectory_difference  # noqa: E402


def test_a_request_lands_half_a_step_after_the_previous_one():
    rows = [{"step": s, "time": t} for s, t in enumerate((12.0, 14.0, 19.0, 21.0, 23.0, 25.0), start=1)]
    assert mid_step_time(rows[:5], 6) is None  # step 6 is not logged yet
    assert mid_step_time(rows, 6) == 26.0  # the median step (2 s; step 3 waited for a save) halved
    assert mid_step_time(rows[:1], 1) is None  # one step's end says nothing about the step time


def test_both_sides_start_ahead_by_the_runners_rule():
    rows = [{"step": s, "time": float(s)} for s in (1, 2, 3)]
    lead = lead_steps([], [1.0, 2.0, 3.0])  # what the runner computes for a run of one change
    assert lead == 11
    assert ahead_due(rows, 3 + lead) and not ahead_due(rows, 4 + lead)
    assert not ahead_due([], 1)  # never before the first step, as the runner


def test_the_sides_must_continue_the_same_trajectory():
    a = {1: 5.0, 2: 4.0, 3: 3.0}
    assert trajectory_difference({"x": a, "y": dict(a)}, {"x": 3, "y": 3}) == 0.0
    assert trajectory_difference({"x": a, "y": {**a, 3: 3.3}}, {"x": 3, "y": 3}) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"x's first step in the new layout \(4\)"):
        trajectory_difference({"x": {**a, 4: 2.0}, "y": a}, {"x": 4, "y": 3})


def test_cases_and_scenarios_describe_themselves():
    assert Case("tp=1,pp=1,dp=2", "tp=1,pp=1,dp=4").describe() == "grow 2 -> 4 (dp)"
    assert Case("tp=2,pp=2,dp=1", "tp=1,pp=1,dp=2").describe() == "shrink 4 -> 2 (tp, pp, dp)"
    assert Case("tp=1,pp=1,dp=4", "tp=2,pp=1,dp=2").describe() == "4 devices (tp, dp)"
    assert {s.launch for s in SCENARIOS.values()} == {"ahead", "after_save", "at_request"}


def test_the_baselines_survivors_of_a_killed_machine_restart_as_a_careful_user_configures_them():
    # torch's worker store, shared across generations, handed restarted workers their
    # predecessors' addresses: every restart failed on "connection refused"
    assert agent_env(SCENARIOS["kill"]) == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    assert agent_env(SCENARIOS["request"]) == {}  # no torchrun restarts there
    # a restarted worker knows it recovers from its world (its agent's restart count is 0
    # after a membership-change restart)
    assert recovering("kill", 4, "tp=1,pp=1,dp=6")
    assert not recovering("kill", 6, "tp=1,pp=1,dp=6")  # the job's first generation, at A
    assert not recovering("request", 4, "tp=1,pp=1,dp=6")
