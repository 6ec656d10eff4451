"""Checkpoints on S3 through s3fs, against a real S3-compatible HTTP server on loopback
(moto's standalone server, started here in its own process with authentication on; no
network beyond loopback). The bytes a reshard reads are counted by the server itself and
compared with the bytes of the pieces the new layout stores, counted from the layouts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
import uuid

import numpy as np
import pytest

from scalai.checkpoint.object_source import ObjectSource
from scalai.dtypes import itemsize
from scalai.errors import CheckpointError
from scalai.models import model_ptc
from scalai.models.synth import write_synthetic_checkpoint
from scalai.planner import Deployment, make_plan
from scalai.config import Placement
from scalai.reshard import reshard_checkpoint
from scalai.storage import ArraysSink, run_plan
from scalai.storage.verify import verify_source
from test_checkpoint import global_raw, local_raw
from test_objects import _needed_bytes, _save

pytest.importorskip("s3fs")
pytest.importorskip("moto")
HERE = os.path.dirname(os.path.abspath(__file__))
SECRET_MARK = "scalai-test-secret"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server's endpoint and the environment a user would set (a user and key made
    through the server's IAM while it still answers unauthenticated calls)."""
    import boto3

    from unittest import mock

    loopback = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}  # never through a proxy
    # parts from 64 KiB (S3: 5 MiB), so that test-sized rank files go up as multipart uploads
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3", S3_UPLOAD_PART_MIN_SIZE="65536", **loopback)
    patch = mock.patch.dict(os.environ, loopback)
    patch.start()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "s3_server.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        port = int(proc.stdout.readline())
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="scalai")
        iam.put_user_policy(UserName="scalai", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="scalai")["AccessKey"]
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_REGION": "us-east-1", **loopback}
        bucket = f"scalai-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
        yield {"endpoint": endpoint, "env": env, "bucket": bucket}
    finally:
        proc.kill()
        proc.wait()
        patch.stop()


@pytest.fixture
def s3env(s3, monkeypatch):
    for k, v in s3["env"].items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a filesystem cached with another environment is not reused
    return s3


def _url(s3, name: str) -> str:
    return f"s3://{s3['bucket']}/{uuid.uuid4().hex[:6]}-{name}"


def _counts(s3) -> dict:
    with urllib.request.urlopen(f"{s3['endpoint']}/__scalai/counts") as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("model, a, b", [
    ("llama-tiny", "tp=2,pp=2,dp=1", "tp=1,pp=1,dp=2,zero=1"),
    pytest.param("gpt-tiny", "tp=1,pp=2,dp=2,zero=1", "tp=4,pp=1,dp=1", marks=pytest.mark.slow)])  # ~1 min
def test_s3_round_trip_across_layouts_is_bit_exact(s3env, tmp_path, monkeypatch, model, a, b):
    from scalai.checkpoint import uploads

    monkeypatch.setattr(uploads, "PART_BYTES", 128 << 10)  # every rank file a multipart upload
    monkeypatch.setattr(uploads, "SINGLE_PUT_BYTES", 0)
    completed = []
    finish = uploads._Multipart.complete
    monkeypatch.setattr(uploads._Multipart, "complete", lambda self: (completed.append(self.count), finish(self)))
    url_a, url_b, url_c = _url(s3env, "a"), _url(s3env, "b"), _url(s3env, "c")
    write_synthetic_checkpoint(model, url_a, a, seed=5)
    reshard_checkpoint(url_a, url_b, b)
    reshard_checkpoint(url_b, url_c, a)
    assert completed and min(completed) > 1, "the rank files went up in several parts"
    write_synthetic_checkpoint(model, tmp_path / "local", a, seed=5)
    from scalai.compare import compare_checkpoints
    from scalai.locations import open_source

    with open_source(url_c) as c, open_source(str(tmp_path / "local")) as local, open_source(url_b) as mid:
        verify_source(c)
        verify_source(mid)
        assert compare_checkpoints(local, c) is None
        assert compare_checkpoints(local, mid) is None
        for r in range(c.ptc.config.world_size):
            for name, _ in c.ptc.rank_shards(r):
                assert np.array_equal(c.read_window(r, name), local.read_window(r, name)), f"rank {r} {name}"


