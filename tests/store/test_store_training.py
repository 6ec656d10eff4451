"""The training-side hooks: ranks save their shards to their host's store, one commits,
and ranks of another layout load exactly their slices through a plan; the plan runner
reads a stored version through StoreReader. Ranks are simulated in one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scalai.storage.arrays import to_torch
from scalai.config import Placement
from scalai.dtypes import raw_numpy
from scalai.models import model_ptc
from scalai.models.synth import fill_local
from scalai.planner import Deployment, make_plan
from scalai.errors import ChecksumError
from scalai.store import StoreCluster, StoreRequestError, pull
from scalai.store.training import StoreReader, commit, load_rank, next_version, save_rank


def _rank_tensors(ptc, rank: int, seed: int = 5, torch_tensors: bool = True) -> dict:
    out = {}
    for name, shard in ptc.rank_shards(rank):
        spec = ptc.spec(name)
        raw = np.zeros(shard.shape, raw_numpy(spec.dtype))
        fill_local(spec, shard, raw, seed)
        out[name] = to_torch(raw, spec.dtype) if torch_tensors else raw
    return out


def _damage(path: str, offset: int = 600) -> None:
    """Flip the bits of one byte of a store's tensor file (past its 512-byte header)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _empty(ptc, rank: int) -> dict:
    return {n: torch.full(s.shape, 7, dtype=getattr(torch, ptc.spec(n).dtype)) for n, s in ptc.rank_shards(rank)}


@pytest.fixture
def cluster(stores):
    return StoreCluster([p.url for p in stores(3)])


def test_save_commit_load_across_layouts(cluster):
    old = model_ptc("gpt-tiny", "tp=2,pp=2,dp=2,zero=1")
    place = cluster.placement(3)  # 8 ranks on host0..host2
    version, seq = next_version(cluster, "job")
    assert (version, seq) == ("v0", 0)
    for rank in range(old.config.world_size):
        save_rank(cluster, "job", version, rank, old, place, _rank_tensors(old, rank))
    # before the commit, loading finds nothing
    with pytest.raises(Exception, match="job job has no committed version"):
        load_rank(cluster, "job", 0, old, place, _empty(old, 0))
    commit(cluster, "job", version, old, place, {"step": 42}, seq)
    assert next_version(cluster, "job") == ("v1", 1)
    # load in another layout and placement, rank by rank, from whichever stores hold the slices
    new = old.relayout(old.config.with_(tp=1, pp=4, dp=1))
    new_place = Placement(2, ("host2", "host0"))
    for rank in range(new.config.world_size):
        live = _empty(new, rank)
        stored = load_rank(cluster, "job", rank, new, new_place, live)
        assert stored.state == {"step": 42} and stored.version == "v0"
        for name, tensor in _rank_tensors(new, rank).items():
            assert torch.equal(live[name], tensor), (rank, name)


def test_same_layout_load_reads_only_the_own_host(cluster):
    ptc = model_ptc("gpt-tiny", "tp=2,pp=1,dp=3,zero=1")
    place = cluster.placement(2)
    for rank in range(ptc.config.world_size):
        save_rank(cluster, "job", "v0", rank, ptc, place, _rank_tensors(ptc, rank, torch_tensors=False))
    commit(cluster, "job", "v0", ptc, place, {}, 0)
    plan = make_plan(Deployment(ptc, place), Deployment(ptc, place), fanout=False)
    assert plan.stats.cross_host_bytes == 0 == plan.stats.total_bytes - plan.stats.same_device_bytes
    before = {h: c.usage()["traffic"]["sent"] for h, c in cluster.by_host.items()}
    live = {n: np.zeros(s.shape, raw_numpy(ptc.spec(n).dtype)) for n, s in ptc.rank_shards(5)}
    load_rank(cluster, "job", 5, ptc, place, live)
    for name, expected in _rank_tensors(ptc, 5, torch_tensors=False).items():
        np.testing.assert_array_equal(live[name], expected)
    after = {h: c.usage()["traffic"]["sent"] for h, c in cluster.by_host.items()}
    assert after["host0"] == before["host0"] and after["host1"] == before["host1"]  # rank 5 is on host2


