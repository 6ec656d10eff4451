"""Saves into the store of this machine without HTTP (scalai.store.local): the client
writes the tensor file into the store's upload directory and the store adopts it.

Oracles: CRCs computed here with zlib, the bytes of the HTTP path's files, the store's
count of HTTP body bytes (``traffic.received``) and of adopted bytes."""

from __future__ import annotations

import os
import time
import zlib

import numpy as np
import pytest

from scalai.config import Placement
from scalai.dtypes import raw_numpy
from scalai.models import model_ptc
from scalai.models.synth import fill_local
from scalai.store import StoreCluster, StoreRequestError
from scalai.store.files import DATA_OFFSET, local_name, write_tensor_file
from scalai.store.roots import LOCAL_KEY, sweep_local
from scalai.store.training import StoreWriter, commit, save_rank

from store_helpers import TOKEN


def _tensors(ptc, rank: int = 0) -> dict:
    out = {}
    for name, shard in ptc.rank_shards(rank):
        raw = np.zeros(shard.shape, raw_numpy(ptc.spec(name).dtype))
        fill_local(ptc.spec(name), shard, raw, 11)
        out[name] = raw
    return out


def _files(root, version: str) -> dict[str, bytes]:
    rdir = root / "jobs" / "j" / version / "r00000"
    return {name: (rdir / name).read_bytes() for name in os.listdir(rdir)}


def _uploads(store) -> list[str]:
    return sorted(os.listdir(store.root / "uploads"))


EMPTY: list[str] = []


@pytest.fixture
def one(stores):
    return stores(1, token=TOKEN)[0]


def test_a_save_on_the_stores_machine_is_adopted_with_the_bytes_and_crcs_of_an_upload(one, monkeypatch):
    ptc = model_ptc("gpt-tiny", "tp=1,pp=1,dp=1")
    place, tensors = Placement(1, ("host0",)), _tensors(ptc)
    fast = StoreCluster([one.url], TOKEN)
    nbytes = save_rank(fast, "j", "v0", 0, ptc, place, tensors, owner="me")
    monkeypatch.setenv("SCALAI_STORE_LOCAL", "0")
    http = StoreCluster([one.url], TOKEN)
    assert save_rank(http, "j", "v1", 0, ptc, place, tensors, owner="me") == nbytes
    assert fast.clients[0].adoptions == len(tensors) and http.clients[0].adoptions == 0
    traffic = one.client().usage()["traffic"]
    assert traffic["adopted"] == {"client": nbytes} and traffic["received"] == {"client": nbytes}
    local, remote = _files(one.root, "v0"), _files(one.root, "v1")
    assert local == remote and len(local) == len(tensors)
    listing = one.client().version("j", "v0")["ranks"]["0"]
    for name, array in tensors.items():
        assert int(listing[name]["crc32"], 16) == zlib.crc32(np.ascontiguousarray(array).tobytes())
    assert _uploads(one) == EMPTY
    commit(fast, "j", "v0", ptc, place, {"step": 1}, 0, owner="me")  # the store holds exactly the rank's tensors


def _adopt(client, path, **kw):
    meta = write_tensor_file(path, np.arange(6, dtype=np.float32).reshape(2, 3), "float32")
    return client.adopt("j", kw.pop("version", "v0"), 0, "w", path, meta, **kw)


def test_refused_adoptions_say_why_and_leave_no_file(one, tmp_path):
    client = one.client()
    uploads = client.local_dir()
    assert uploads == str(one.root / "uploads")
    client.put("j", "v0", 0, "x", np.zeros(4, np.float32), "float32", owner="a")

    def refused(status: int, words: str, path: str | None = None, **kw) -> None:
        path = path or local_name(uploads)
        with pytest.raises(StoreRequestError) as err:
            _adopt(client, path, **kw)
        assert err.value.status == status and words in str(err.value) and "\n" not in str(err.value)
        assert _uploads(one) == EMPTY
        assert "w" not in client.version("j", "v0")["ranks"]["0"]

    refused(409, "belongs to another writer", owner="b")
    client.fence("j", 5)
    refused(409, "fenced off", owner="g3-save-1", version="v9")
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep me")
    for name in (f"../../{outside.name}", str(outside), "../.local-key"):  # names out of the upload files: nothing deleted
        with pytest.raises(StoreRequestError) as err:
            client._json("POST", "/v1/jobs/j/versions/v0/ranks/0/tensors/w/adopt",
                         query={"file": name, "dtype": "float32", "shape": "2"}, headers={"X-Scalai-Owner": "a"})
        assert err.value.status == 400 and "not a private upload name" in str(err.value)
    assert outside.read_bytes() == b"keep me" and _uploads(one) == EMPTY
    link = local_name(uploads)
    os.symlink(outside, link)
    with pytest.raises(StoreRequestError) as err:
        client.adopt("j", "v0", 0, "w", link, write_tensor_file(local_name(uploads), np.zeros(6, np.float32),
                                                                 "float32"), owner="a")
    assert err.value.status == 400 and "symbolic link" in str(err.value)
    assert outside.read_bytes() == b"keep me" and not os.path.lexists(link)
    for f in _uploads(one):  # the file written for the symlink's meta above
        os.unlink(os.path.join(uploads, f))
    path = local_name(uploads)
    meta = write_tensor_file(path, np.zeros((2, 3), np.float32), "float32")
    with open(path, "ab") as f:
        f.write(b"\0")  # one byte too many
    with pytest.raises(StoreRequestError) as err:
        client.adopt("j", "v0", 0, "w", path, meta, owner="a")
    assert err.value.status == 400 and f"{DATA_OFFSET + 25} bytes" in str(err.value)
    assert _uploads(one) == EMPTY
    ptc = model_ptc("gpt-tiny", "tp=1,pp=1,dp=1")
    cluster = StoreCluster([one.url], TOKEN)
    save_rank(cluster, "j", "v2", 0, ptc, Placement(1, ("host0",)), _tensors(ptc), owner="a")
    commit(cluster, "j", "v2", ptc, Placement(1, ("host0",)), {}, 2, owner="a")
    refused(409, "committed", owner="a", version="v2")


