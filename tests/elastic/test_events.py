"""Worker reports and the phases of a reconfiguration computed from them (pure)."""

import os

import pytest

from scalai.elastic.events import RankLog, read_generation, reconfiguration_phases, write_json_atomic
from scalai.elastic.worker import ElasticWorker, process_start_time


def test_rank_logs_round_trip(tmp_path):
    log = RankLog(tmp_path, 3, 1, host="host0")
    log.mark("ready", 10.0)
    log.update(step=7, saved={"version": "v2", "step": 7, "bytes": 10})
    RankLog(tmp_path, 3, 0, host="host0").mark("ready", 11.0)
    write_json_atomic(tmp_path / "events" / "g003" / ".rank-00002.json.tmp-1", {})  # a writer mid-rename
    got = read_generation(tmp_path, 3)
    assert sorted(got) == [0, 1]
    assert got[1]["times"] == {"ready": 10.0} and got[1]["saved"]["version"] == "v2"
    assert got[1]["pid"] == os.getpid() and read_generation(tmp_path, 4) == {}


def test_a_rank_log_written_from_two_threads_at_once_keeps_every_change(tmp_path):
    """A worker's abort thread reports (``commit_abandoned``, ``exit``) while its main or
    commit thread may be reporting too: no write fails (a shared temporary file name made
    one thread's rename find its file gone, and the worker exit 1: CI, stop 23), and the
    file ends with every field. The oracle is the fields each thread set."""
    import json
    import threading

    log = RankLog(tmp_path, 1, 1)
    errors = []

    def report(name: str) -> None:
        try:
            for i in range(300):
                log.update(**{name: i})
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=report, args=(f"field{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = json.loads(log.path.read_text())
    assert {f"field{k}": 299 for k in range(4)}.items() <= got.items()
    assert sorted(p.name for p in log.path.parent.iterdir()) == [log.path.name]


def test_phases_tile_the_downtime():
    old = {r: {"times": {"save_start": 101.0 + r * 0.1, "save_end": 102.0 + r * 0.1}} for r in range(2)}
    new = {r: {"times": {"ready": 104.0, "load_end": 106.5}} for r in range(4)}
    runner = {"allocate": (102.5, 102.52), "announce": (102.52, 104.2), "plan": (104.2, 104.25),
              "transform": (104.25, 104.5)}
    durations, starts, downtime = reconfiguration_phases(
        100.0, old, exited=102.5, runner=runner, new=new, first_step_end=107.0, go=104.5)
    assert durations == pytest.approx({"stop": 1.0, "save": 1.1, "allocate": 0.02, "announce": 1.68,
                                       "plan": 0.05, "transform": 0.25, "relaunch": 1.9, "load": 2.0,
                                       "first_step": 0.5})
    assert starts["announce"] == pytest.approx(2.52) and starts["plan"] == pytest.approx(4.2)
    assert starts["relaunch"] == pytest.approx(2.1) and starts["load"] == pytest.approx(4.5)
    assert downtime == pytest.approx(7.0)
    # a failure: the survivors dumped instead of saving
    dumped = {0: {"times": {"dump_start": 100.2, "dump_end": 100.4}}}
    durations, _, _ = reconfiguration_phases(100.0, dumped, 101.0, {"plan": (101.0, 101.1),
                                                                    "transform": (101.1, 101.5)}, new, 107.0)
    assert durations["stop"] == pytest.approx(0.2) and durations["save"] == pytest.approx(0.2)
    assert "announce" not in durations and durations["load"] == pytest.approx(2.5)  # from the workers ready


def test_the_worker_reads_its_settings_from_the_environment(tmp_path):
    assert ElasticWorker.from_env({}) is None
    env = {"SCALAI_RUN_DIR": str(tmp_path), "SCALAI_GENERATION": "2", "SCALAI_HOST": "host1",
           "SCALAI_HOSTS": "host1,host0", "SCALAI_GPUS_PER_HOST": "2",
           "SCALAI_STORES": "host0=http://127.0.0.1:1,host1=http://127.0.0.1:2", "SCALAI_JOB": "j",
           "SCALAI_RESUME": "1", "SCALAI_COMMIT_EVERY": "5", "SCALAI_DUMP_VERSION": "rescue-g002"}
    w = ElasticWorker.from_env(env)
    assert w.urls == ["http://127.0.0.1:2", "http://127.0.0.1:1"] and w.resume_from_stores
    with pytest.raises(ValueError, match="SCALAI_JOB missing"):
        ElasticWorker.from_env({k: v for k, v in env.items() if k != "SCALAI_JOB"})
    assert w.timeout is None  # SCALAI_TIMEOUT is optional
    assert ElasticWorker.from_env({**env, "SCALAI_TIMEOUT": "90"}).timeout.total_seconds() == 90
    for bad in ("soon", "0", "-5"):
        with pytest.raises(ValueError, match="SCALAI_TIMEOUT"):
            ElasticWorker.from_env({**env, "SCALAI_TIMEOUT": bad})
    assert w.commit_mode == "background"  # SCALAI_COMMIT_MODE is optional
    assert ElasticWorker.from_env({**env, "SCALAI_COMMIT_MODE": "blocking"}).commit_mode == "blocking"
    with pytest.raises(ValueError, match="SCALAI_COMMIT_MODE='later'"):
        ElasticWorker.from_env({**env, "SCALAI_COMMIT_MODE": "later"})
    started = process_start_time()
    assert started is None or abs(started - __import__("time").time()) < 3600


def test_started_gives_every_group_the_runners_timeout(tmp_path):
    """A script that initializes its process group without the runner's timeout (torch's
    default: 30 minutes for gloo) still gets it, for the groups it makes afterwards too."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from _dist import run_ranks

    got = run_ranks(Path(__file__).parent / "_elastic_workers.py", "runner_timeout_applied", 2, timeout=120,
                    kwargs={"run_dir": str(tmp_path)})
    # _dist starts the group with 60 s; the worker gives it and the mesh's group 42 s
    assert all(g == {"before": 60.0, "world": 42.0, "mesh": 42.0} for g in got), got
