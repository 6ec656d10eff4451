"""Distributed and central transformations across real store processes: results equal a
local reshard bit for bit, round trips, counted cross-host bytes, failures that name the
store and leave the old version intact, restart and retry."""

from __future__ import annotations

import json
import threading
import time

import pytest

from scalai.checkpoint import Checkpoint
from scalai.compare import compare_checkpoints
from scalai.reshard import reshard_checkpoint
from scalai.store import StoreCluster, TransformError, pull, reshard
from store_helpers import assert_pulled_the_lower_bound, deployment


def _same(a, b) -> None:
    with Checkpoint.open(a) as ca, Checkpoint.open(b) as cb:
        diff = compare_checkpoints(ca, cb)
        assert diff is None, str(diff)
        cb.verify()


def _holdings(cluster: StoreCluster, job: str) -> dict[str, list[str]]:
    out = {}
    for host, c in cluster.by_host.items():
        try:
            out[host] = [f"{v['version']}{'' if v['committed'] else '?'}" for v in c.job(job)["versions"]]
        except Exception:  # noqa: BLE001 - a job absent from a store
            out[host] = []
    return out


@pytest.mark.parametrize("layout,g_new", [("tp=1,pp=2,dp=4,zero=1", 3), ("tp=2,pp=1,dp=2", 2),
                                          ("tp=1,pp=1,dp=3,zero=1", 1)])
def test_distributed_equals_local_reshard_and_counts_lower_bound(stores, tiny_ckpt, tmp_path, layout, g_new):
    procs = stores(3)
    cluster = StoreCluster([p.url for p in procs])
    cluster.push(str(tiny_ckpt), "gpt", gpus_per_host=4)  # 8 ranks on host0, host1
    result = reshard(cluster, "gpt", layout, gpus_per_host=g_new)
    old = deployment("tp=2,pp=2,dp=2", 4, ["host0", "host1"])
    new = deployment(layout, g_new, cluster.hosts)
    assert_pulled_the_lower_bound(result.to_json(), old, new)
    assert result.cross_host_bytes > 0 or layout.startswith("tp=2,pp=1")
    assert _holdings(cluster, "gpt") == {h: ["v1"] for h in cluster.hosts}  # old version dropped
    pull(cluster, "gpt", str(tmp_path / "pulled"))
    reshard_checkpoint(tiny_ckpt, tmp_path / "local", layout, sync=False)
    _same(tmp_path / "local", tmp_path / "pulled")
    # and back: A -> B -> A is the original bit for bit
    back = reshard(cluster, "gpt", "tp=2,pp=2,dp=2", gpus_per_host=4)
    assert_pulled_the_lower_bound(back.to_json(), new, deployment("tp=2,pp=2,dp=2", 4, cluster.hosts))
    pull(cluster, "gpt", str(tmp_path / "back"))
    _same(tiny_ckpt, tmp_path / "back")
    with Checkpoint.open(tiny_ckpt) as a, Checkpoint.open(tmp_path / "back") as b:
        assert [r.tensors for r in a.manifest.ranks] == [r.tensors for r in b.manifest.ranks]  # same CRCs
        assert a.state["step"] == b.state["step"] and a.state["data"] == b.state["data"]


def test_central_mode_same_result_more_traffic(stores, tiny_ckpt, tmp_path):
    cluster = StoreCluster([p.url for p in stores(3)])
    cluster.push(str(tiny_ckpt), "gpt", gpus_per_host=3)  # 8 ranks on 3 hosts
    layout = "tp=1,pp=2,dp=2,zero=1"
    dist = reshard(cluster, "gpt", layout, gpus_per_host=2, keep_old=True)
    pull(cluster, "gpt", str(tmp_path / "dist"))
    cluster.drop("gpt", dist.target)
    central = reshard(cluster, "gpt", layout, gpus_per_host=2, central=True)
    assert central.mode == "central" and set(central.phases) >= {"consolidate", "split"}
    assert central.cross_host_bytes > dist.cross_host_bytes
    assert_pulled_the_lower_bound(dist.to_json(), deployment("tp=2,pp=2,dp=2", 3, cluster.hosts),
                                  deployment(layout, 2, cluster.hosts))
    assert not any("consolidated" in v for vs in _holdings(cluster, "gpt").values() for v in vs)
    pull(cluster, "gpt", str(tmp_path / "central"))
    _same(tmp_path / "dist", tmp_path / "central")


