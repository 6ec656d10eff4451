"""The checkpoint CLI end to end, as a user runs it, bad input included."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cli_helpers import run, tree_digest
from scalai.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """gpt-tiny synthesized in tp=2,pp=2,dp=2."""
    path = tmp_path_factory.mktemp("ckpt") / "gpt"
    from scalai.config import ParallelConfig
    from scalai.models.synth import write_synthetic_checkpoint

    write_synthetic_checkpoint("gpt-tiny", path, ParallelConfig.parse("tp=2,pp=2,dp=2"), seed=3)
    return path


def test_synth_plan_reshard_compare_inspect(capsys, tmp_path, tiny):
    out = tmp_path / "out"
    r = run(capsys, "reshard", tiny, out, "--to", "tp=1,pp=4,dp=2,zero=1", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["to"] == "tp=1,pp=4,dp=2,zero=1" and report["total_bytes"] > 0
    assert run(capsys, "compare", tiny, out).code == 0

    expected = tmp_path / "expected"
    assert run(capsys, "synth", "gpt-tiny", expected, "--layout", "tp=1,pp=4,dp=2,zero=1", "--seed", "3").code == 0
    r = run(capsys, "compare", expected, out, "--json")
    assert r.code == 0 and json.loads(r.out)["equal"] is True

    r = run(capsys, "inspect", out, "--verify", "--json")
    assert r.code == 0
    info = json.loads(r.out)
    assert info["layout"] == "tp=1,pp=4,dp=2,zero=1" and info["verified"]["checksums"] > 0
    assert info["model"] == "gpt-tiny" and info["step"] == 1000

    r = run(capsys, "plan", tiny, "--to", "tp=4,pp=1,dp=1", "-g", "2", "--json")
    plan = json.loads(r.out)
    assert {"total_bytes", "cross_host_bytes", "cross_host_lower_bound_bytes"} <= plan.keys()
    # the reported bytes against a per-host lower bound computed independently (element masks)
    from scalai.config import Placement
    from scalai.models import model_ptc
    from scalai.planner import Deployment
    from simulate import host_lower_bounds

    expected = host_lower_bounds(Deployment(model_ptc("gpt-tiny", "tp=2,pp=2,dp=2"), Placement(2)),
                                 Deployment(model_ptc("gpt-tiny", "tp=4,pp=1,dp=1"), Placement(2)))
    assert {h: v["received_bytes"] for h, v in plan["hosts"].items() if v["received_bytes"]} == expected
    assert plan["cross_host_bytes"] == plan["cross_host_lower_bound_bytes"] == sum(expected.values()) > 0


@pytest.mark.slow
def test_plan_for_gpt3_175b_shapes_only(capsys):
    r = run(capsys, "plan", "--model", "gpt3-175b", "--from", "tp=8,pp=16,dp=8",
            "--to", "tp=8,pp=8,dp=16", "--json")
    assert r.code == 0, r.err
    plan = json.loads(r.out)
    assert plan["cross_host_bytes"] == plan["cross_host_lower_bound_bytes"]
    # 175e9 parameters x (2 B bf16 + 12 B fp32 Adam state) x 16 replicas
    assert 0.9 * 175e9 * 14 * 16 < plan["total_bytes"] < 1.1 * 175e9 * 14 * 16


@pytest.mark.parametrize("a, b", [
    ("tp=2,pp=2,dp=2", "tp=4,pp=1,dp=1"),
    ("tp=2,pp=2,dp=2", "tp=1,pp=1,dp=3,zero=1"),
    ("tp=2,pp=2,dp=2", "tp=1,pp=2,dp=2,stages=1+3"),
    ("tp=2,pp=2,dp=2", "tp=2,pp=4,dp=1"),
])
def test_file_round_trips_are_bit_exact(capsys, tmp_path, tiny, a, b):
    there, back = tmp_path / "there", tmp_path / "back"
    assert run(capsys, "reshard", tiny, there, "--to", b).code == 0
    assert run(capsys, "reshard", there, back, "--to", a).code == 0
    with Checkpoint.open(tiny) as x, Checkpoint.open(back) as y:
        for rank in range(x.ptc.config.world_size):
            for name, _ in x.ptc.rank_shards(rank):
                assert np.array_equal(x.view(rank, name), y.view(rank, name)), (rank, name)


def test_compare_names_the_first_difference(capsys, tmp_path, tiny):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    with Checkpoint.open(copy) as c:
        name = "decoder.layers.1.mlp.linear_fc1.weight"
        entry = c.file(1).entry(name)
        path = os.path.join(copy, c.manifest.ranks[1].file)
    with open(path, "r+b") as f:  # flip one bit of local element [3, 5] of rank 1 (tp rank 1)
        f.seek(entry.start + (3 * 64 + 5) * 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    r = run(capsys, "compare", tiny, copy)
    assert r.code == 1
    assert "tensor decoder.layers.1.mlp.linear_fc1.weight differs at global index [131, 5]" in r.out
    r = run(capsys, "inspect", copy, "--verify")
    assert r.code == 1 and "checksum" in r.err and name in r.err


@pytest.mark.parametrize("args, fragment", [
    (["synth", "gpt-tiny", "{out}", "--layout", "tp=3,pp=1,dp=1"], "tp=3 does not divide 4 attention heads"),
    (["synth", "gpt-tiny", "{out}", "--layout", "tp=1,pp=3,dp=1"], "pp=3 does not divide 4 layers"),
    (["synth", "gpt-42", "{out}", "--layout", "tp=1,pp=1,dp=1"], "unknown model 'gpt-42'; known models: gpt-tiny"),
    (["synth", "gpt-tiny", "{out}", "--layout", "tp=1,pq=1"], "unknown layout key 'pq'"),
    (["reshard", "{ckpt}", "{out}", "--to", "tp=2,pp=1,dp=1,stages=1+1"], "pp=1"),
    (["reshard", "{ckpt}", "{ckpt}", "--to", "tp=1,pp=1,dp=1"], "already exists"),
    (["plan", "--to", "tp=1,pp=1,dp=1"], "give either a checkpoint or --model"),
    (["inspect", "{missing}"], "does not exist"),
])
def test_bad_input_gets_one_clear_line(capsys, tmp_path, tiny, args, fragment):
    before = tree_digest(tiny)
    args = [a.format(out=tmp_path / "out", ckpt=tiny, missing=tmp_path / "nope") for a in args]
    r = run(capsys, *args)
    assert r.code != 0
    assert fragment in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1, r.err
    assert "Traceback" not in r.err
    assert not (tmp_path / "out").exists()
    assert tree_digest(tiny) == before


def _damaged(tmp_path, tiny, how):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(tiny, copy)
    victim = copy / "rank-00003.safetensors"
    if how == "missing":
        victim.unlink()
    elif how == "truncated":
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
    elif how == "no-manifest":
        (copy / "manifest.json").unlink()
    return copy


@pytest.mark.parametrize("how, fragment", [
    ("missing", "rank-00003.safetensors"),
    ("truncated", "rank-00003.safetensors"),
    ("no-manifest", "manifest.json"),
])
@pytest.mark.parametrize("command", ["reshard", "inspect", "compare"])
def test_damaged_checkpoints_fail_loudly_and_stay_untouched(capsys, tmp_path, tiny, how, fragment, command):
    bad = _damaged(tmp_path, tiny, how)
    before = tree_digest(bad)
    args = {"reshard": ["reshard", bad, tmp_path / "out", "--to", "tp=1,pp=1,dp=1"],
            "inspect": ["inspect", bad, "--verify"],
            "compare": ["compare", tiny, bad]}[command]
    r = run(capsys, *args)
    assert r.code == 1, r.err
    assert fragment in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert tree_digest(bad) == before
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())


def test_reshard_refuses_a_corrupted_source(capsys, tmp_path, tiny):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    victim = copy / "rank-00001.safetensors"  # rank 1 stores data (rank 2 is a replica of rank 0)
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = run(capsys, "reshard", copy, tmp_path / "out", "--to", "tp=1,pp=1,dp=1")
    assert r.code == 1 and "checksum" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "out").exists()  # checked alongside the copy: nothing committed, nothing left
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())
    r = run(capsys, "reshard", copy, tmp_path / "out", "--to", "tp=1,pp=1,dp=1", "--no-verify")
    assert r.code == 0 and (tmp_path / "out").exists(), r.err  # the check, not the copy, refused it


def test_errors_from_the_installed_command_have_no_traceback(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "scalai")
    proc = subprocess.run([exe, "synth", "gpt-tiny", str(tmp_path / "x"), "--layout", "tp=5,pp=1,dp=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("scalai: error: ") and "Traceback" not in proc.stderr


def test_demo_reshard_runs(capsys, tmp_path):
    r = run(capsys, "demo-reshard", "--out", tmp_path / "demo")
    assert r.code == 0, r.err
    assert r.out.count("equal:") == 2 and "bit for bit" in r.out


def test_a_bug_surfacing_as_a_bare_key_error_says_so(capsys, tmp_path, tiny, monkeypatch):
    """A KeyError that is not one of scalai's sentences (a bare key, as a dict lookup
    raises it) is reported as an internal error with how to get the traceback, not as
    ``scalai: error: 2``; scalai's own KeyErrors keep their text."""
    import scalai.reshard

    def broken(*args, **kwargs):
        raise KeyError(2)

    monkeypatch.setattr(scalai.reshard.Reshard, "__init__", broken)
    r = run(capsys, "reshard", tiny, tmp_path / "out", "--to", "tp=1,pp=1,dp=1")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "internal error (KeyError: 2)" in r.err and "SCALAI_DEBUG=1" in r.err

    def refused(*args, **kwargs):
        raise KeyError("tensor 'x' is not part of this job's state")

    monkeypatch.setattr(scalai.reshard.Reshard, "__init__", refused)
    r = run(capsys, "reshard", tiny, tmp_path / "out", "--to", "tp=1,pp=1,dp=1")
    assert r.code == 2 and r.err == "scalai: error: tensor 'x' is not part of this job's state\n", r.err