def test_save_checks_shapes_and_commit_checks_completeness(cluster):
    ptc = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1")
    place = cluster.placement(1)
    tensors = _rank_tensors(ptc, 0)
    name = next(iter(tensors))
    with pytest.raises(ValueError, match="has shape"):
        save_rank(cluster, "job", "v0", 0, ptc, place, {**tensors, name: tensors[name][:1]})
    with pytest.raises(ValueError, match="has no tensor"):
        save_rank(cluster, "job", "v0", 0, ptc, place, {k: v for k, v in tensors.items() if k != name})
    save_rank(cluster, "job", "v0", 0, ptc, place, tensors)  # rank 1 never saved
    with pytest.raises(StoreRequestError, match="store host1.*tensors missing"):
        commit(cluster, "job", "v0", ptc, place, {}, 0)


def test_run_plan_reads_a_stored_version(cluster):
    from scalai.storage import ArraysSink, RangeSource, run_plan

    old = model_ptc("gpt-tiny", "tp=2,pp=2,dp=1")
    place = cluster.placement(2)
    for rank in range(old.config.world_size):
        save_rank(cluster, "job", "v0", rank, old, place, _rank_tensors(old, rank))
    commit(cluster, "job", "v0", old, place, {}, 0)
    new = old.relayout(old.config.with_(tp=1, pp=1, dp=2, zero=True))
    one = Placement(8)
    plan = make_plan(Deployment(old, one), Deployment(new, one))
    dest = {r: {n: np.zeros(s.shape, raw_numpy(new.spec(n).dtype)) for n, s in new.rank_shards(r)}
            for r in range(new.config.world_size)}
    reader = StoreReader(cluster, "job")
    assert all(isinstance(reader.part(r), RangeSource) for r in range(4))  # no local host: HTTP reads
    run_plan(plan, reader, ArraysSink(new, dest))
    for rank in range(new.config.world_size):
        for name, expected in _rank_tensors(new, rank, torch_tensors=False).items():
            np.testing.assert_array_equal(dest[rank][name], expected)