def test_redeployment_to_other_hosts(stores, tiny_ckpt, tmp_path):
    cluster = StoreCluster([p.url for p in stores(4)])
    cluster.push(str(tiny_ckpt), "gpt", gpus_per_host=4)  # host0, host1
    result = reshard(cluster, "gpt", "tp=2,pp=2,dp=2", gpus_per_host=4, hosts=["host2", "host3"])
    s = result.stats
    assert_pulled_the_lower_bound(result.to_json(), deployment("tp=2,pp=2,dp=2", 4, ["host0", "host1"]),
                                  deployment("tp=2,pp=2,dp=2", 4, ["host2", "host3"]))
    assert s.cross_host_bytes > 0
    # nothing is local: each byte crosses once per host, then fans out to the host's replicas
    assert s.same_device_bytes == 0 and s.cross_host_bytes + s.same_host_bytes == s.total_bytes
    assert s.same_host_bytes > 0
    assert {h: v for h, v in _holdings(cluster, "gpt").items()} == {h: ["v1"] for h in cluster.hosts}
    pull(cluster, "gpt", str(tmp_path / "moved"))
    _same(tiny_ckpt, tmp_path / "moved")


def _reshard_in_thread(cluster, **kw):
    box = {}

    def run():
        try:
            box["result"] = reshard(cluster, "gpt", **kw)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            box["error"] = exc
    t = threading.Thread(target=run)
    t.start()
    return t, box


@pytest.mark.parametrize("victim", ["source", "destination"])
def test_store_killed_mid_transfer(stores, tiny_ckpt, tmp_path, victim):
    # slow links (transport rate limiter) so that the transformation is still running when killed
    procs = stores(3, link="1.5MB")
    cluster = StoreCluster([p.url for p in procs])
    cluster.push(str(tiny_ckpt), "gpt", gpus_per_host=4)  # host0, host1 hold v0
    # redeploy onto host1, host2: host2 pulls everything from host0 and host1
    dead = procs[0] if victim == "source" else procs[2]
    thread, box = _reshard_in_thread(cluster, layout="tp=2,pp=2,dp=2", gpus_per_host=4, hosts=["host1", "host2"])
    deadline = time.monotonic() + 30
    while "v1?" not in _holdings(cluster, "gpt")["host2"] and time.monotonic() < deadline:
        time.sleep(0.05)  # until host2 is writing the new version
    time.sleep(0.3)
    assert thread.is_alive(), "the transformation finished before the store was killed; slow the links"
    dead.kill()
    thread.join(60)
    err = box.get("error")
    assert isinstance(err, TransformError), box
    assert dead.name in str(err) and err.host == dead.name
    assert "Version v0 is intact" in str(err) and f"restart the store of {dead.name}" in str(err)
    # the survivors hold v0 only; the new version is gone everywhere reachable
    alive = [p for p in procs if p is not dead]
    for p in alive:
        assert [v["version"] for v in p.client().job("gpt")["versions"]] == ["v0"]
    dead.restart()  # same root: its shards are still there
    cluster = StoreCluster([p.url for p in procs])
    assert cluster.latest("gpt").name == "v0"
    pull(cluster, "gpt", str(tmp_path / "old"))
    _same(tiny_ckpt, tmp_path / "old")
    # retry succeeds
    result = reshard(cluster, "gpt", "tp=2,pp=2,dp=2", gpus_per_host=4, hosts=["host1", "host2"])
    assert result.source == "v0"
    assert_pulled_the_lower_bound(result.to_json(), deployment("tp=2,pp=2,dp=2", 4, ["host0", "host1"]),
                                  deployment("tp=2,pp=2,dp=2", 4, ["host1", "host2"]))
    pull(cluster, "gpt", str(tmp_path / "new"))
    _same(tiny_ckpt, tmp_path / "new")


def test_unreachable_store_is_named(stores, tiny_ckpt):
    procs = stores(2)
    cluster = StoreCluster([p.url for p in procs])
    cluster.push(str(tiny_ckpt), "gpt", gpus_per_host=4)
    procs[1].kill()
    from scalai.store import StoreUnavailable

    with pytest.raises(StoreUnavailable, match=f"store {procs[1].url} is unreachable"):
        StoreCluster([p.url for p in procs])
    with pytest.raises(StoreUnavailable, match="store host1 .* is unreachable") as e:
        reshard(cluster, "gpt", "tp=1,pp=2,dp=4", gpus_per_host=4)  # the versions cannot be checked
    assert e.value.host == "host1"
    assert [v["version"] for v in procs[0].client().job("gpt")["versions"]] == ["v0"]


