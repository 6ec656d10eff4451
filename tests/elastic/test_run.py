"""``scalai run`` and ``scalai demo`` end to end, as a user runs them.

Two runs cover every kind of change (about 3 minutes on 2 cores, several torchrun agents
on one machine, a store per simulated host):

- the demo: tensor-, data- and pipeline-parallel degree changed alone, growing and
  shrinking, a redeployment to disjoint hosts, a layout chosen by the cost model, and a
  killed worker recovered from its data-parallel replica;
- a run with failures: ``scalai scale`` over the control endpoint, a killed worker without
  a replica (restarted from the last version committed in the stores, steps lost), a host
  dying whose ranks have replicas on another host, and a host dying with the only copy
  (restarted from the persistent copy on disk), on links of 1 Gbit/s between hosts.

Every run is checked against the same job run unchanged: every sample read exactly once
over the steps kept, and the loss within a relative 1e-4 at every step.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from elastic_helpers import read_rows, run_cli, scalai_cmd
from scalai.config import ParallelConfig
from scalai.elastic.check import check_run
from scalai.elastic.demo import DEMO_STEPS
from scalai.elastic.progress import effective_rows, sample_counts
from scalai.elastic.timeline import read_timeline

PNG = b"\x89PNG\r\n\x1a\n"


def _check_outputs(out: Path, reference_rows: list[dict], steps: int) -> tuple[list[dict], list]:
    rows = read_rows(out / "metrics.jsonl")
    changes = read_timeline(out / "timeline.json")
    check = check_run(rows, reference_rows, steps)
    assert check.ok, check.lines()
    kept = effective_rows(rows)
    assert [r["step"] for r in kept] == list(range(1, steps + 1))
    assert len(sample_counts(rows)) == 8 * steps  # global batch 8, every sample once
    # the steps run twice are exactly the steps lost
    assert sum(1 for r in rows if r.get("lost")) == sum(c.steps_lost for c in changes)
    for name in ("timeline.png", "loss.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 20_000, name
    for c in changes:
        assert c.downtime > 0 and set(c.phases) >= {"allocate", "announce", "plan", "transform", "relaunch", "load",
                                                    "first_step"}
        assert c.bytes_moved + c.bytes_linked > 0  # (a change whose shards stay on their hosts copies none)
    return rows, changes


def _lower_bound(out: Path, change, unavailable=()) -> int:
    """The cross-host lower bound of ``change`` by element masks (``simulate``), from the
    PTCs the run's workers reported and the hosts of the timeline, not from the planner."""
    from scalai.config import Placement
    from scalai.layout.ptc import PTC
    from scalai.planner import Deployment
    from simulate import lower_bound_bytes

    reported = {str(p.config): p for p in (PTC.from_json(json.loads(f.read_text()))
                                           for f in sorted((out / "events").glob("g*/ptc.json")))}
    old_ptc = reported[change.from_layout]
    new_ptc = reported.get(change.to_layout) or old_ptc.relayout(ParallelConfig.parse(change.to_layout))
    return lower_bound_bytes(Deployment(old_ptc, Placement(2, tuple(change.from_hosts))),
                             Deployment(new_ptc, Placement(2, tuple(change.to_hosts))), unavailable)