def test_a_client_that_does_not_see_the_key_uploads_over_http(one):
    key = one.root / LOCAL_KEY
    key.write_text("0" * 32)  # another machine's file at the same path
    client = one.client()
    assert client.local_dir() is None
    client.put("j", "v0", 0, "w", np.ones(8, np.float32), "float32")
    key.unlink()
    other = one.client()
    assert other.local_dir() is None
    other.put("j", "v0", 0, "v", np.ones(8, np.float32), "float32")
    assert client.adoptions == other.adoptions == 0
    assert one.client().usage()["traffic"]["received"] == {"client": 64}


def test_a_background_stage_is_the_stores_file_finished_by_the_writer(one):
    ptc = model_ptc("gpt-tiny", "tp=1,pp=1,dp=1")
    writer = StoreWriter([one.url], "j", gpus_per_host=1, token=TOKEN)
    tensors = _tensors(ptc)
    token = writer.begin()
    try:
        staged = writer.stage_rank(token, 0, ptc, tensors)
        assert len(_uploads(one)) == len(tensors)  # staged in the store's directory, not yet adopted
        record = writer.write_rank(token, 0, ptc, staged)
    finally:
        writer.abort(token)
    assert _uploads(one) == EMPTY
    assert writer.cluster.clients[0].adoptions == len(tensors)
    for name, array in tensors.items():
        assert record.tensors[name].checksum == zlib.crc32(np.ascontiguousarray(array).tobytes())
    staged = writer.stage_rank(token, 0, ptc, tensors)
    staged.clear()  # a save that failed before its thread ran
    assert _uploads(one) == EMPTY


def test_sweep_deletes_only_stale_local_files(tmp_path):
    for name in ("local-old", "local-new", "upload-old", "key"):
        (tmp_path / name).write_bytes(b"x")
    past = time.time() - 100
    for name in ("local-old", "upload-old", "key"):
        os.utime(tmp_path / name, (past, past))
    assert sweep_local(str(tmp_path), 50) == 1
    assert sorted(os.listdir(tmp_path)) == ["key", "local-new", "upload-old"]


@pytest.mark.slow
def test_the_store_sweeps_what_a_killed_writer_left(stores):
    store = stores(1, extra=("--lease", "1", "--idle-timeout", "1"))[0]
    left = local_name(store.client().local_dir())
    write_tensor_file(left, np.zeros(4, np.float32), "float32", checksum=False)
    deadline = time.monotonic() + 30
    while os.path.exists(left) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(left) and _uploads(store) == EMPTY


def test_a_client_off_loopback_gets_the_files_to_map_once_it_read_the_key(stores):
    """A worker that reaches its own machine's store at the machine's address (a network
    namespace of its own) maps the store's files, as a loopback client does, once it shows
    the key it read; without the key the store keeps the paths to itself (403)."""
    from scalai.elastic.machine import route_address
    from scalai.store import StoreClient

    try:
        address = route_address("192.0.2.1", 9)  # this machine's address on its default route
    except OSError:
        address = "127.0.0.1"
    if address.startswith("127."):
        pytest.skip("this machine has no address off loopback to reach its store by")
    (store,) = stores(1, token=TOKEN, extra=("--host", "0.0.0.0"))
    ptc = model_ptc("gpt-tiny", "tp=1,pp=1,dp=1")
    cluster = StoreCluster([store.url], TOKEN)
    save_rank(cluster, "j", "v0", 0, ptc, Placement(1, ("host0",)), _tensors(ptc), owner="me")
    commit(cluster, "j", "v0", ptc, Placement(1, ("host0",)), {"step": 1}, 0, owner="me")
    url = store.url.replace("127.0.0.1", address).replace("0.0.0.0", address)
    assert "127.0.0.1" not in url
    with pytest.raises(StoreRequestError) as err:
        StoreClient(url, TOKEN, local=False).files("j", "v0", 0)
    assert err.value.status == 403
    files = StoreClient(url, TOKEN).files("j", "v0", 0)
    assert set(files) == {name for name, _ in ptc.rank_shards(0)}
    assert all(os.path.exists(f["path"]) for f in files.values())