def test_latest_ignores_versions_not_committed_everywhere(stores, tiny_ckpt):
    procs = stores(2)
    cluster = StoreCluster([p.url for p in procs])
    v0 = cluster.push(str(tiny_ckpt), "gpt", gpus_per_host=4)
    # a v1 committed on host0 only (a coordinator that died during commit)
    from scalai.store import VersionManifest

    m = v0.manifest
    for rank in m.ranks_on("host0"):
        with Checkpoint.open(tiny_ckpt) as c:
            for name, _ in m.ptc.rank_shards(rank):
                procs[0].client().put("gpt", "v1", rank, name, c.view(rank, name), m.ptc.spec(name).dtype)
    v1 = VersionManifest("gpt", "v1", 1, m.ptc, m.placement, m.state, "v0")
    procs[0].client().commit("gpt", "v1", v1.to_json())
    assert cluster.latest("gpt").name == "v0"
    assert cluster.next_version("gpt") == ("v2", 2)
    with pytest.raises(Exception, match="not committed on host"):
        cluster.latest("gpt", "v1")


def test_recovery_from_replicas_after_a_host_is_lost(stores, tmp_path):
    from scalai.config import ParallelConfig
    from scalai.errors import PlanError
    from scalai.models.synth import write_synthetic_checkpoint
    from scalai.store import StoreError

    plain, zero = tmp_path / "plain", tmp_path / "zero"
    write_synthetic_checkpoint("gpt-tiny", plain, ParallelConfig.parse("tp=2,pp=1,dp=2"), seed=1)
    write_synthetic_checkpoint("gpt-tiny", zero, ParallelConfig.parse("tp=2,pp=1,dp=2,zero=1"), seed=1)
    procs = stores(3)
    cluster = StoreCluster([p.url for p in procs])
    cluster.push(str(plain), "gpt", gpus_per_host=2)  # replica dp0 on host0, dp1 on host1
    cluster.push(str(zero), "z", gpus_per_host=2)
    procs[1].kill()  # host1 and its store are gone
    survivors = StoreCluster([procs[0].url, procs[2].url])
    with pytest.raises(StoreError, match="not committed on host.*host1|no committed version"):
        reshard(survivors, "gpt", "tp=2,pp=1,dp=2", gpus_per_host=2)
    result = reshard(survivors, "gpt", "tp=2,pp=1,dp=2", gpus_per_host=2, hosts=["host0", "host2"], lost=["host1"])
    assert_pulled_the_lower_bound(result.to_json(), deployment("tp=2,pp=1,dp=2", 2, ["host0", "host1"]),
                                  deployment("tp=2,pp=1,dp=2", 2, ["host0", "host2"]), unavailable={2, 3})
    assert result.cross_host_bytes > 0
    assert set(result.hosts["host2"]["fetched_bytes"]) == {"host0"}  # the surviving replica
    # host2 held nothing: every tensor of its ranks came from host0, the small ones several
    # to a request (POST .../windows), so far fewer requests than tensors
    received = sum(len(deployment("tp=2,pp=1,dp=2", 2, ["host0", "host2"]).ptc.rank_shards(r)) for r in (2, 3))
    assert result.hosts["host2"]["requests"] * 2 < received, (result.hosts["host2"]["requests"], received)
    pull(survivors, "gpt", str(tmp_path / "recovered"))
    _same(plain, tmp_path / "recovered")
    # with ZeRO-1 the optimizer state has no replica: refused, nothing changed
    with pytest.raises(PlanError, match="no replica survives"):
        reshard(survivors, "z", "tp=2,pp=1,dp=2,zero=1", gpus_per_host=2, hosts=["host0", "host2"], lost=["host1"])
    assert [v["version"] for v in procs[0].client().job("z")["versions"]] == ["v0"]


