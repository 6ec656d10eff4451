"""Owners and leases of uncommitted versions (issue 11, items 1 and 3): what a writer may do
to another's version, and what a killed push or coordinator leaves behind (nothing, once
its lease has run out)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from scalai import PTC, ParallelConfig, Placement, TensorSpec
from scalai.store import StoreCluster, StoreRequestError, VersionManifest, reshard
from scalai.planner import Deployment, make_plan
from scalai.planner.serial import copies_to_json
from scalai.store.lease import Lease
from scalai.store.manifest import placement_from_json

A = np.arange(1024, dtype=np.uint32)


def _manifest(client, version="v0"):
    ptc = PTC(ParallelConfig(), [TensorSpec("w", A.shape, "float32")], 0)
    return VersionManifest("j", version, 0, ptc, Placement(1, (client.name,)), {}).to_json()


def _status(call) -> int:
    with pytest.raises(StoreRequestError) as err:
        call()
    return err.value.status


def _until(predicate, what: str, timeout: float = 60.0):
    """Poll ``predicate`` until true (a liveness bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = predicate()
        if out:
            return out
        time.sleep(0.1)
    raise AssertionError(f"never happened within {timeout:.0f} s: {what}")


def _versions(client, job="j") -> dict[str, bool]:
    try:
        return {v["version"]: v["committed"] for v in client.job(job)["versions"]}
    except StoreRequestError:
        return {}


def test_a_version_belongs_to_its_writer(store):
    c = store.client()
    c.put("j", "v0", 0, "w", A, "float32", owner="push-a")
    assert _status(lambda: c.put("j", "v0", 0, "w", A + 1, "float32", owner="push-b")) == 409
    assert _status(lambda: c.put("j", "v0", 0, "w", A + 1, "float32")) == 409  # nor a writer without an id
    assert _status(lambda: c.commit("j", "v0", _manifest(c), owner="push-b")) == 409
    assert _status(lambda: c.delete("j", "v0", owner="push-b")) == 409
    assert _status(lambda: c.lease("j", "v0", "push-b", create=True)) == 409
    assert _versions(c) == {"v0": False}
    store.restart()  # ownership survives a restart of the store
    c = store.client()
    assert _status(lambda: c.put("j", "v0", 0, "w", A + 1, "float32", owner="push-b")) == 409
    c.commit("j", "v0", _manifest(c), owner="push-a")
    np.testing.assert_array_equal(c.read("j", "v0", 0, "w"), A)
    assert c.lease("j", "v0", "push-a")["committed"] is True  # nothing left to renew
    assert _status(lambda: c.delete("j", "v0", owner="push-b")) == 409
    assert c.delete("j", "v0", owner="push-a")["deleted"] == ["v0"]  # its writer's cleanup
    # an operator's delete (no owner) removes any version; a whole job needs no owner
    c.put("j", "v1", 0, "w", A, "float32", owner="push-c")
    assert c.delete("j")["deleted"] == ["v1"]


def test_claims_are_exclusive_renewable_and_listed(store, capsys):
    from store_helpers import run_cli

    c = store.client()
    out = c.lease("j", "v3", "reshard-a", 30, create=True)
    assert (out["created"], out["committed"], out["owner"]) == (True, False, "reshard-a")
    assert 0 < out["expires_in_s"] <= 30
    listing = run_cli(capsys, "store", "ls", "--stores", store.url)
    assert "j/v3: ? uncommitted (writer reshard-a, lease ends in" in listing.out, listing.out
    again = c.lease("j", "v3", "reshard-a", 30, create=True)  # the same writer: a renewal
    assert again["created"] is False
    assert _status(lambda: c.lease("j", "v3", "reshard-b", create=True)) == 409
    assert _status(lambda: c.lease("j", "v9", "reshard-a")) == 404  # renewing what does not exist
    for bad in ("0.1", "99999", "nan", "x"):
        status, _ = _raw_lease(store.url, bad)
        assert status == 400, bad


def _raw_lease(url: str, seconds: str):
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/jobs/j/versions/v5/lease?create=true",
                 headers={"X-Scalai-Owner": "w", "X-Scalai-Lease": seconds})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def test_an_unrenewed_version_expires_and_a_renewed_one_stays(store):
    c = store.client()
    c.lease("j", "v1", "writer-1", 1, create=True)
    c.put("j", "v1", 0, "w", A, "float32", owner="writer-1", lease=1)
    cluster = StoreCluster([store.url])
    with Lease(cluster, "j", "writer-2", seconds=2) as lease:
        lease.claim("v2", cluster.hosts)
        c.put("j", "v2", 0, "w", A, "float32", owner="writer-2")
        _until(lambda: "v1" not in _versions(c), "v1 expired")
        assert _versions(c) == {"v2": False}  # renewed all the while
        c.commit("j", "v2", _manifest(c, "v2"), owner="writer-2")
    assert c.usage()["memory_bytes"] == A.nbytes  # v1's bytes are gone
    assert not [p for p in (store.root / "jobs" / "j").glob("v1*")]


