"""``scalai run`` on machines that share nothing but a network, as a user starts them.

Every machine is a network namespace with its own address and a rate-limited link, and a
mount namespace whose private tmpfs hides the test's directory (where the coordinator
writes) and ``/dev/shm``: an agent that used anything but its own directories and the
network would fail. The coordinator runs in the root namespace with the CLI; the agents
are started with the CLI inside the machines. The job is a user's own script
(``paced_trainer``: the reference trainer's loop, a pause after every step so that the
test can act between steps), so its layouts come from the PTC it describes.

One run (slow; about three minutes on 2 cores):

1. three machines; a fourth joins: the job grows onto it;
2. one machine's agent gets SIGTERM: the job moves off it (no step lost), the agent exits 0;
3. one machine freezes (SIGSTOP of all its processes): the coordinator declares it dead
   from its silence (the heartbeat, not a collective's timeout), the survivors are taken
   out of their blocked collectives and the job recovers from their replicas (no step lost);
4. the coordinator is killed and started again with ``--resume``: the agents join it
   again and the job continues from the newest version in their stores;
5. the frozen machine comes back (SIGCONT): a coordinator that does not know it refuses
   its agent, which stops its stale workers and joins again as a new machine; its store is
   emptied of the job, and the job grows onto it and runs to its last step.

Then, over both coordinators' metrics: every step once (the steps run again after the
restart count once, from the newest generation), every sample exactly once counted from
the ids the ranks fed, and the loss within 1e-4 of the same job run unchanged.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import time
from pathlib import Path

import pytest

from elastic_helpers import Coordinator, read_rows, run_cli

netns = pytest.importorskip("netns_machines")

HERE = Path(__file__).parent
STEPS = 120


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not netns.available(), reason="needs root, iproute2 and unshare (network and mount namespaces)")
def test_a_job_on_four_isolated_machines_grows_shrinks_survives_a_frozen_machine_and_a_new_coordinator(tmp_path):
    from scalai.elastic.check import check_run
    from scalai.elastic.progress import mark_lost, run_row

    machines = netns.Machines(tmp_path, capacity=4, link="1gbit")
    token = secrets.token_urlsafe(24)
    (tmp_path / "token").write_text(token)
    listen = f"{machines.coordinator_address}:{_free_port(machines.coordinator_address)}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "SCALAI_CACHE": str(tmp_path / "cache")}
    args = ["--listen", listen, "--agents", 3, "--token-file", tmp_path / "token", "--job", "cluster-test",
            "--steps", STEPS, "--layout", "tp=1,pp=1,dp=3", "--commit-every", 4, "--module", "paced_trainer",
            "--dead-after", 5]
    script = ["--", "--pace", "0.4", "--global-batch", "12", "--micro-batch", "4"]
    coordinator = None
    try:
        coordinator = Coordinator([*map(str, args), "--out", str(tmp_path / "run1"), *script], env,
                                  tmp_path / "coordinator1.log")
        for i in range(3):
            machines.start(i, listen, token, log=tmp_path / f"agent{i}.log", env=env)
        coordinator.wait_for("generation 0: tp=1,pp=1,dp=3")

        # 1. a fourth machine joins: the job grows onto it
        machines.start(3, listen, token, log=tmp_path / "agent3.log", env=env)
        coordinator.wait_for("grow into m3 ->", "dp=4 on m0, m1, m2, m3")
        coordinator.wait_for("back at step", "tp=1,pp=1,dp=4")

        # 2. SIGTERM to m1's agent: the job moves off it, then m1 is released and exits 0
        machines.terminate(1)
        coordinator.wait_for("m1 leaves ->", "dp=3 on m0, m2, m3")
        coordinator.wait_for("agent m1 released")
        assert machines.procs[1].wait(120) == 0

        # 3. m2 freezes: declared dead from its silence, the job recovers from replicas
        time.sleep(1.0)  # at least one step in the new layout
        frozen = machines.signal_all(2, signal.SIGSTOP)
        assert frozen
        coordinator.wait_for("host m2 is gone (no heartbeat for 5 s)")
        coordinator.wait_for("recovered from replicas", "0 steps lost")
        coordinator.wait_for("back at step", "tp=1,pp=1,dp=2")

        # 4. the coordinator dies; started again, it finds its agents and goes on
        coordinator.proc.kill()
        coordinator.proc.wait(30)
        again = [str(a) for a in args]
        again[again.index("--agents") + 1] = "2"  # m0 and m3 answer (m1 left, m2 is frozen)
        coordinator = Coordinator([*again, "--resume", "--out", str(tmp_path / "run2"), *script], env,
                                  tmp_path / "coordinator2.log")
        coordinator.wait_for("coordinator restarted with 2 agents: continuing from store version")

        # 5. the frozen machine comes back: its agent finds a coordinator that does not know
        #    it, stops its stale workers and joins again; its store is emptied of the job,
        #    and the job grows onto it
        machines.signal_all(2, signal.SIGCONT)
        coordinator.wait_for("agent m2 joined")
        coordinator.wait_for("grow into m2 ->", "dp=3")
        assert coordinator.proc.wait(400) == 0, "".join(coordinator.text[-40:])
    finally:
        if coordinator is not None and coordinator.proc.poll() is None:
            coordinator.proc.kill()
        machines.close()

    reference = tmp_path / "unchanged.jsonl"
    made = run_cli("train", "--layout", "tp=1,pp=1,dp=3", "--steps", STEPS, "--global-batch", 12, "--micro-batch", 4,
                   "--metrics", reference, env={"SCALAI_CACHE": str(tmp_path / "cache-ref")}, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    # a row the first coordinator wrote just before it was killed, whose receipt its agent
    # never heard, is sent again to the second one: the same step of the same generation, run once
    received = {(r["generation"], r["step"]): r for r in read_rows(tmp_path / "run1" / "metrics.jsonl")
                + read_rows(tmp_path / "run2" / "metrics.jsonl")}
    rows = mark_lost(sorted(received.values(), key=lambda r: r["generation"]))
    check = check_run(rows, [run_row(r, 0) for r in read_rows(reference)], STEPS)  # the trainer's rows, as a run's
    assert check.ok, check.lines()
    changes = [json.loads((tmp_path / run / "timeline.json").read_text()) for run in ("run1", "run2")]
    restart = changes[1][0]
    assert restart["reason"] == "coordinator restarted" and restart["recovered_from"] == "checkpoint"
    assert sum(1 for r in rows if r.get("lost")) == sum(c["steps_lost"] for c in changes[0] + changes[1])
    fenced = (tmp_path / "agent2.log").read_text()
    assert "the coordinator does not know this machine any more; its workers were stopped" in fenced