def test_s3_reshard_reads_only_the_bytes_the_new_layout_needs(s3env):
    old, new = model_ptc("llama-tiny", "tp=2,pp=1,dp=1"), model_ptc("llama-tiny", "tp=1,pp=2,dp=2,zero=1")
    glob = global_raw(old, seed=9)
    url = _url(s3env, "ranged")
    from scalai.checkpoint.objects import _filesystem

    fs, _ = _filesystem(url)
    _save(fs, url, old, local_raw(old, glob))
    with ObjectSource(url, max_gap_bytes=0) as source:
        for r in range(old.config.world_size):
            source.entries(r)  # headers first: not part of the plan's bytes
        urllib.request.urlopen(urllib.request.Request(f"{s3env['endpoint']}/__scalai/reset", method="POST"))
        place = Placement(64)
        plan = make_plan(Deployment(old, place), Deployment(new.stored_replicas(), place), fanout=False)
        expected = local_raw(new, glob)
        dest = {r: {n: np.zeros(x.shape, x.dtype) for n, x in t.items()} for r, t in expected.items()}
        run_plan(plan, source, ArraysSink(new.stored_replicas(), dest), workers=4)
        sent = _counts(s3env)
    assert sent["get_bytes"] == _needed_bytes(new), "the server sent exactly the stored pieces' bytes"
    # small windows of one rank file come in one GET when they touch (one GET per window
    # before: as many as the plan's copies)
    assert sent["gets"] * 4 <= len(plan.copies), (sent, len(plan.copies))
    print("GETS", sent, len(plan.copies))
    for r, tensors in expected.items():
        for name, want in tensors.items():
            if new.replica_owner(name, r) == r:
                assert np.array_equal(dest[r][name], want), f"rank {r} {name}"


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from scalai.checkpoint.objects import ObjectSink
    from scalai.locations import open_source
    from scalai.planner import identity_plan
    from scalai.storage import run_plan
    with open_source(sys.argv[1]) as src:
        sink = ObjectSink(sys.argv[2], src.ptc, src.state)
        run_plan(identity_plan(src.ptc, range(src.ptc.config.world_size), stored=sink.stores), src, sink)
        sink.finish()   # every rank file uploaded...
        os.kill(os.getpid(), signal.SIGKILL)  # ...and the writer dies before its commit
""")


def test_a_writer_killed_mid_save_leaves_no_manifest_and_the_previous_version_loads(s3env, tmp_path):
    v1, v2 = _url(s3env, "v1"), _url(s3env, "v2")
    write_synthetic_checkpoint("gpt-tiny", v1, "tp=2,pp=1,dp=2", seed=2)
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, v1, v2], env=dict(os.environ), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    from scalai.checkpoint.objects import _filesystem

    fs, root = _filesystem(v2)
    names = [n.rsplit("/", 1)[-1] for n in fs.ls(root, detail=False, refresh=True)]
    assert names and all(n.endswith(".safetensors") for n in names), names
    with pytest.raises(CheckpointError, match="no manifest.json"):
        ObjectSource(v2)
    with ObjectSource(v1) as previous:
        verify_source(previous)
        assert previous.state["step"] == 1000
    reshard_checkpoint(v1, v2, "tp=1,pp=1,dp=1")  # a later save to v2 removes the leftovers
    with ObjectSource(v2) as again:
        verify_source(again)
        assert sorted(n.rsplit("/", 1)[-1] for n in fs.ls(root, detail=False, refresh=True)) == \
            ["manifest.json", "rank-00000.safetensors"]


def _cli(env, *args):
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "scalai"), *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_on_s3_wrong_credentials_missing_bucket_and_compare(s3env, tmp_path):
    env = dict(os.environ)
    url = _url(s3env, "cli")
    ok = _cli(env, "synth", "gpt-tiny", url, "--layout", "tp=2,pp=1,dp=1")
    assert ok.returncode == 0, ok.stderr
    assert _cli(env, "synth", "gpt-tiny", str(tmp_path / "local"), "--layout", "tp=1,pp=2,dp=1").returncode == 0
    same = _cli(env, "compare", url, str(tmp_path / "local"))
    assert same.returncode == 0 and "equal" in same.stdout, same.stdout + same.stderr
    assert _cli(env, "synth", "gpt-tiny", str(tmp_path / "other"), "--layout", "tp=1,pp=1,dp=1",
                "--seed", "1").returncode == 0
    differ = _cli(env, "compare", url, str(tmp_path / "other"))
    assert differ.returncode == 1 and "different" in differ.stdout
    secret = env["AWS_SECRET_ACCESS_KEY"]
    wrong = dict(env, AWS_SECRET_ACCESS_KEY=SECRET_MARK + "-wrong")
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/x"
    for run_env, args, why in [
            (wrong, ("inspect", url), "access denied"),
            (wrong, ("reshard", url, _url(s3env, "never"), "--to", "tp=1,pp=1,dp=1"), "access denied"),
            (env, ("inspect", missing), "not found"),
            (env, ("reshard", url, missing, "--to", "tp=1,pp=1,dp=1"), "not found")]:
        res = _cli(run_env, *args)
        text = res.stdout + res.stderr
        assert res.returncode != 0 and "Traceback" not in text, text
        assert len(res.stderr.strip().splitlines()) == 1 and why in res.stderr, text
        assert SECRET_MARK not in text and secret not in text, "no secret in any output"
    for path, _, files in os.walk(tmp_path):
        for f in files:
            with open(os.path.join(path, f), "rb") as fh:
                data = fh.read()
            assert secret.encode() not in data and SECRET_MARK.encode() not in data
    from scalai.checkpoint.objects import _filesystem

    fs, root = _filesystem(url)
    assert secret.encode() not in fs.cat_file(f"{root}/manifest.json")


def test_training_saves_to_s3_in_the_background_and_loads_back(s3env):
    import torch

    from scalai.training import close, find_checkpoint, load, save, step_dir
    sys.path.insert(0, os.path.join(HERE, "training"))
    from test_api import make_job, snapshot

    root = _url(s3env, "run")
    job = make_job(seed=0)
    before = snapshot(job)
    report = save(job, step_dir(root, job.step), background=True)
    assert report.background and report.rank_bytes == sum(t.numel() * 4 for t in before.values())
    with torch.no_grad():
        for t in job.local_tensors().values():
            t.mul_(3)  # training goes on
    with pytest.raises(CheckpointError, match="no manifest.json|no complete step"):
        find_checkpoint(root)  # not committed before the next call
    assert close(job).step == 2
    assert find_checkpoint(root) == step_dir(root, 2)
    fresh = make_job(seed=1, steps=0)
    load(fresh, find_checkpoint(root))
    for name, tensor in before.items():
        assert torch.equal(fresh.local_tensors()[name], tensor), name


def test_the_persister_copies_committed_versions_to_s3_and_keeps_the_newest(s3env, tmp_path):
    """scalai run --persist URL: the background copies of the stores' versions go to S3."""
    sys.path.insert(0, os.path.join(HERE, "store"))
    from store_helpers import StoreProc

    from scalai.compare import compare_checkpoints
    from scalai.elastic.persist import Persister
    from scalai.locations import exists, open_source
    from scalai.store import StoreCluster
    from scalai.training import step_dir

    procs = [StoreProc(tmp_path / "stores" / f"host{i}", f"host{i}").start() for i in range(2)]
    errors: list[str] = []
    try:
        write_synthetic_checkpoint("gpt-tiny", tmp_path / "ckpt", "tp=2,pp=1,dp=2", seed=4)
        cluster = StoreCluster([p.url for p in procs])
        root = _url(s3env, "persist")
        persister = Persister(lambda: [p.url for p in procs], "job", root, keep=1, on_error=errors.append)
        try:
            first = cluster.push(str(tmp_path / "ckpt"), "job", 2)
            persister.submit(first.name, 10)
            assert persister.wait_idle(120) and not errors, errors
            copy = persister.latest()
            assert copy.path == step_dir(root, 10) and copy.bytes > 0
            with open_source(copy.path) as c, open_source(str(tmp_path / "ckpt")) as local:
                verify_source(c)
                assert compare_checkpoints(local, c) is None
            second = cluster.push(str(tmp_path / "ckpt"), "job", 2)
            persister.submit(second.name, 20)
            assert persister.wait_idle(120) and not errors, errors
            assert persister.latest().path == step_dir(root, 20)
            assert exists(step_dir(root, 20)) and not exists(step_dir(root, 10)), "only the newest is kept"
        finally:
            persister.close()
    finally:
        for p in procs:
            p.kill()