_PUSH = textwrap.dedent("""
    import sys, time
    from scalai.store import StoreCluster
    cluster = StoreCluster(sys.argv[2].split(","))
    cluster.push(sys.argv[1], "gpt", gpus_per_host=4, progress=lambda n: time.sleep(0.5), workers=1)
""")


def _kill_when(argv: list[str], env: dict, predicate, what: str) -> None:
    """Run ``argv`` and SIGKILL it as soon as ``predicate()`` holds (it must not end before)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _until(lambda: predicate() or proc.poll() is not None, what)
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_killed_push_leaves_nothing_after_its_lease(stores, tiny_ckpt):
    procs = stores(2)
    clients = [p.client() for p in procs]
    env = {**os.environ, "SCALAI_STORE_LEASE": "2"}
    _kill_when([sys.executable, "-c", _PUSH, str(tiny_ckpt), ",".join(p.url for p in procs)], env,
               lambda: any(c.usage()["memory_bytes"] for c in clients), "the push uploads something")
    assert any(_versions(c, "gpt") for c in clients)  # it left an uncommitted version ...
    _until(lambda: not any(_versions(c, "gpt") for c in clients), "the killed push's version expires")
    for p, c in zip(procs, clients):  # ... and, after its lease, nothing at all
        assert c.usage()["memory_bytes"] == 0
        # an expired version is renamed away at once and its files deleted just after, off
        # the store's event loop (Catalog.purge): wait for that, bounded
        _until(lambda: not [f for f in (p.root / "jobs").rglob("*") if f.is_file()]
               and not list((p.root / "uploads").iterdir()), f"{p.root}'s expired files are deleted", 20)


def test_killed_coordinator_transformation_is_cancelled(stores, tiny_ckpt, tmp_path):
    procs = stores(3, link="1.5MB")  # slow links: the transformation runs for seconds
    cluster = StoreCluster([p.url for p in procs])
    cluster.push(str(tiny_ckpt), "gpt", gpus_per_host=4)  # host0, host1
    before = {h: c.usage()["memory_bytes"] for h, c in cluster.by_host.items()}
    env = {**os.environ, "SCALAI_STORE_LEASE": "2"}
    host2 = cluster.by_host["host2"]
    _kill_when([os.path.join(os.path.dirname(sys.executable), "scalai"), "store", "reshard", "--job", "gpt",
                "--to", "tp=2,pp=2,dp=2", "-g", "4", "--hosts", "host1,host2",
                "--stores", ",".join(p.url for p in procs)], env,
               lambda: host2.usage()["memory_bytes"] > 0, "host2 writes the new version")
    assert "v1" in _versions(host2, "gpt")  # the orphan, while its lease lasts
    _until(lambda: all(_versions(c, "gpt") == {"v0": True} for c in cluster.clients),
           "the orphaned transformation is cancelled and its version deleted")
    assert {h: c.usage()["memory_bytes"] for h, c in cluster.by_host.items()} == before
    # host2 holds no rank of v0 (its empty commit only) once the deleted version's files,
    # renamed away under the store's lock, are purged (after the lock: it may take a moment)
    _until(lambda: not [f for f in (procs[2].root / "jobs").rglob("*") if f.is_file() and f.name != "owner.json"
                        and f.name != "manifest.json"], "the cancelled version's files are deleted")
    result = reshard(cluster, "gpt", "tp=2,pp=2,dp=2", gpus_per_host=4, hosts=["host1", "host2"])
    assert result.source == "v0"


def test_renewals_keep_a_transformation_longer_than_its_lease_alive(stores, tiny_ckpt, tmp_path, monkeypatch):
    procs = stores(3, link="0.5MB")
    cluster = StoreCluster([p.url for p in procs])
    cluster.push(str(tiny_ckpt), "gpt", gpus_per_host=4)
    monkeypatch.setenv("SCALAI_STORE_LEASE", "1")
    result = reshard(cluster, "gpt", "tp=2,pp=2,dp=2", gpus_per_host=4, hosts=["host1", "host2"])
    assert result.target == "v1" and cluster.latest("gpt").name == "v1"
    # what host2 pulled through its 0.5 MB/s link (64 KiB of burst) took longer than two leases
    assert (sum(result.hosts["host2"]["fetched_bytes"].values()) - 65536) / 0.5e6 > 2 * 1


def test_fragments_of_an_interrupted_commit_are_dropped_by_the_next_writer(stores):
    """A writer killed between its commits leaves the version committed on some stores; once
    the uncommitted rest is gone (its lease ran out) it can never be the job's state, and the
    next push or reshard deletes it. While a commit is in progress, nothing is touched."""
    procs = stores(2)
    cluster = StoreCluster([p.url for p in procs])
    ptc = PTC(ParallelConfig(dp=2), [TensorSpec("w", A.shape, "float32")], 0)
    place = Placement(1, tuple(cluster.hosts))
    for version, seq in (("v0", 0), ("v1", 1)):
        for rank, host in enumerate(cluster.hosts):
            cluster.client(host).put("j", version, rank, "w", A, "float32", owner=f"writer-{version}")
        manifest = VersionManifest("j", version, seq, ptc, place, {})
        cluster.commit(manifest, [cluster.hosts[0]] if version == "v1" else None, owner=f"writer-{version}")
    assert cluster.drop_incomplete("j") == []  # v1 is still uncommitted on host1: a commit in progress
    assert cluster.latest("j").name == "v0"
    cluster.client(cluster.hosts[1]).delete("j", "v1")  # what the expiry of its lease does
    assert cluster.drop_incomplete("j") == ["v1"]
    assert [_versions(c) for c in cluster.clients] == [{"v0": True}, {"v0": True}]


def test_a_failed_upload_leaves_no_version_it_created(store):
    import http.client
    from urllib.parse import urlsplit

    def too_long(version: str, owner: str) -> None:
        u = urlsplit(store.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        body = iter([b"\0" * 4096, b"\0" * 4096])  # chunked, twice what the shape says
        conn.request("PUT", f"/v1/jobs/j/versions/{version}/ranks/0/tensors/w?dtype=float32&shape=1024",
                     body=body, headers={"X-Scalai-Owner": owner}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 400 and b"longer" in resp.read()
        conn.close()

    c = store.client()
    too_long("v0", "push-x")
    assert _versions(c) == {}  # not even an empty one waiting for its lease
    assert c.usage()["uploading_bytes"] == 0 and not list((store.root / "uploads").iterdir())
    c.lease("j", "v1", "push-y", create=True)
    too_long("v1", "push-y")
    assert _versions(c) == {"v1": False}  # a claimed version stays: the upload did not create it


def test_a_transformation_of_a_lost_claim_is_refused(store, tiny_ckpt):
    cluster = StoreCluster([store.url])
    cluster.push(str(tiny_ckpt), "gpt", gpus_per_host=8)
    c = store.client()
    m = c.version("gpt", "v0", tensors=False)["manifest"]
    request = {"from_version": "v0", "to_version": "v1", "old": {"ptc": m["ptc"], "placement": m["placement"]},
               "new": {"layout": "tp=1,pp=2,dp=4,zero=1", "placement": m["placement"]},
               "peers": {"host0": store.url}, "claimed": True}
    old = Deployment(PTC.from_json(m["ptc"]), placement_from_json(m["placement"]))
    new = Deployment(old.ptc.relayout(ParallelConfig.parse("tp=1,pp=2,dp=4,zero=1")), old.placement)
    request["plan"] = copies_to_json(make_plan(old, new), "host0")  # the coordinator's plan, this host's part
    c.lease("gpt", "v1", "reshard-a", create=True)
    c.delete("gpt", "v1")  # an operator's delete (or the lease running out) before the work starts
    assert _status(lambda: c.transform("gpt", request, owner="reshard-a")) == 404
    assert _versions(c, "gpt") == {"v0": True}
    c.lease("gpt", "v1", "reshard-a", create=True)  # with the claim in place, it runs
    assert c.transform("gpt", request, owner="reshard-a")["tensors"] > 0


def test_an_upload_in_progress_keeps_its_version_alive(store):
    import http.client
    from urllib.parse import urlsplit

    def slow():  # longer than two leases of 1 s between its halves
        yield A.tobytes()[:2048]
        time.sleep(2.5)
        yield A.tobytes()[2048:]

    u = urlsplit(store.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("PUT", "/v1/jobs/j/versions/v0/ranks/0/tensors/w?dtype=float32&shape=1024", body=slow(),
                 headers={"X-Scalai-Owner": "push-s", "X-Scalai-Lease": "1", "Content-Length": str(A.nbytes)})
    resp = conn.getresponse()
    assert resp.status == 201, resp.read()
    conn.close()
    c = store.client()
    c.commit("j", "v0", _manifest(c), owner="push-s")
    np.testing.assert_array_equal(c.read("j", "v0", 0, "w"), A)


def test_a_fence_refuses_the_writers_of_older_generations_until_the_job_is_deleted(store):
    """An elastic run's coordinator fences off the generations it gave up on (workers of
    one may still run on a machine that was cut off): their owner ids (``g<N>-...``) may not
    create, write, renew or commit a version any more; newer generations and writers that
    are not a generation's are unaffected. Deleting the job forgets the fence (a new run)."""
    c = store.client()
    c.put("j", "v1", 0, "w", A, "float32", owner="g3-save-a")  # started before the fence
    assert c.fence("j", 4) == {"job": "j", "generation": 4}
    assert c.fence("j", 2)["generation"] == 4  # fences only rise
    assert _status(lambda: c.put("j", "v1", 0, "w", A, "float32", owner="g3-save-a")) == 409
    assert _status(lambda: c.lease("j", "v1", "g3-save-a")) == 409
    assert _status(lambda: c.commit("j", "v1", _manifest(c, "v1"), owner="g3-save-a")) == 409
    assert _status(lambda: c.put("j", "v2", 0, "w", A, "float32", owner="g3-dump")) == 409  # nor create one
    assert _status(lambda: c.lease("j", "v2", "g3-dump", create=True)) == 409
    with pytest.raises(StoreRequestError, match="generation 3 .* fenced off .*below 4"):
        c.put("j", "v2", 0, "w", A, "float32", owner="g3-dump")
    for owner, version in (("g4-save-b", "v3"), ("g12-reshard-c", "v4"), ("push-d", "v5")):
        c.put("j", version, 0, "w", A, "float32", owner=owner)
        c.commit("j", version, _manifest(c, version), owner=owner)
    assert {v: ok for v, ok in _versions(c).items() if ok} == {"v3": True, "v4": True, "v5": True}
    c.put("other", "v1", 0, "w", A, "float32", owner="g0-save-e")  # another job: not fenced
    assert _status(lambda: c._json("POST", "/v1/jobs/j/fence", {"generation": -1})) == 400
    c.delete("j")
    c.put("j", "v1", 0, "w", A, "float32", owner="g0-save-f")  # a new run of the same name
