"""One real store process: upload, read (whole, regions, views), list, commit, delete,
concurrent readers, restart with the same root."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from scalai import PTC, ParallelConfig, Placement, TensorSpec
from scalai.planner.plan import Window
from scalai.regions import Region
from scalai.store import StoreRequestError, VersionManifest


def _version(client, job="j", version="v0", tensors=None, seq=0):
    """Upload ``tensors`` ({name: uint32/uint16 array}) as rank 0 and commit them."""
    tensors = tensors or {"w": np.arange(24 * 16, dtype=np.uint32).reshape(24, 16)}
    specs = [TensorSpec(n, a.shape, "float32" if a.dtype == np.uint32 else "bfloat16") for n, a in tensors.items()]
    ptc = PTC(ParallelConfig(), specs, 0)
    for spec in specs:
        client.put(job, version, 0, spec.name, tensors[spec.name], spec.dtype)
    manifest = VersionManifest(job, version, seq, ptc, Placement(1, (client.name,)), {"step": 7})
    return client.commit(job, version, manifest.to_json())


def test_upload_read_regions_round_trip(store):
    c = store.client()
    a = np.random.default_rng(0).integers(0, 2**32, (24, 16), dtype=np.uint32)
    b = np.random.default_rng(1).integers(0, 2**16, (5, 3, 7), dtype=np.uint16)
    f = np.arange(256, dtype=np.uint32)
    out = _version(c, tensors={"w": a, "decoder.layers.0.b": b, "optimizer.exp_avg.w": f})
    assert out["committed"] and out["bytes"] == a.nbytes + b.nbytes + f.nbytes
    np.testing.assert_array_equal(c.read("j", "v0", 0, "w"), a)
    np.testing.assert_array_equal(c.read("j", "v0", 0, "decoder.layers.0.b"), b)
    box = Region((3, 2), (10, 5))
    np.testing.assert_array_equal(c.read("j", "v0", 0, "w", box), a[3:13, 2:7])
    np.testing.assert_array_equal(c.read("j", "v0", 0, "decoder.layers.0.b", Region((1, 0, 2), (3, 3, 4))),
                                  b[1:4, :, 2:6])
    # a flat range seen as a box (a ZeRO shard's window): region, reshaped to view, cut to sub
    w = Window(Region((32,), (64,)), (4, 16), Region((1, 3), (2, 8)))
    np.testing.assert_array_equal(c.read("j", "v0", 0, "optimizer.exp_avg.w", w), f[32:96].reshape(4, 16)[1:3, 3:11])
    # reading into a caller's array (no second copy)
    out = np.zeros((10, 5), np.uint32)
    assert c.read("j", "v0", 0, "w", box, out=out) is out
    np.testing.assert_array_equal(out, a[3:13, 2:7])
    # empty region and a strided destination
    assert c.read("j", "v0", 0, "w", Region((0, 0), (0, 16))).shape == (0, 16)
    strided = np.zeros((10, 10), np.uint32)[:, ::2]
    c.read("j", "v0", 0, "w", box, out=strided)
    np.testing.assert_array_equal(strided, a[3:13, 2:7])


def test_list_usage_and_crc(store):
    import zlib

    c = store.client()
    a = np.arange(100, dtype=np.uint32).reshape(10, 10)
    up = c.put("j", "v0", 0, "w", a, "float32")
    assert up["crc32"] == f"{zlib.crc32(a.tobytes()):08x}" and up["bytes"] == 400
    info = c.version("j", "v0")
    assert info["committed"] is False and info["manifest"] is None
    assert info["ranks"]["0"]["w"] == {"dtype": "float32", "shape": [10, 10], "bytes": 400, "crc32": up["crc32"]}
    with pytest.raises(StoreRequestError) as e:  # not readable before it is committed
        c.read("j", "v0", 0, "w")
    assert e.value.status == 409
    _version(c, tensors={"w": a})
    assert [v["version"] for v in c.job("j")["versions"]] == ["v0"]
    assert c.jobs()[0]["versions"][0] == {"version": "v0", "committed": True, "sequence": 0,
                                          "layout": "tp=1,pp=1,dp=1", "bytes": 400, "tensors": 1, "owner": "",
                                          "hosts": [c.name]}
    assert c.usage()["memory_bytes"] == 400
    assert c.version("j", "v0", tensors=False).get("ranks") is None


def test_commit_is_atomic_checked_and_final(store):
    c = store.client()
    a = np.zeros((4, 4), np.uint32)
    specs = [TensorSpec("w", (4, 4), "float32"), TensorSpec("x", (2,), "float32")]
    manifest = VersionManifest("j", "v0", 0, PTC(ParallelConfig(), specs, 0), Placement(1, (c.name,)), {})
    c.put("j", "v0", 0, "w", a, "float32")
    with pytest.raises(StoreRequestError, match="1 tensors missing.*rank 0 x") as e:
        c.commit("j", "v0", manifest.to_json())
    assert e.value.status == 409
    c.put("j", "v0", 0, "x", np.zeros(2, np.uint32), "float32")
    c.put("j", "v0", 0, "stray", np.zeros(2, np.uint32), "float32")
    with pytest.raises(StoreRequestError, match="not in the layout"):
        c.commit("j", "v0", manifest.to_json())
    c.delete("j", "v0")
    c.put("j", "v0", 0, "w", a, "float32")
    c.put("j", "v0", 0, "x", np.zeros(3, np.uint32), "float32")
    with pytest.raises(StoreRequestError, match="wrong dtype or shape"):
        c.commit("j", "v0", manifest.to_json())
    c.put("j", "v0", 0, "x", np.zeros(2, np.uint32), "float32")  # replaces the bad upload
    assert c.commit("j", "v0", manifest.to_json())["committed"]
    assert c.commit("j", "v0", manifest.to_json())["committed"]  # a retry is harmless
    with pytest.raises(StoreRequestError) as e:  # committed versions never change
        c.put("j", "v0", 0, "w", a, "float32")
    assert e.value.status == 409
    other = VersionManifest("j", "v0", 5, manifest.ptc, manifest.placement, {})
    with pytest.raises(StoreRequestError, match="another manifest"):
        c.commit("j", "v0", other.to_json())


def test_delete_version_and_job(store):
    c = store.client()
    _version(c, version="v0")
    _version(c, version="v1", seq=1)
    assert c.delete("j", "v0") == {"job": "j", "deleted": ["v0"]}
    assert [v["version"] for v in c.job("j")["versions"]] == ["v1"]
    assert c.delete("j")["deleted"] == ["v1"]
    for call in (lambda: c.job("j"), lambda: c.delete("j"), lambda: c.read("j", "v1", 0, "w")):
        with pytest.raises(StoreRequestError) as e:
            call()
        assert e.value.status == 404
    assert c.usage()["memory_bytes"] == 0
    assert not list((store.root / "jobs").iterdir())


def test_concurrent_readers_get_their_own_regions(store):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 2**32, (512, 1024), dtype=np.uint32)  # 2 MiB
    c = store.client(pool_size=16)
    _version(c, tensors={"w": a})
    errors = []

    def reader(k: int) -> None:
        try:
            local = store.client(pool_size=4)
            for i in range(20):
                r0, c0 = (k * 37 + i * 11) % 400, (k * 53 + i * 7) % 900
                box = Region((r0, c0), (100, 120))
                np.testing.assert_array_equal(local.read("j", "v0", 0, "w", box), a[r0:r0 + 100, c0:c0 + 120])
            np.testing.assert_array_equal(local.read("j", "v0", 0, "w"), a)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    items = [("j", "v0", 0, "w", Region((r, 0), (64, 1024))) for r in range(0, 512, 64)]
    parts = c.read_many(items, workers=8)  # parallel range reads on one client
    for t in threads:
        t.join()
    assert not errors, errors[0]
    np.testing.assert_array_equal(np.concatenate(parts), a)


def test_restart_keeps_committed_state(store):
    c = store.client()
    a = np.arange(64, dtype=np.uint32).reshape(8, 8)
    _version(c, tensors={"w": a})
    c.put("j", "v1", 0, "w", a, "float32")  # an uncommitted version survives too
    store.restart()
    c = store.client()
    np.testing.assert_array_equal(c.read("j", "v0", 0, "w"), a)
    assert {v["version"]: v["committed"] for v in c.job("j")["versions"]} == {"v0": True, "v1": False}
    assert c.usage()["memory_bytes"] == 2 * a.nbytes


def test_spill_directory_takes_what_passes_the_memory_limit(stores, tmp_path):
    spill = tmp_path / "spill"
    s = stores(1, extra=("--memory-limit", "1000", "--spill", str(spill)))[0]
    c = s.client()
    small, big = np.zeros(100, np.uint32), np.arange(300, dtype=np.uint32)
    assert c.put("j", "v0", 0, "a", small, "float32")["spilled"] is False
    assert c.put("j", "v0", 0, "b", big, "float32")["spilled"] is True
    usage = c.usage()
    assert (usage["memory_bytes"], usage["spill_bytes"]) == (400, 1200)
    specs = [TensorSpec("a", (100,), "float32"), TensorSpec("b", (300,), "float32")]
    c.commit("j", "v0", VersionManifest("j", "v0", 0, PTC(ParallelConfig(), specs, 0),
                                        Placement(1, (c.name,)), {}).to_json())
    np.testing.assert_array_equal(c.read("j", "v0", 0, "b", Region((5,), (10,))), big[5:15])
    nolimit = stores(1, extra=("--memory-limit", "1000"))[0].client()
    with pytest.raises(StoreRequestError, match="--spill") as e:
        nolimit.put("j", "v0", 0, "b", big, "float32")
    assert e.value.status == 507


def test_root_must_be_owned(tmp_path):
    from scalai.store.catalog import Catalog

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="not a store root"):
        Catalog(str(tmp_path / "other"))
    assert (tmp_path / "other" / "precious.txt").exists()


def test_windows_of_one_rank_in_one_request(store):
    """POST .../windows: several selections of one rank's tensors, concatenated in order
    (what a peer store asks for its small reads); bad items and too many bytes refused."""
    import json
    import urllib.error
    import urllib.request

    c = store.client()
    a = np.random.default_rng(2).integers(0, 2**32, (24, 16), dtype=np.uint32)
    b = np.random.default_rng(3).integers(0, 2**16, (5, 3, 7), dtype=np.uint16)
    f = np.arange(256, dtype=np.uint32)
    _version(c, tensors={"w": a, "b": b, "f": f})

    def post(reads, version="v0"):
        req = urllib.request.Request(f"{store.url}/v1/jobs/j/versions/{version}/ranks/0/windows", method="POST",
                                     data=json.dumps({"reads": reads}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read(), resp.headers

    body, headers = post([{"tensor": "w", "region": "3:13,2:7"}, {"tensor": "b"},
                          {"tensor": "f", "region": "32:96", "view": "4,16", "sub": "1:3,3:11"}])
    expected = [a[3:13, 2:7], b, f[32:96].reshape(4, 16)[1:3, 3:11]]
    assert body == b"".join(np.ascontiguousarray(e).tobytes() for e in expected)
    assert headers["X-Scalai-Count"] == "3"
    for reads, status in (([{"tensor": "nope"}], 404), ([{"tensor": "w", "region": "0:99,0:16"}], 400),
                          ([], 400), ([{"tensor": "w", "extra": 1}], 400)):
        with pytest.raises(urllib.error.HTTPError) as err:
            post(reads)
        assert err.value.code == status, (reads, err.value.read())
    from scalai.store.server import MAX_WINDOWS_BYTES

    too_many = [{"tensor": "f"}] * (MAX_WINDOWS_BYTES // f.nbytes + 1)  # more bytes than one response carries
    assert len(too_many) > 4096  # beyond the schema's count as well
    with pytest.raises(urllib.error.HTTPError) as err:
        post(too_many)
    assert err.value.code == 400
    _version(c, version="v1", tensors={"big": np.zeros(MAX_WINDOWS_BYTES // 4096 + 1, np.uint32)}, seq=1)
    with pytest.raises(urllib.error.HTTPError) as err:
        post([{"tensor": "big"}] * 4096, "v1")  # within the count, beyond the bytes
    assert err.value.code == 413
