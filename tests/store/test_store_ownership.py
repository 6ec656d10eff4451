"""A version belongs to whoever created it: overlapping transformations, late uploads and
cleanups never remove, cancel or overwrite another writer's version, and a committed
version's files never change (issue 11, items 1, 2 and 8)."""

from __future__ import annotations

import http.client
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import pytest

from scalai import PTC, ParallelConfig, Placement, TensorSpec
from scalai.checkpoint import Checkpoint
from scalai.compare import compare_checkpoints
from scalai.store import StoreCluster, StoreRequestError, TransformError, VersionManifest, pull, reshard

LAYOUT = "tp=1,pp=2,dp=4,zero=1"


def _versions(cluster: StoreCluster, job: str) -> dict[str, list[str]]:
    """``{host: ["v1", "v2?"]}`` ('?' = uncommitted), every store of the cluster."""
    out = {}
    for host, c in cluster.by_host.items():
        try:
            out[host] = [f"{v['version']}{'' if v['committed'] else '?'}" for v in c.job(job)["versions"]]
        except StoreRequestError:
            out[host] = []
    return out


def _pull_equals_source(cluster, job, source, tmp_path, name) -> None:
    pull(cluster, job, str(tmp_path / name))
    with Checkpoint.open(source) as a, Checkpoint.open(tmp_path / name) as b:
        assert compare_checkpoints(a, b) is None
        b.verify()


def _second_coordinator(cluster, monkeypatch, target="v1"):
    """A coordinator that read the job's state before the first one committed: it picks the
    same target name (both computed ``next_version`` from the same listing)."""
    monkeypatch.setattr(cluster, "next_version", lambda job: (target, int(target[1:])))
    return cluster


def test_overlapping_reshard_never_deletes_the_winners_version(stores, tiny_ckpt, tmp_path, monkeypatch):
    """A commits v1; B (started from v0 at the same time, so also aiming at v1) gets 409 and
    must leave v1 alone: the job's current state stays A's result."""
    procs = stores(2)
    cluster = StoreCluster([p.url for p in procs])
    cluster.push(str(tiny_ckpt), "gpt", gpus_per_host=4)
    a = reshard(cluster, "gpt", LAYOUT, keep_old=True)
    assert a.target == "v1"
    late = _second_coordinator(StoreCluster([p.url for p in procs]), monkeypatch)
    with pytest.raises(TransformError) as err:
        reshard(late, "gpt", "tp=2,pp=1,dp=4", version="v0")
    assert _versions(cluster, "gpt") == {h: ["v0", "v1"] for h in cluster.hosts}
    assert cluster.latest("gpt").name == "v1"
    assert "v1" in str(err.value) and "409" in str(err.value)
    assert "v0 is intact and still the job's current state" not in str(err.value)  # v1 is, not v0
    _pull_equals_source(cluster, "gpt", tiny_ckpt, tmp_path, "pulled")


def test_overlapping_reshard_never_cancels_a_running_transformation(stores, tiny_ckpt, tmp_path, monkeypatch):
    """B's cleanup runs while A's transformation is still writing v1 in the stores: it must not
    cancel it; A then commits, and its result is the job's state."""
    procs = stores(3, link="1.5MB")  # slow links between stores: A's transformation takes seconds
    cluster = StoreCluster([p.url for p in procs])
    cluster.push(str(tiny_ckpt), "gpt", gpus_per_host=4)  # host0, host1
    box: dict = {}

    def run_a():
        try:
            box["a"] = reshard(cluster, "gpt", "tp=2,pp=2,dp=2", gpus_per_host=4, hosts=["host1", "host2"])
        except BaseException as exc:  # noqa: BLE001 - inspected below
            box["a"] = exc

    thread = threading.Thread(target=run_a)
    thread.start()
    deadline = time.monotonic() + 60
    while "v1?" not in _versions(cluster, "gpt")["host2"] and time.monotonic() < deadline:
        time.sleep(0.05)  # until A's transformation writes v1 on host2
    late = _second_coordinator(StoreCluster([p.url for p in procs]), monkeypatch)
    with pytest.raises(TransformError, match="409"):
        reshard(late, "gpt", "tp=2,pp=2,dp=2", gpus_per_host=4, hosts=["host1", "host2"], version="v0")
    thread.join(120)
    assert not isinstance(box["a"], BaseException), box["a"]
    assert box["a"].target == "v1"
    assert cluster.latest("gpt").name == "v1"
    _pull_equals_source(cluster, "gpt", tiny_ckpt, tmp_path, "pulled")


# -- uploads racing commits and deletes ------------------------------------------------
class _SlowBody:
    """A PUT body sent in two halves: the second only once ``go`` is set."""

    def __init__(self, data: bytes):
        self.data, self.go, self.sent_first = data, threading.Event(), threading.Event()

    def __iter__(self):
        half = len(self.data) // 2
        yield self.data[:half]
        self.sent_first.set()
        assert self.go.wait(60)
        yield self.data[half:]


