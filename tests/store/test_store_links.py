"""A store's transformation links the tensors that move unchanged within the host: the
same inode as the old version's file, the same bytes as a copy, and each version keeps its
bytes alive only through its own names. In one process, on one store's catalog."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from scalai.config import Placement
from scalai.dtypes import raw_numpy
from scalai.models import model_ptc
from scalai.planner import Deployment, make_plan
from scalai.storage.run import run_plan
from scalai.store.catalog import Catalog
from scalai.store.files import DATA_OFFSET, NewTensor, StoreFileError, TensorMeta, TensorUpload
from scalai.store.parts import LocalVersion, NewVersion
from simulate import global_arrays, host_unchanged_bytes, scatter  # tests/ is on the path (store_helpers)

JOB = "gpt"


def _expected(ptc, host_ranks) -> dict:
    return {(r, n): (ptc.spec(n).dtype, s.shape) for r in host_ranks for n, s in ptc.rank_shards(r)}


def _locals(ptc, glob) -> list[dict[str, np.ndarray]]:
    """Every rank's local tensors as raw bits of their dtype (from the global values, not a plan)."""
    return [{n: a.astype(raw_numpy(ptc.spec(n).dtype)) for n, a in ranks.items()} for ranks in scatter(ptc, glob)]


def _upload(catalog: Catalog, version: str, dep: Deployment, values) -> None:
    ranks = range(dep.ptc.config.world_size)
    for r in ranks:
        for name, shard in dep.ptc.rank_shards(r):
            data = values[r][name]
            up = catalog.open_upload(JOB, version, r, name, data.nbytes)
            w = TensorUpload(up.tmp, dep.ptc.spec(name).dtype, shard.shape)
            w.write(data.tobytes())
            catalog.finish_upload(up, w.finish())
    catalog.commit(JOB, version, {"version": version}, _expected(dep.ptc, ranks))


def _transform(catalog: Catalog, plan, old: Deployment, new: Deployment, version: str):
    entry = catalog.begin(JOB, version)
    source, sink = LocalVersion(catalog, JOB, "v0", old.ptc), NewVersion(catalog, entry, new)
    try:
        report = run_plan(plan, source, sink)
        sink.commit()
    finally:
        source.close()
    catalog.commit(JOB, version, {"version": version}, _expected(new.ptc, range(new.ptc.config.world_size)))
    return report


def _files(catalog: Catalog, version: str) -> dict[tuple[int, str], str]:
    return {k: t.path for k, t in catalog.listing(catalog.version(JOB, version))}


def _purge(catalog: Catalog, version: str) -> None:
    catalog.purge(catalog.delete(JOB, version)[1])


def _file_bytes(root) -> int:
    """The data bytes of the tensor files under ``root``, each file (inode) once (the oracle
    of a store's memory use: read from the filesystem, not from the catalog)."""
    seen = {}
    for path in root.rglob("*"):
        st = path.stat()
        if path.is_file() and path.parent.name.startswith("r0") and not path.name.startswith("."):
            seen[(st.st_dev, st.st_ino)] = st.st_size - DATA_OFFSET
    return sum(seen.values())


def _check_usage(catalog: Catalog, root) -> None:
    """The catalog counts each file once, also when it indexes the root afresh (a restart)."""
    assert catalog.usage()["memory_bytes"] == _file_bytes(root)
    assert Catalog(str(root), name="again").usage()["memory_bytes"] == _file_bytes(root)


