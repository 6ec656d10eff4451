"""Periodic commits in the background (``scalai run --commit-every K``, scalai.elastic.commits)
at the worker: one rank, one real store. The oracle is the store's own listing, read by the
test: a commit reaches rank 0's report (what the coordinator records) only once the store
lists the version committed; a failed commit is reported and removed, a second failure in a
row is raised; the stop save finishes the save in flight first (and is it, at the same
step); a dump never waits for an upload in flight, and leaves it uncommitted."""

from __future__ import annotations

import threading

import pytest
import torch

from scalai.data import DataState
from scalai.elastic.events import EXIT_DUMPED, RankLog
from scalai.elastic.worker import ElasticWorker
from scalai.examples.gpt.model import GPTConfig, GPTStage, init_weights
from scalai.store import StoreCluster
from scalai.store.simnet import SimulatedHosts
from scalai.store.training import StoreWriter
from scalai.training import CollectiveError, describe
from scalai.training.background import in_flight

CFG = GPTConfig(vocab=32, dim=16, heads=2, layers=2, seq_len=8)


def _job():
    model = GPTStage(CFG, range(CFG.layers), True, True)
    init_weights(model, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return describe(model, opt, "tp=1,pp=1,dp=1", num_layers=CFG.layers, data=DataState(0, 4, 1000), seed=0)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with SimulatedHosts(1, link=None, mode="transport", root=str(tmp_path_factory.mktemp("stores"))) as hosts:
        yield hosts


@pytest.fixture
def store(hosts, monkeypatch, request):
    """The store, and a job name of this test's own."""
    monkeypatch.setenv("SCALAI_TOKEN", hosts.token)
    cluster = StoreCluster(hosts.urls, hosts.token)
    cluster.job_name = request.node.name.split("[")[0][len("test_"):][:40]
    return cluster


def _worker(tmp_path, store, commit_every=2):
    w = ElasticWorker(str(tmp_path / "run"), 1, "host0", ("host0",), 1, {"host0": store.clients[0].url},
                      store.job_name, False, commit_every, "rescue-g001")
    w.log = RankLog(w.run_dir, 1, 0, host="host0")
    return w


def _listing(store) -> dict[str, bool]:
    """The store's own word: ``{version: committed}``."""
    from scalai.store.errors import StoreRequestError

    try:
        return {v["version"]: v["committed"] for v in store.clients[0].job(store.job_name)["versions"]}
    except StoreRequestError as exc:  # no version of the job yet
        assert exc.status == 404
        return {}


@pytest.fixture
def gate(monkeypatch):
    """Uploads wait until the gate opens (``gate.set()``)."""
    opened = threading.Event()
    write = StoreWriter.write_rank

    def gated(self, *args, **kw):
        opened.wait()
        return write(self, *args, **kw)

    monkeypatch.setattr(StoreWriter, "write_rank", gated)
    yield opened
    opened.set()


def _watch_reports(w, store) -> list:
    """Each commit as rank 0 reports it, with what the store listed at that moment."""
    seen = []
    update = w.log.update

    def checked(**fields):
        listed, new = fields.get("commits", []), fields.get("commit_count", 0) - len(seen)
        for c in listed[len(listed) - new:] if new > 0 else []:
            seen.append((c["version"], c["step"], _listing(store).get(c["version"])))
        update(**fields)

    w.log.update = checked
    return seen


def _written(job):
    job.__dict__["_scalai_background_save"].thread.join()  # (test only: the upload ended)


def test_a_commit_is_reported_only_once_the_store_lists_it_committed(tmp_path, store, gate):
    job, w = _job(), _worker(tmp_path, store)
    seen = _watch_reports(w, store)
    job.step = 2
    w.step_done(job, 10)  # returns while the upload waits at the gate
    assert in_flight(job) and seen == [] and list(_listing(store).values()) == [False]
    job.step = 3
    w.step_done(job, 10)  # still uploading: polled, not waited for
    assert in_flight(job) and seen == [] and w.log.data["commits"] == []
    gate.set()
    _written(job)
    job.step = 4
    w.step_done(job, 10)  # commits step 2, then starts step 4's save
    assert [(s, committed) for _, s, committed in seen] == [(2, True)]
    assert w.log.data["commits"][0]["mode"] == "background"
    _written(job)
    version = w.save(job)  # the stop save at step 4: the save in flight of this step is it
    assert not in_flight(job)
    assert [(s, committed) for _, s, committed in seen] == [(2, True), (4, True)]
    assert w.log.data["saved"] == {"version": seen[1][0], "step": 4, "bytes": w.log.data["saved"]["bytes"]}
    assert version == seen[1][0] and _listing(store) == {seen[0][0]: True, seen[1][0]: True}  # nothing twice


def test_the_stop_save_commits_the_save_in_flight_first(tmp_path, store, gate):
    job, w = _job(), _worker(tmp_path, store)
    seen = _watch_reports(w, store)
    job.step = 2
    w.step_done(job, 10)
    job.step = 3
    w.step_done(job, 10)
    gate.set()
    version = w.save(job)
    assert [(s, committed) for _, s, committed in seen] == [(2, True)]  # reported before the stop save
    assert _listing(store) == {seen[0][0]: True, version: True} and version != seen[0][0]


def test_a_failed_commit_is_reported_and_a_second_in_a_row_is_raised(tmp_path, store, monkeypatch):
    def full(self, *args, **kw):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(StoreWriter, "write_rank", full)
    job, w = _job(), _worker(tmp_path, store)
    job.step = 2
    w.step_done(job, 10)
    _written(job)
    job.step = 3
    w.step_done(job, 10)  # the failure is found here: reported, training goes on
    errors = w.log.data["commit_errors"]
    assert len(errors) == 1 and "No space left on device" in errors[0]["error"]
    assert w.log.data["commits"] == [] and _listing(store) == {}, "the failed version is removed"
    job.step = 4
    w.step_done(job, 10)
    _written(job)
    job.step = 5
    with pytest.raises(CollectiveError, match="No space left on device"):
        w.step_done(job, 10)
    assert len(w.log.data["commit_errors"]) == 2 and _listing(store) == {}


def test_a_dump_does_not_wait_for_the_upload_in_flight_nor_commits_it(tmp_path, store, gate):
    job, w = _job(), _worker(tmp_path, store)
    job.step = 2
    w.step_done(job, 10)  # the upload waits at the gate: it never ends during the dump
    done = []
    dumping = threading.Thread(target=lambda: done.append(w.dump(job)), daemon=True)
    dumping.start()
    dumping.join(120)  # (a bound against a hang, not a measurement)
    assert done == [EXIT_DUMPED], "the dump waited for the upload in flight"
    assert w.log.data["dump"]["step"] == 2 and w.log.data["commits"] == []
    periodic = job.__dict__["_scalai_background_save"].token.split("@")[0]
    assert _listing(store) == {periodic: False, "rescue-g001": False}  # the runner commits the dump, not this


def test_blocking_mode_commits_within_the_step(tmp_path, store):
    job, w = _job(), _worker(tmp_path, store)
    w.commit_mode = "blocking"
    seen = _watch_reports(w, store)
    job.step = 2
    w.step_done(job, 10)
    assert not in_flight(job) and [(s, committed) for _, s, committed in seen] == [(2, True)]
    assert w.log.data["commits"][0]["mode"] == "blocking"


def test_rank_zeros_report_lists_the_newest_commits_and_counts_them_all():
    """A run that commits thousands of times does not send ever larger reports."""
    from scalai.elastic.commits import REPORTED_COMMITS, PeriodicCommits

    reports = []
    commits = PeriodicCommits(1, "blocking", writer=lambda: None, report=lambda **f: reports.append(f), rank=0)
    for step in range(1, REPORTED_COMMITS + 11):
        commits._record(f"v{step}", step, started=0.0, blocked=0.0)
    last = reports[-1]
    assert last["commit_count"] == REPORTED_COMMITS + 10 and len(last["commits"]) == REPORTED_COMMITS
    assert [c["step"] for c in last["commits"]] == list(range(11, REPORTED_COMMITS + 11))