def _slow_put(url: str, path: str, body: _SlowBody, box: dict) -> threading.Thread:
    def run():
        u = urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        conn.request("PUT", path, body=iter(body), headers={"Content-Length": str(len(body.data)),
                                                            "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        box["status"], box["body"] = resp.status, resp.read()
        conn.close()

    t = threading.Thread(target=run)
    t.start()
    return t


def _wait_upload_started(store) -> None:
    """Until the store is streaming an upload into a file (its private upload file, or the
    temporary file earlier versions of the store wrote next to the tensor)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(p.name.startswith("upload-") or ".tmp-" in p.name for p in store.root.rglob("*")):
            return
        time.sleep(0.02)
    raise AssertionError("the store never started the upload")


def _manifest(client, job, version, shape):
    ptc = PTC(ParallelConfig(), [TensorSpec("w", shape, "float32")], 0)
    return VersionManifest(job, version, 0, ptc, Placement(1, (client.name,)), {}).to_json()


def test_upload_finishing_after_commit_never_reaches_the_committed_files(store):
    c = store.client()
    old = np.arange(4096, dtype=np.uint32).reshape(64, 64)
    c.put("j", "v0", 0, "w", old, "float32")
    body = _SlowBody((old + 1).tobytes())
    box: dict = {}
    t = _slow_put(store.url, "/v1/jobs/j/versions/v0/ranks/0/tensors/w?dtype=float32&shape=64,64", body, box)
    assert body.sent_first.wait(30)
    _wait_upload_started(store)
    c.commit("j", "v0", _manifest(c, "j", "v0", (64, 64)))  # while the second upload streams
    body.go.set()
    t.join(60)
    assert box["status"] == 409, box
    assert b"committed" in box["body"]
    np.testing.assert_array_equal(c.read("j", "v0", 0, "w"), old)
    store.restart()  # what is on disk, not only what the index says
    c = store.client()
    np.testing.assert_array_equal(c.read("j", "v0", 0, "w"), old)
    assert c.version("j", "v0")["ranks"]["0"]["w"]["crc32"] == f"{__import__('zlib').crc32(old.tobytes()):08x}"


def test_upload_finishing_after_delete_gets_404_and_leaves_nothing(store):
    c = store.client()
    a = np.arange(4096, dtype=np.uint32)
    c.put("j", "v0", 0, "other", a, "float32")
    body = _SlowBody(a.tobytes())
    box: dict = {}
    t = _slow_put(store.url, "/v1/jobs/j/versions/v0/ranks/0/tensors/w?dtype=float32&shape=4096", body, box)
    assert body.sent_first.wait(30)
    _wait_upload_started(store)
    c.delete("j", "v0")
    body.go.set()
    t.join(60)
    assert box["status"] == 404, box
    with pytest.raises(StoreRequestError) as err:
        c.job("j")
    assert err.value.status == 404  # no version came back to life
    assert c.usage()["memory_bytes"] == 0
    jobs = store.root / "jobs"
    assert not [p for p in jobs.rglob("*") if p.is_file()]


def test_a_coordinator_hears_why_its_transformation_was_cancelled(stores, tiny_ckpt):
    procs = stores(3, link="1.5MB")
    cluster = StoreCluster([p.url for p in procs])
    cluster.push(str(tiny_ckpt), "gpt", gpus_per_host=4)
    box: dict = {}

    def run():
        try:
            reshard(cluster, "gpt", "tp=2,pp=2,dp=2", gpus_per_host=4, hosts=["host1", "host2"])
        except BaseException as exc:  # noqa: BLE001 - inspected below
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not cluster.client("host2").usage()["memory_bytes"] and time.monotonic() < deadline:
        time.sleep(0.05)  # until host2's transformation writes v1
    cluster.client("host2").delete("gpt", "v1")  # an operator deletes the version being written
    thread.join(120)
    err = box.get("error")
    assert isinstance(err, TransformError), box
    assert "was deleted from store host2 while this transformation wrote it" in str(err)
    assert "v0 is still the job's current state" in str(err)
    assert _versions(cluster, "gpt") == {"host0": ["v0"], "host1": ["v0"], "host2": ["v0"]}


def test_pull_of_a_version_replaced_while_it_is_read_takes_the_new_one(stores, tiny_ckpt, tmp_path):
    procs = stores(2)
    cluster = StoreCluster([p.url for p in procs])
    cluster.push(str(tiny_ckpt), "gpt", gpus_per_host=4)
    other = StoreCluster([p.url for p in procs])
    fired = threading.Event()

    def progress(n):  # the first bytes of v0 arrived: another writer replaces v0 by v1 now
        if not fired.is_set():
            fired.set()
            reshard(other, "gpt", LAYOUT)  # drops v0 once v1 is committed

    got = pull(cluster, "gpt", str(tmp_path / "pulled"), progress=progress, workers=1)
    assert fired.is_set() and got.name == "v1"
    from scalai.reshard import reshard_checkpoint

    reshard_checkpoint(tiny_ckpt, tmp_path / "local", LAYOUT, sync=False)
    with Checkpoint.open(tmp_path / "local") as a, Checkpoint.open(tmp_path / "pulled") as b:
        assert str(b.ptc.config) == LAYOUT and compare_checkpoints(a, b) is None
        b.verify()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the abandoned attempt left nothing