def test_an_aborted_or_killed_save_leaves_no_multipart_upload_behind(s3env, monkeypatch):
    """A save that stops mid-file: its abort aborts the multipart upload it started; one that
    was killed (no abort) leaves it, and the next save to the URL aborts it (S3 would keep
    the parts, unseen, until a lifecycle rule removes them)."""
    import boto3

    from scalai.checkpoint import uploads
    from scalai.checkpoint.objects import ObjectSink, _filesystem

    monkeypatch.setattr(uploads, "PART_BYTES", 16 << 10)  # moto checks part sizes only at completion
    monkeypatch.setattr(uploads, "SINGLE_PUT_BYTES", 0)
    env = s3env["env"]
    client = boto3.client("s3", endpoint_url=s3env["endpoint"], region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    ptc = model_ptc("llama-tiny", "tp=1,pp=1,dp=1")
    name, shard = max(ptc.rank_shards(0), key=lambda ns: int(np.prod(ns[1].shape)))  # the largest tensor
    whole = np.zeros(int(np.prod(shard.shape)) * itemsize(ptc.spec(name).dtype), np.uint8)  # several parts
    for stop in ("abort", "kill"):
        url = _url(s3env, stop)
        key = url.split("/", 3)[3]
        sink = ObjectSink(url, ptc)
        sink.write(0, name, 0, whole)  # several parts full: a multipart upload under way
        for upload in sink._files.values():
            for future in upload._backend.futures:
                future.result()
        pending = client.list_multipart_uploads(Bucket=s3env["bucket"], Prefix=key).get("Uploads", [])
        assert len(pending) == 1, pending
        if stop == "abort":
            sink.abort()
        else:
            sink._pool.shutdown(wait=True)  # the writer dies here; a later save to the URL:
            ObjectSink.begin(url)
        assert client.list_multipart_uploads(Bucket=s3env["bucket"], Prefix=key).get("Uploads", []) == []
        fs, root = _filesystem(url)
        assert not fs.exists(f"{root}/rank-00000.safetensors") and not fs.exists(f"{root}/manifest.json")