@pytest.mark.slow
def test_demo_changes_every_dimension_moves_and_survives_a_killed_worker(tmp_path, corpus_index):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", out, "--data", corpus_index, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ok   data: 224 samples over 28 steps, each read exactly once" in result.stdout
    assert "ok   loss: largest relative difference to the unchanged run" in result.stdout
    rows, changes = _check_outputs(out, read_rows(out / "unchanged" / "metrics.jsonl"), DEMO_STEPS)
    for line in ("stop", "save", "transform", "relaunch", "first_step", "MiB moved"):
        assert line in result.stdout  # the timeline table
    assert [c.at_step for c in changes[:5]] == [4, 8, 12, 16, 20]

    def degrees(text):
        c = ParallelConfig.parse(text)
        return (c.tp, c.pp, c.dp)

    changed = [tuple(i for i in range(3) if degrees(c.from_layout)[i] != degrees(c.to_layout)[i])
               for c in changes[:3]]
    assert changed == [(0,), (2,), (1,)]  # tp alone (grow), dp alone (shrink), pp alone (grow)
    # Saved: one copy of the state (dp=2 on one host: each host stores a replica once).
    # Moved: one copy per host of the new layout (two hosts), split over the host's two tp
    # ranks as the new workers announced (tp=1's rules would send whole tensors to each
    # rank: four copies). tp ranks also share replicated norms and biases: a few percent.
    # Of it, what a host held unchanged (replicated norms and biases on the old host) is
    # linked in its store, not copied: bytes_moved counts only what was copied.
    from scalai.layout.ptc import PTC

    state = sum(s.nbytes for s in PTC.from_json(json.loads((out / "events" / "g000" / "ptc.json").read_text())).specs)
    grow = changes[0]
    assert grow.saved_bytes == state
    assert 2 * state <= grow.bytes_moved + grow.bytes_linked < 2.1 * state
    redeploy = changes[3]
    assert redeploy.from_layout == redeploy.to_layout and not set(redeploy.from_hosts) & set(redeploy.to_hosts)
    # everything came from the old hosts, except copies of replicated tensors (norms,
    # biases) that the second rank of a new host takes from the first (host fan-out):
    # exactly the per-host lower bound, computed independently of the planner
    assert 0.9 * redeploy.bytes_moved < redeploy.cross_host_bytes <= redeploy.bytes_moved
    assert redeploy.cross_host_bytes == _lower_bound(out, redeploy) > 0
    assert changes[4].reason == "scale to 2 devices" and changes[4].to_layout == "tp=1,pp=1,dp=2"
    failure = changes[5]
    assert failure.recovered_from == "replicas" and failure.steps_lost == 0
    assert failure.cross_host_bytes == _lower_bound(out, failure, unavailable={1})
    assert failure.to_layout == "tp=1,pp=1,dp=1" and failure.reason == "failure of rank 1"
    assert json.loads((out / "summary.json").read_text())["steps_lost"] == 0


@pytest.mark.slow
def test_run_scales_on_request_and_recovers_from_failures_without_replicas(tmp_path, corpus_index):
    schedule = tmp_path / "schedule.json"
    schedule.write_text(json.dumps([{"step": 8, "fail": 2}, {"step": 12, "fail": "host1"},
                                    {"step": 15, "fail": "host0"}]))
    out = tmp_path / "run"
    env = {"SCALAI_CACHE": str(tmp_path / "cache")}  # where scalai scale finds the run
    args = ["run", "--schedule", schedule, "--steps", 18, "--hosts", 3, "--layout", "tp=2,pp=1,dp=1",
            "--commit-every", 2, "--job", "elastic-test", "--link", "1gbit", "--compare", "--out", out,
            "--data", corpus_index]
    import os

    proc = subprocess.Popen(scalai_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env})
    try:
        deadline = time.time() + 180
        while True:  # until the job has started (its agents joined): asked earlier, the runner says so
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            refused = run_cli("scale", "elastic-test", 7, env=env, timeout=60)
            if "has not started yet" not in refused.stderr and "no running job" not in refused.stderr:
                break
            time.sleep(0.2)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
        assert "the runner refused: 7 devices need" in refused.stderr and "only 6 healthy" in refused.stderr
        asked = run_cli("scale", "elastic-test", 4, env=env, timeout=60)
        assert asked.returncode == 0, asked.stderr
        assert "stopping after the current step, then tp=1,pp=4,dp=1 on host0, host1" in asked.stdout
        text, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # SIGTERM: the runner stops its agents and stores on the way out
            proc.terminate()
            proc.wait(60)
    assert proc.returncode == 0, text[-4000:]
    rows, changes = _check_outputs(out, read_rows(out / "unchanged" / "metrics.jsonl"), 18)
    scale, rank, host1, host0 = changes
    assert scale.reason == "scale to 4 devices (request)" and scale.at_step < 8
    assert rank.recovered_from == "checkpoint" and rank.source.startswith("store version")
    assert rank.steps_lost >= 1 and rank.to_layout == "tp=1,pp=1,dp=3"
    # the version recovered from is a periodic commit (in the background, the default) that
    # rank 0 reported only once its stores held it committed
    version, step = re.fullmatch(r"store version (\S+) \(step (\d+)\)", rank.source).groups()
    reported = [c for f in (out / "events").glob("g*/rank-00000.json") for c in json.loads(f.read_text())["commits"]]
    if int(step) != scale.at_step:  # (else the scale's own version, if no commit was recorded since)
        assert int(step) % 2 == 0 and {"version": version, "step": int(step), "mode": "background"}.items() <= next(
            c for c in reported if c["version"] == version).items()
    assert host1.recovered_from == "replicas" and host1.steps_lost == 0 and host1.to_hosts == ["host0"]
    assert host0.recovered_from == "checkpoint" and "persistent copy" in host0.source
    assert host0.steps_lost >= 1 and host0.to_hosts == ["host2"]
    assert "recovered from replicas" in text and "steps lost" in text
    with pytest.raises(FileNotFoundError):
        json.loads((Path(env["SCALAI_CACHE"]) / "runs" / "elastic-test.json").read_text())  # unregistered