def test_writer_and_reader_for_the_training_api(cluster):
    from scalai.checkpoint.manifest import Manifest
    from scalai.planner.plan import Window
    from scalai.regions import Region
    from scalai.store.training import StoreWriter
    from scalai.storage import ArraySource, RangeSource, TensorSource
    from scalai.storage.verify import verify_source
    from scalai.training.storage import StateWriter

    ptc = model_ptc("gpt-tiny", "tp=2,pp=1,dp=2,zero=1")
    writer = StoreWriter(cluster, "job", gpus_per_host=2)
    assert isinstance(writer, StateWriter)
    token = writer.begin()
    records = [writer.write_rank(token, r, ptc, _rank_tensors(ptc, r, torch_tensors=False)) for r in range(4)]
    assert records[3].tensors and all(t.checksum for t in records[3].tensors.values())
    writer.commit(token, Manifest(ptc, tuple(records), {"step": 3}))
    reader = StoreReader([c.url for c in cluster.clients], "job")
    assert isinstance(reader, TensorSource) and reader.state == {"step": 3} and str(reader.ptc.config) == str(ptc.config)
    verify_source(reader, range(4))
    expected = _rank_tensors(ptc, 3, torch_tensors=False)
    name, shard = next((n, s) for n, s in ptc.rank_shards(3) if len(s.shape) == 2)
    np.testing.assert_array_equal(reader.read_window(3, name), expected[name])
    box = Window(Region((1, 2), (3, 4)))
    np.testing.assert_array_equal(reader.read_window(3, name, box), expected[name][1:4, 2:6])
    flat = next(n for n, s in ptc.rank_shards(3) if len(s.shape) == 1 and s.shape[0] >= 12)
    w = Window(Region((0,), (12,)), (3, 4), Region((1, 1), (2, 2)))
    np.testing.assert_array_equal(reader.read_window(3, flat, w), w.select(expected[flat]))
    reader.close()
    # a reader on rank 3's host maps that store's files (no bytes over HTTP): same results
    host = cluster.hosts[3 // 2]
    local = StoreReader([c.url for c in cluster.clients], "job", local_host=host)
    assert isinstance(local.part(3), ArraySource) and isinstance(local.part(0), RangeSource)  # rank 0 lives elsewhere
    verify_source(local, range(4))
    np.testing.assert_array_equal(local.read_window(3, name), expected[name])
    np.testing.assert_array_equal(local.read_window(3, name, box), expected[name][1:4, 2:6])
    np.testing.assert_array_equal(local.read_window(3, flat, w), w.select(expected[flat]))
    # a damaged byte in the store's memory is caught by the checksum pass
    _damage(cluster.client(host).files("job", "v0", 3)[name]["path"])
    local.close()
    with pytest.raises(ChecksumError, match=f"rank 3, tensor {name}"):
        verify_source(StoreReader([c.url for c in cluster.clients], "job", local_host=host), [3])
    # an aborted save leaves nothing
    token = writer.begin()
    writer.write_rank(token, 0, ptc, _rank_tensors(ptc, 0, torch_tensors=False))
    writer.abort(token)
    assert all(v["version"] == "v0" for c in cluster.clients for v in c.job("job")["versions"])


def test_writer_stores_replicas_once_per_host_and_they_transform(cluster, tmp_path):
    """dp=4 on two hosts: each host's store keeps one copy of the state (split between its
    two ranks, not one per rank), and a transformation reads them like any version."""
    from scalai.checkpoint.manifest import Manifest
    from scalai.store import reshard
    from scalai.store.training import StoreWriter

    ptc = model_ptc("gpt-tiny", "tp=1,pp=1,dp=4")
    writer = StoreWriter(cluster, "rep", gpus_per_host=2)
    token = writer.begin()
    records = [writer.write_rank(token, r, ptc, _rank_tensors(ptc, r, torch_tensors=False)) for r in range(4)]
    writer.commit(token, Manifest(ptc, tuple(records), {"step": 1}))
    state = ptc.rank_nbytes(0)  # one replica holds the whole state
    assert sum(r.nbytes for r in records) == 2 * state  # one copy per host, not four
    assert all(0.4 * state < r.nbytes < 0.6 * state for r in records)  # shared by the host's ranks
    stored = cluster.latest("rep").manifest
    assert stored.replicas == "per_host" and stored.ptc.full.rank_nbytes(1) == state
    # pulled to disk, it is an ordinary checkpoint of every rank's tensors
    from scalai.checkpoint import Checkpoint

    pull(cluster, "rep", str(tmp_path / "pulled"))
    with Checkpoint.open(tmp_path / "pulled") as ckpt:
        ckpt.verify()
        for r in range(4):
            for name, want in _rank_tensors(ptc, r, torch_tensors=False).items():
                np.testing.assert_array_equal(np.asarray(ckpt.view(r, name)), want, err_msg=f"{name} of rank {r}")
    result = reshard(cluster, "rep", "tp=2,pp=1,dp=2", gpus_per_host=2)
    assert result.cross_host_bytes == 0  # each host still had a whole copy
    new = cluster.latest("rep").manifest
    assert new.replicas == "all"
    reader = StoreReader([c.url for c in cluster.clients], "rep")
    for r in range(4):
        for name, want in _rank_tensors(new.ptc, r, torch_tensors=False).items():
            np.testing.assert_array_equal(reader.read_window(r, name), want, err_msg=f"{name} of rank {r}")


def test_pull_refuses_bytes_that_do_not_match_the_stores_record(cluster, tmp_path):
    """pull reads through the plan runner and checks every tensor's CRC-32, computed on the
    way, against the store's record before committing: a damaged byte leaves no checkpoint."""
    import os

    ptc = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1")
    place = cluster.placement(1)
    for rank in range(2):
        save_rank(cluster, "job", "v0", rank, ptc, place, _rank_tensors(ptc, rank, torch_tensors=False))
    commit(cluster, "job", "v0", ptc, place, {"step": 1}, 0)
    pull(cluster, "job", str(tmp_path / "good"))
    from scalai.checkpoint import Checkpoint

    with Checkpoint.open(tmp_path / "good") as ckpt:
        ckpt.verify()
        for name, want in _rank_tensors(ptc, 1, torch_tensors=False).items():
            np.testing.assert_array_equal(np.asarray(ckpt.view(1, name)), want)
    host = place.host(1)
    name = next(n for n, s in ptc.rank_shards(1) if int(np.prod(s.shape)) > 300)
    _damage(cluster.client(host).files("job", "v0", 1)[name]["path"])
    with pytest.raises(ChecksumError, match=f"{name} of rank 1 from store {host}"):
        pull(cluster, "job", str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".bad")], \
        "nothing is left of the refused pull"