def test_transform_into_a_given_ptc(stores, tiny_ckpt, tmp_path):
    """A job may give the new layout's PTC itself (a split its old rules cannot know): the
    stores lay the state out by it, and every global tensor stays the same."""
    import dataclasses

    from scalai.config import ParallelConfig
    from scalai.layout.ptc import PTC
    from scalai.errors import PlanError
    from scalai.layout.splits import Replicate, Split

    cluster = StoreCluster([p.url for p in stores(2)])
    cluster.push(str(tiny_ckpt), "gpt", gpus_per_host=4)
    with Checkpoint.open(tiny_ckpt) as c:
        old = c.manifest.ptc
    guessed = old.relayout(ParallelConfig.parse("tp=2,pp=1,dp=2"))
    norm = next(s for s in guessed.specs if isinstance(s.split, Replicate) and len(s.shape) == 1
                and s.shape[0] % 2 == 0 and not s.name.startswith("optimizer."))
    target = PTC(guessed.config, [dataclasses.replace(s, split=Split(0)) if s.name == norm.name else s
                                  for s in guessed.specs], guessed.num_layers)
    result = reshard(cluster, "gpt", target, gpus_per_host=2)
    assert result.stats.total_bytes < reshard_plan_bytes(old, guessed)
    pull(cluster, "gpt", str(tmp_path / "pulled"))
    with Checkpoint.open(tmp_path / "pulled") as c:
        assert c.manifest.ptc.spec(norm.name).split == Split(0)
        assert dict(c.manifest.ptc.rank_shards(0))[norm.name].shape == (norm.shape[0] // 2,)
    _same(tiny_ckpt, tmp_path / "pulled")
    with pytest.raises(PlanError, match="drops"):  # a PTC of other tensors is refused
        reshard(cluster, "gpt", PTC(target.config, target.specs[:-1], target.num_layers), gpus_per_host=2)


def reshard_plan_bytes(old, new) -> int:
    from scalai.config import Placement
    from scalai.planner import Deployment, make_plan

    return make_plan(Deployment(old, Placement(4, ("host0", "host1"))),
                     Deployment(new, Placement(2, ("host0", "host1")))).stats.total_bytes


def test_a_store_runs_the_part_of_the_plan_it_is_sent(stores, tmp_path):
    """The coordinator plans once; a store runs exactly the copies it receives. Here every
    copy is sent to read host1's replica (make_plan spreads them over both replicas): host2
    fetches from host1 alone, and the result is still the state, bit for bit. A request
    without its part of the plan, or with a malformed one, is refused before anything runs."""
    from dataclasses import replace

    from scalai.config import ParallelConfig, Placement
    from scalai.models.synth import write_synthetic_checkpoint
    from scalai.planner import Deployment, make_plan
    from scalai.planner.plan import Plan
    from scalai.planner.serial import copies_to_json
    from scalai.store import StoreRequestError, VersionManifest
    from scalai.store.reshard import _request

    write_synthetic_checkpoint("gpt-tiny", tmp_path / "a", ParallelConfig.parse("tp=1,pp=1,dp=2"), seed=4)
    cluster = StoreCluster([p.url for p in stores(3)])
    cluster.push(str(tmp_path / "a"), "gpt", gpus_per_host=1)  # rank 0 on host0, its replica on host1
    src = cluster.latest("gpt").manifest
    old = Deployment(src.ptc, src.placement)
    new = Deployment(src.ptc.relayout(ParallelConfig.parse("tp=1,pp=1,dp=1")), Placement(1, ("host2",)))
    plan = make_plan(old, new)
    assert {c.src_host for c in plan.copies} == {"host0", "host1"}, "the planner spreads the load"
    from_host1 = tuple(replace(c, src_rank=1, src_host="host1") for c in plan.copies)
    request = _request(src.version, "v1", old, new, cluster.peers, True)
    client = cluster.client("host2")
    part = copies_to_json(Plan(old, new, from_host1, plan.stats), "host2")
    too_wide = json.loads(json.dumps(part))
    too_wide["copies"][0][3][1][0] = too_wide["copies"][0][4][1][0] = 1 << 20  # longer than any tensor here
    for bad in ({}, {"plan": {"tensors": [], "copies": [[0, 0, 0, [[0], [1]], [[0], [1]], False]]}},
                {"plan": too_wide}):
        with pytest.raises(StoreRequestError, match="400"):
            client.transform("gpt", {**request, **bad}, owner="reshard-a")
    with pytest.raises(StoreRequestError, match="404"):  # a refused request created no version
        client.version("gpt", "v1", tensors=False)
    client.lease("gpt", "v1", "reshard-a", create=True)  # the coordinator's claim (request: claimed)
    result = client.transform("gpt", {**request, "plan": part}, owner="reshard-a")
    assert result["fetched_bytes"] == {"host1": plan.stats.total_bytes}
    cluster.commit(VersionManifest("gpt", "v1", 1, new.ptc, new.placement, src.state, src.version), ["host2"],
                   owner="reshard-a")
    pull(cluster, "gpt", str(tmp_path / "pulled"), version="v1")
    reshard_checkpoint(tmp_path / "a", tmp_path / "local", "tp=1,pp=1,dp=1", sync=False)
    _same(tmp_path / "local", tmp_path / "pulled")
