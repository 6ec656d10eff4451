"""A DCP checkpoint saved by torch (FSDP2 over tensor parallelism, _StridedShard chunks)
imported into other scalai layouts, equal to what ``dcp.load`` gives; the command line and
its one-line refusals."""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch

from cli_helpers import run, tree_digest
from dcp_dist import LAYERS, RULES
from dcp_helpers import damaged_copy, dcp_load_whole as _dcp_load, evil_pickle, truncate

from scalai.interop.convert import import_dcp
from scalai.interop.rules import Rules
from scalai.locations import open_source


def _expected(full: dict, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    """What tensor-parallel rank ``tp_rank`` of ``tp`` holds of scalai tensor ``name``, cut
    from the whole tensor as torch's ColwiseParallel (dim 0) / RowwiseParallel (dim 1) cut it."""
    if name.startswith("optimizer."):
        _, state, fqn = name.split(".", 2)
        whole = full[f"optim.state.{fqn}.{state}"]
    else:
        fqn, whole = name, full[f"model.{name}"]
    if "norm" in fqn:
        return whole
    return torch.chunk(whole, tp, dim=1 if ".w2." in fqn else 0)[tp_rank]


# tp=8 cuts every stored chunk of w1 (8 rows) and emb (4 rows) in two along dim 0
@pytest.mark.parametrize("layout", ["tp=2,pp=2,dp=1", "tp=8,pp=1,dp=1"])
def test_fsdp_tp_checkpoint_imports_equal_to_dcp_load(fsdp_tp_dcp, tmp_path, layout):
    path, placements = fsdp_tp_dcp
    assert "_StridedShard" in placements["layers.0.w1.weight"]  # FSDP2 over TP on the same dim
    before = tree_digest(path)
    conv = import_dcp(path, str(tmp_path / "out"), layout, rules=Rules.from_json(RULES, "rules"), sync=False)
    assert tree_digest(path) == before
    full = _dcp_load(path)
    params = [k for k in full if k.startswith("model.")]
    states = [k for k in full if k.startswith("optim.state.") and not k.endswith(".step")]
    assert conv.tensors == len(params) + len(states) == 3 * (3 * LAYERS + 3)
    checked = 0
    with open_source(tmp_path / "out") as ckpt:
        cfg = ckpt.ptc.config
        assert str(cfg) == layout
        assert ckpt.state["step"] == 2  # the job took two Adam steps
        for rank in cfg.ranks():
            for name, _ in ckpt.ptc.rank_shards(rank):
                got = torch.from_numpy(ckpt.read_window(rank, name).view(np.float32))
                want = _expected(full, name, cfg.tp, cfg.coords(rank).tp)
                assert torch.equal(got, want), (rank, name)
                checked += 1
    # every tensor on every stage: each (tensor, tp rank) once per pipeline stage that holds it
    assert checked == conv.local_tensors


def test_import_dcp_from_the_command_line(fsdp_tp_dcp, tmp_path, capsys):
    path, _ = fsdp_tp_dcp
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(RULES))
    r = run(capsys, "import", "dcp", path, tmp_path / "out", "--layout", "tp=2,pp=2,dp=1", "--rules", rules)
    assert r.code == 0, r.err
    assert re.match(r"imported fsdp_tp: wrote .*out \(tp=2,pp=2,dp=1\): 27 tensors", r.out), r.out
    r = run(capsys, "inspect", tmp_path / "out")
    assert r.code == 0 and "tp=2" in r.out, r.err


def _bad(kind: str, src: str, tmp_path):
    bad = damaged_copy(src, tmp_path / kind)
    if kind == "corrupt":
        truncate(bad / ".metadata", os.path.getsize(bad / ".metadata") // 3)
    elif kind == "missing":
        (bad / "__1_0.distcp").unlink()
    elif kind == "evil":
        (bad / ".metadata").write_bytes(evil_pickle(tmp_path / "ran"))
    elif kind == "short":
        truncate(bad / "__2_0.distcp", 1000)
    return bad


@pytest.mark.parametrize("kind, args, message", [
    ("corrupt", ["--rules", "R"], r"\.metadata is truncated or corrupt"),
    ("missing", ["--rules", "R"], r"__1_0\.distcp is missing"),
    ("short", ["--rules", "R"], r"__2_0\.distcp has 1000 bytes .* truncated"),
    ("evil", ["--rules", "R"], r"\.metadata refers to os\.system.*refusing to load it"),
    ("good", [], r"give --model M .* or --rules FILE"),
    ("good", ["--model", "gpt-tiny"], r"the checkpoint has no 'embedding\.word_embeddings\.weight'"),
    ("good", ["--rules", "R", "--layout", "tp=3,pp=1,dp=1"], r"tp=3"),
])
def test_bad_dcp_imports_get_one_line_and_leave_nothing(fsdp_tp_dcp, tmp_path, capsys, kind, args, message):
    src = fsdp_tp_dcp[0] if kind == "good" else _bad(kind, fsdp_tp_dcp[0], tmp_path)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(RULES))
    args = [str(rules) if a == "R" else a for a in args]
    if "--layout" not in args:
        args += ["--layout", "tp=2,pp=1,dp=1"]
    before = tree_digest(src)
    r = run(capsys, "import", "dcp", src, tmp_path / "out", *args)
    assert r.code != 0 and re.search(message, r.err), r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ran").exists()
    assert tree_digest(src) == before


def test_other_commands_given_a_dcp_directory_say_how_to_bring_it_in(fsdp_tp_dcp, tmp_path, capsys):
    r = run(capsys, "reshard", fsdp_tp_dcp[0], tmp_path / "out", "--to", "tp=2,pp=1,dp=1")  # no --rules
    assert r.code != 0 and "give --model M" in r.err and "--rules FILE" in r.err, r.err
    r = run(capsys, "compare", fsdp_tp_dcp[0], fsdp_tp_dcp[0])
    assert r.code != 0 and "is a PyTorch DCP checkpoint, not a scalai checkpoint" in r.err \
        and "scalai import dcp" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_transposed_tensor_read_in_thin_windows_equals_its_cut(tmp_path):
    """A stored [600, 1024] tensor taken transposed and cut in 8 (GPT-2's Conv1D under
    tensor parallelism): each window is a few columns of every stored row, read through
    the chunk held whole once per worker."""
    import torch.distributed.checkpoint as dcp

    w = torch.randn(600, 1024, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": {"w": w}}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    rules = Rules.from_json({"format": "scalai-rules/1", "tensors": [
        {"name": "w", "split": "column", "where": "all", "from": [{"key": "w", "transpose": True}]}]}, "rules")
    import_dcp(str(tmp_path / "dcp"), str(tmp_path / "out"), "tp=8,pp=1,dp=1", rules=rules, sync=False)
    with open_source(tmp_path / "out") as ckpt:
        for rank in range(8):
            got = torch.from_numpy(ckpt.read_window(rank, "w").view(np.float32))
            assert torch.equal(got, torch.chunk(w.T, 8, dim=0)[rank]), rank
