"""Background saves (scalai.training.background) in one process: the bytes equal a
synchronous save's, the staging copy is taken at the call (later training does not leak
into it), a failure in the background write is raised at the next call and leaves nothing,
and at most one save is in flight (the next waits, or is skipped and logged)."""

from __future__ import annotations

import logging
import os
import threading

import pytest
import torch

from scalai.checkpoint import Checkpoint
from scalai.training import CollectiveError, DirectoryWriter, close, load, save
from scalai.training.background import in_flight
from test_api import make_job, snapshot


def _files(path):
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


def test_background_save_writes_what_a_synchronous_save_writes_as_of_the_call(tmp_path):
    job = make_job(seed=0)
    before = snapshot(job)
    save(job, tmp_path / "sync")
    report = save(job, tmp_path / "bg", background=True)
    assert report.background and not report.skipped
    assert report.rank_bytes == sum(t.numel() * t.element_size() for t in before.values())
    with torch.no_grad():  # training goes on: the staged copy must not see this
        for t in job.local_tensors().values():
            t.add_(1)
    job.step += 1
    assert close(job).step == 2 and not in_flight(job)
    assert _files(tmp_path / "sync") == _files(tmp_path / "bg"), "same bytes, same manifest"
    Checkpoint.open(tmp_path / "bg").verify()
    fresh = make_job(seed=1, steps=0)
    load(fresh, tmp_path / "bg")
    for name, tensor in before.items():
        assert torch.equal(fresh.local_tensors()[name], tensor), name


class FailingWriter(DirectoryWriter):
    def write_rank(self, token, rank, ptc, arrays):
        raise OSError(28, "No space left on device (simulated)")


@pytest.mark.parametrize("next_call", ["save", "load", "close"])
def test_a_failure_in_the_background_is_raised_at_the_next_call_and_leaves_nothing(tmp_path, next_call):
    job = make_job(seed=0)
    save(job, tmp_path / "ok")
    save(job, FailingWriter(tmp_path / "bad"), background=True)  # returns: the failure is not lost...
    with pytest.raises(CollectiveError, match="No space left on device") as info:  # ...it comes here
        {"save": lambda: save(job, tmp_path / "next"),
         "load": lambda: load(job, tmp_path / "ok"),
         "close": lambda: close(job)}[next_call]()
    assert "written in the background" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["ok"], "the failed version is removed, nothing else written"
    assert not in_flight(job)
    close(job)  # reported once


class GatedWriter(DirectoryWriter):
    """Writes only once the gate opens; records the order of events and the writes in flight."""

    def __init__(self, out_dir, events, gate, state):
        super().__init__(out_dir)
        self.events, self.gate, self.state = events, gate, state

    def begin(self):
        self.events.append(f"begin {os.path.basename(self.out_dir)}")
        return super().begin()

    def write_rank(self, token, rank, ptc, arrays):
        with self.state["lock"]:
            self.state["now"] += 1
            self.state["most"] = max(self.state["most"], self.state["now"])
        self.gate.wait()
        try:
            return super().write_rank(token, rank, ptc, arrays)
        finally:
            with self.state["lock"]:
                self.state["now"] -= 1

    def commit(self, token, manifest):
        super().commit(token, manifest)
        self.events.append(f"commit {os.path.basename(self.out_dir)}")


def test_at_most_one_save_in_flight_the_next_waits_or_is_skipped(tmp_path, caplog):
    job = make_job(seed=0)
    events, state = [], {"lock": threading.Lock(), "now": 0, "most": 0}
    gate = threading.Event()
    w = lambda name: GatedWriter(tmp_path / name, events, gate, state)  # noqa: E731
    save(job, w("a"), background=True)
    with caplog.at_level(logging.WARNING, logger="scalai.training"):
        skipped = save(job, w("b"), background=True, on_busy="skip")
    assert skipped.skipped and "skipped" in caplog.text
    opener = threading.Timer(0.2, gate.set)
    opener.start()
    save(job, w("c"), background=True)  # waits for "a", commits it, then begins "c"
    close(job)
    opener.join()
    assert events == ["begin a", "commit a", "begin c", "commit c"]
    assert state["most"] == 1
    assert sorted(os.listdir(tmp_path)) == ["a", "c"]


def test_on_busy_is_checked():
    with pytest.raises(ValueError, match="on_busy='later'"):
        save(make_job(), "x", background=True, on_busy="later")
