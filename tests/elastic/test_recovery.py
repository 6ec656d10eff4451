"""Recovery from the survivors' dumps through real stores: a version committed without the
dead ranks (lost_ranks), transformed with their bytes read from replicas; and the decision
rules (pure)."""

import numpy as np
import pytest

from scalai.config import ParallelConfig, Placement
from scalai.elastic.recovery import consistent_dumps, dump_owner, merged_state, replicas_cover
from scalai.models import model_ptc
from scalai.store.manifest import VersionManifest


def _dump(step, rank):
    return {"dump": {"version": "rescue-g001", "step": step, "bytes": 1,
                     "state": {"step": step, "rng": {"seed": 0, "layout": "x", "ranks": {str(rank): [rank]}}}}}


def test_dumps_are_used_only_when_every_survivor_dumped_the_same_step():
    dumps, why = consistent_dumps({0: _dump(7, 0), 2: _dump(7, 2), 1: {"times": {}}})
    assert sorted(dumps) == [0, 2] and why == ""
    state = merged_state(dumps)
    assert state["step"] == 7 and state["rng"]["ranks"] == {"0": [0], "2": [2]}
    assert consistent_dumps({0: _dump(7, 0), 1: _dump(8, 1)})[1].startswith("survivors dumped different steps")
    assert consistent_dumps({0: {"times": {}}})[1] == "no surviving worker dumped its shards"


def test_replicas_cover_only_what_they_hold():
    place = Placement(2, ("host0", "host1"))
    dp = model_ptc("gpt-tiny", "tp=1,pp=1,dp=2")
    assert replicas_cover(dp, place, dp.relayout(ParallelConfig()), Placement(2, ("host0",)), [1]) == ""
    zero = model_ptc("gpt-tiny", "tp=1,pp=1,dp=2,zero=1")
    assert "no replica survives" in replicas_cover(zero, place, zero.relayout(ParallelConfig()), place, [1])
    tp = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1")
    assert "held only by unavailable old ranks [1]" in replicas_cover(tp, place, tp.relayout(ParallelConfig()),
                                                                      place, [1])


def test_manifest_lost_ranks_round_trip_and_validation():
    ptc = model_ptc("gpt-tiny", "tp=1,pp=1,dp=2")
    m = VersionManifest("j", "rescue-g001", 3, ptc, Placement(1, ("host0", "host1")), {}, lost_ranks=(1,))
    again = VersionManifest.from_json(m.to_json())
    assert again.lost_ranks == (1,) and again.to_json() == m.to_json()
    assert m.expected("host1") == {} and m.expected("host0")
    assert "lost_ranks" not in VersionManifest("j", "v1", 1, ptc, Placement(1, ("host0", "host1")), {}).to_json()
    with pytest.raises(ValueError, match="lost_ranks"):
        VersionManifest("j", "v1", 1, ptc, Placement(1, ("host0", "host1")), {}, lost_ranks=(2,))


@pytest.mark.slow
def test_a_dump_without_a_dead_rank_is_transformed_from_its_replica(tmp_path):
    from scalai.checkpoint import Checkpoint
    from scalai.compare import compare_checkpoints
    from scalai.reshard import reshard_checkpoint
    from scalai.models.synth import write_synthetic_checkpoint
    from scalai.store import StoreCluster, pull, reshard
    from scalai.planner import Deployment
    from scalai.store.simnet import SimulatedHosts
    from simulate import host_lower_bounds

    src = tmp_path / "src"
    write_synthetic_checkpoint("gpt-tiny", src, ParallelConfig.parse("tp=1,pp=1,dp=2"), seed=4)
    with SimulatedHosts(3, link=None, mode="transport") as hosts, Checkpoint.open(src) as ckpt:
        cluster = StoreCluster(hosts.urls, hosts.token)
        place = Placement(1, ("host0", "host1"))
        # the survivor (rank 0, host0) dumped its shards; rank 1 died before it could
        client = cluster.client("host0")
        for name, _ in ckpt.ptc.rank_shards(0):
            client.put("job", "rescue-g001", 0, name, np.asarray(ckpt.view(0, name)), ckpt.ptc.spec(name).dtype,
                       owner=dump_owner(0))  # as generation 0's survivors write it (ElasticWorker)
        from scalai.elastic.allocation import Allocation
        from scalai.elastic.messages import RecoverDump
        from scalai.elastic.stores_io import commit_dump

        old = Allocation(ckpt.ptc.config, ("host0", "host1"), 1)
        commit_dump(cluster, "job", RecoverDump(1, "rescue-g001", ckpt.ptc, old, ckpt.state, (1,),
                                                ("host0", "host1", "host2"), old, ckpt.ptc.config,
                                                generation=1, dump_generation=0))
        result = reshard(cluster, "job", "tp=1,pp=1,dp=1", gpus_per_host=1, hosts=["host2"], version="rescue-g001")
        # all from host0's dump: host2 pulls the whole state once, counted by the stores
        expected = host_lower_bounds(Deployment(ckpt.ptc, place),
                                     Deployment(model_ptc("gpt-tiny", "tp=1,pp=1,dp=1"), Placement(1, ("host2",))),
                                     unavailable={1})
        assert expected == {"host2": sum(s.nbytes for s in ckpt.ptc.specs)}
        assert {h: sum(r["fetched_bytes"].values()) for h, r in result.hosts.items()} == expected
        assert set(result.hosts["host2"]["fetched_bytes"]) == {"host0"}
        pull(cluster, "job", str(tmp_path / "out"), result.target)
    reshard_checkpoint(src, tmp_path / "expected", "tp=1,pp=1,dp=1")
    with Checkpoint.open(tmp_path / "out") as a, Checkpoint.open(tmp_path / "expected") as b:
        assert compare_checkpoints(a, b) is None