def test_bad_runs_fail_in_one_line_before_anything_starts(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"step": 3, "devices": 64}]))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    for args, message in [
        (["--schedule", bad, "--steps", 10], "schedule event 0 (scale to 64 devices at step 3)"),
        (["--schedule", tmp_path / "none.json", "--steps", 10], "does not exist"),
        (["--steps", 10, "--layout", "tp=3"], "tp=3 does not divide"),
        (["--steps", 10, "--out", tmp_path / "used"], "is not empty"),
        (["--steps", 10, "--listen", "0.0.0.0:0", "--agents", 2], "refusing to listen on 0.0.0.0 without a token"),
        (["--steps", 10, "--listen", "127.0.0.1:0"], "--listen ADDR:PORT and --agents N go together"),
        (["--steps", 10, "--listen", "127.0.0.1:0", "--agents", 2, "--compare"], "use it without --agents"),
        (["--steps", 10, "--module", "no_such_trainer"], "--module no_such_trainer: no such module"),
    ]:
        if "--out" not in args:
            args = args + ["--out", tmp_path / "new"]
        result = run_cli("run", *args, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (args, result.stderr)
    assert not (tmp_path / "new").exists()
    missing = run_cli("scale", "nosuchjob", 2, env={"SCALAI_CACHE": str(tmp_path)}, timeout=60)
    assert missing.returncode == 2 and "no running job named 'nosuchjob'" in missing.stderr


def test_sigterm_stops_the_run_and_everything_it_started(tmp_path, corpus_index):
    import os
    import signal

    out = tmp_path / "run"
    proc = subprocess.Popen(scalai_cmd("run", "--steps", 1000, "--hosts", 1, "--gpus-per-host", 2, "--out", out,
                                       "--data", corpus_index, "--job", "sigterm-test"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "SCALAI_CACHE": str(tmp_path / "cache")})
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    stores = json.loads((out / "control.json").read_text())["agents_root"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    time.sleep(1)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in ps and stores not in ps  # no agent or store left behind
    for proc_dir in Path("/proc").glob("[0-9]*"):  # no worker or standby either (they run in the agents' dirs)
        try:
            assert not os.readlink(proc_dir / "cwd").startswith(stores), proc_dir
        except OSError:
            pass
    assert not Path(stores).exists()


def _survivors_dumped_and_exited(out: Path, generation: int, died: set[int]) -> None:
    """Every survivor of ``generation`` dumped its shards without an error and left with
    EXIT_DUMPED (75), as its report says and as its agent saw it (the reports and exit
    statuses the coordinator received, in OUT/events)."""
    from scalai.elastic.events import EXIT_DUMPED, events_dir, read_generation

    reports = read_generation(out, generation)
    exits = json.loads((events_dir(out, generation) / "exits.json").read_text())
    survivors = sorted(set(reports) - died)
    assert survivors
    for rank in survivors:
        r = reports[rank]
        assert r.get("dump") and not r.get("dump_error"), (rank, r.get("dump_error"))
        assert r.get("exit_code") == EXIT_DUMPED and "exit" in r["times"], (rank, r["times"])
        assert exits[str(rank)] == EXIT_DUMPED, (rank, exits)
    for rank in died:
        assert "dump_start" not in reports[rank]["times"] and exits[str(rank)] == -9


def _each_sample_once(rows: list[dict], steps: int, batch: int = 8) -> None:
    kept = effective_rows(rows)
    assert [r["step"] for r in kept] == list(range(1, steps + 1))
    assert all(len(r["samples"]) == batch and not r.get("fed_mismatch") for r in kept)
    assert len(sample_counts(rows)) == batch * steps  # no sample read twice


@pytest.mark.slow
def test_the_documented_worker_protocol_runs_as_written(tmp_path, corpus_index):
    """The complete training script of scalai.elastic.worker's docstring, extracted from it,
    under ``scalai run --module``: a small model of one's own with FSDP2 (``fully_shard``
    at zero=1, ``replicate`` otherwise) through a planned change of layout and a worker
    killed in the middle of a forward pass; the survivors' dumps succeed, they exit with
    75 (no hang in the broken group's teardown), and the job goes on from the replicas
    without losing a step, every sample read once, the loss that of the unchanged run."""
    import os

    from doc_examples import write_worker_example

    mods = tmp_path / "mods"
    mods.mkdir()
    write_worker_example(mods, "doc_example")
    schedule = tmp_path / "schedule.json"
    schedule.write_text(json.dumps([{"step": 2, "layout": "tp=1,pp=1,dp=3"}]))
    out = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(mods), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "SCALAI_TEST_TARGET": "doc_example", "SCALAI_TEST_KILL": "1:1:2:forward"}
    result = run_cli("run", "--schedule", schedule, "--steps", 5, "--hosts", 2, "--layout", "tp=1,pp=1,dp=2,zero=1",
                     "--commit-every", 0, "--module", "kill_mid_step", "--compare", "--out", out,
                     "--", "--data", corpus_index, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ok   data: 40 samples over 5 steps, each read exactly once" in result.stdout
    assert "ok   loss: largest relative difference to the unchanged run" in result.stdout
    changes = read_timeline(out / "timeline.json")
    assert [(c.from_layout, c.to_layout, c.recovered_from, c.steps_lost) for c in changes] == [
        ("tp=1,pp=1,dp=2,zero=1", "tp=1,pp=1,dp=3", "", 0), ("tp=1,pp=1,dp=3", "tp=1,pp=1,dp=2", "replicas", 0)]
    _survivors_dumped_and_exited(out, 1, died={1})
    _each_sample_once(read_rows(out / "metrics.jsonl"), 5)
    missing = run_cli("run", "--steps", 4, "--module", "no_such_trainer", "--out", tmp_path / "x")
    assert missing.returncode == 2 and "--module no_such_trainer: no such module" in missing.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_workers_killed_mid_forward_and_mid_backward_are_recovered_from_replicas(tmp_path, corpus_index):
    """The reference trainer (TP and FSDP2 ``replicate``): a worker killed in the middle of
    a forward pass (its tensor-parallel partner fails in a forward collective, the other
    replica in backward), then, on the three devices left, one killed in the middle of a
    backward pass. Every survivor's dump finds the sharded state and succeeds; both times
    the job goes on from the replicas without losing a step."""
    import os

    out = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "SCALAI_TEST_KILL": "0:1:2:forward,1:2:2:backward"}
    result = run_cli("run", "--steps", 5, "--hosts", 2, "--layout", "tp=2,pp=1,dp=2", "--commit-every", 0,
                     "--module", "kill_mid_step", "--out", out, "--", "--data", corpus_index, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    changes = read_timeline(out / "timeline.json")
    assert [(c.from_layout, c.to_layout, c.recovered_from, c.steps_lost, c.at_step) for c in changes] == [
        ("tp=2,pp=1,dp=2", "tp=1,pp=1,dp=3", "replicas", 0, 1), ("tp=1,pp=1,dp=3", "tp=1,pp=1,dp=2", "replicas", 0, 2)]
    _survivors_dumped_and_exited(out, 0, died={1})
    _survivors_dumped_and_exited(out, 1, died={2})
    _each_sample_once(read_rows(out / "metrics.jsonl"), 5)


@pytest.mark.slow
def test_run_compare_fails_when_a_rank_reads_a_sample_twice(tmp_path, corpus_index):
    """``scalai run --compare`` counts the ids the ranks fed their models: rank 1 of the
    elastic run silently reads a sample twice in step 2 (the unchanged run reads right), and
    the check fails in one line with status 1, naming the step."""
    import os

    out = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "SCALAI_TEST_READ_FAULT": "faulty:0:1:2:twice"}
    result = run_cli("run", "--steps", 2, "--hosts", 1, "--layout", "tp=1,pp=1,dp=2", "--commit-every", 0,
                     "--job", "faulty", "--module", "kill_mid_step", "--compare", "--out", out,
                     "--", "--data", corpus_index, env=env, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAIL data: 15 samples over 2 steps (ids the data-parallel ranks fed their models): 1 read more than once" \
        in result.stdout
    assert "steps reading other samples than the unchanged run: 2" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not follow the unchanged run" in lines[0], result.stderr