def test_unchanged_tensors_are_linked_and_outlive_their_old_version(tmp_path, monkeypatch):
    catalog = Catalog(str(tmp_path / "mem"), name="host0")
    place = Placement(2, ("host0",))
    old = Deployment(model_ptc("gpt-tiny", "tp=2,pp=1,dp=1"), place)
    new_full = model_ptc("gpt-tiny", "tp=1,pp=1,dp=2")
    new = Deployment(new_full.stored_replicas(place.host), place)  # one replica on the host
    glob = global_arrays(old.ptc, seed=5)
    _upload(catalog, "v0", old, _locals(old.ptc, glob))
    plan = make_plan(old, new)
    linked = _transform(catalog, plan, old, new, "v1")
    with monkeypatch.context() as m:  # the copy it must equal: links refused as across filesystems
        def refuse(*a, **k):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        m.setattr(os, "link", refuse)
        copied = _transform(catalog, plan, old, new, "v2")

    unchanged = host_unchanged_bytes(old, new)["host0"]  # the oracle: from rank shards alone
    assert 0 < unchanged < plan.stats.total_bytes, "the case must link some tensors and copy others"
    assert (linked.linked, copied.linked) == (unchanged, 0)
    _check_usage(catalog, tmp_path / "mem")
    assert linked.bytes == copied.bytes == plan.stats.total_bytes
    v0, v1, v2 = (_files(catalog, v) for v in ("v0", "v1", "v2"))
    old_inodes = {os.stat(p).st_ino: p for p in v0.values()}
    shared = {k: p for k, p in v1.items() if os.stat(p).st_ino in old_inodes}
    assert sum(os.stat(p).st_size - DATA_OFFSET for p in shared.values()) == unchanged
    assert all(os.stat(p).st_nlink == 2 for p in shared.values())
    assert all(os.stat(p).st_nlink == 1 for p in v2.values())
    want = _locals(new.ptc, glob)  # what every new tensor holds, from the global values
    for key, path in v1.items():
        with open(path, "rb") as a, open(v2[key], "rb") as b:
            assert a.read() == b.read(), f"{key}: the linked version differs from the copy (header or bytes)"
        stored = catalog.tensor(JOB, "v1", *key)
        assert stored.meta == catalog.tensor(JOB, "v2", *key).meta and stored.meta.crc32 is not None
        np.testing.assert_array_equal(catalog.array(stored), want[key[0]][key[1]])

    _purge(catalog, "v0")  # the old version's names go; the new version's bytes stay
    _check_usage(catalog, tmp_path / "mem")
    for key, path in shared.items():
        assert os.stat(path).st_nlink == 1
        with open(path, "rb") as a, open(v2[key], "rb") as b:
            assert a.read() == b.read()
    key, path = next(iter(shared.items()))
    fd = os.open(path, os.O_RDONLY)
    try:
        _purge(catalog, "v1")
        assert os.fstat(fd).st_nlink == 0  # no name left: the inode goes once this descriptor closes
    finally:
        os.close(fd)
    _check_usage(catalog, tmp_path / "mem")
    _purge(catalog, "v2")
    assert catalog.usage()["memory_bytes"] == 0


def test_a_link_only_to_the_very_tensor_and_never_written_after(tmp_path):
    data = np.arange(100, dtype=np.uint32)
    up = TensorUpload(str(tmp_path / "old" / "t"), "float32", (100,))
    up.write(data.tobytes())
    meta = up.finish()
    fd = os.open(tmp_path / "old" / "t", os.O_RDONLY)
    try:
        other = NewTensor(str(tmp_path / "new" / "u"), TensorMeta("float32", (50, 2)))  # another shape
        assert not other.link(str(tmp_path / "old" / "t"), fd, meta.crc32)
        wrong = NewTensor(str(tmp_path / "new" / "w"), TensorMeta("float32", (100,)))
        assert not wrong.link(str(tmp_path / "old" / "t"), fd, meta.crc32 ^ 1)  # another CRC
        written = NewTensor(str(tmp_path / "new" / "x"), TensorMeta("float32", (100,)))
        written.write(0, data[:10])
        assert not written.link(str(tmp_path / "old" / "t"), fd, meta.crc32)  # already written into
        t = NewTensor(str(tmp_path / "new" / "t"), TensorMeta("float32", (100,)))
        assert t.link(str(tmp_path / "old" / "t"), fd, meta.crc32)
        assert os.path.samefile(tmp_path / "new" / "t", tmp_path / "old" / "t")
        for write in (lambda: t.write(0, data[:1]), t.mapping):
            with pytest.raises(StoreFileError, match="linked"):
                write()
        assert t.finish() == meta
        np.testing.assert_array_equal(t.read(), data)
        assert sorted(os.listdir(tmp_path / "new")) == ["t", "u", "w", "x"]  # no temporary name left
    finally:
        os.close(fd)
