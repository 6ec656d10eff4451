"""A DCP checkpoint read in place, without an import: ``scalai reshard DCP_DIR`` into a layout
with pipeline stages, ``scalai inspect DCP_DIR``, and ``scalai.training.load`` of it into live
jobs of other layouts; each equal to what torch's own ``dcp.load`` gives. Bad input: one line."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from _dist import run_ranks
from cli_helpers import run, tree_digest
from dcp_dist import LAYERS, RULES
from dcp_helpers import damaged_copy, dcp_load_whole, save_weights_only

from scalai.locations import open_source

PARAMS = 3 * LAYERS + 3  # each layer's norm, w1, w2; the embedding, final norm and head


def _cut(full: dict, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    """Tensor-parallel rank ``tp_rank``'s part of scalai tensor ``name``, cut from the whole
    tensor ``dcp.load`` gave as torch's ColwiseParallel (dim 0) / RowwiseParallel (dim 1) cut."""
    if name.startswith("optimizer."):
        _, state, fqn = name.split(".", 2)
        whole = full[f"optim.state.{fqn}.{state}"]
    else:
        fqn, whole = name, full[f"model.{name}"]
    return whole if "norm" in fqn else torch.chunk(whole, tp, dim=1 if ".w2." in fqn else 0)[tp_rank]


def test_reshard_of_a_dcp_directory_into_pipeline_stages_equals_dcp_load(fsdp_tp_dcp, tmp_path, capsys):
    path, _ = fsdp_tp_dcp
    rules = _rules_file(tmp_path)
    before = tree_digest(path)
    r = run(capsys, "reshard", path, tmp_path / "out", "--to", "tp=2,pp=2,dp=1", "--rules", rules)
    assert r.code == 0 and re.match(r"dcp -> tp=2,pp=2,dp=1: wrote .*out: 27 tensors", r.out), r.out + r.err
    assert tree_digest(path) == before
    full = dcp_load_whole(path)
    checked, stages = 0, set()
    with open_source(tmp_path / "out") as ckpt:
        assert ckpt.state["step"] == 2 and ckpt.state["optimizer"] == {"step": 2}
        cfg = ckpt.ptc.config
        for rank in cfg.ranks():
            for name, _ in ckpt.ptc.rank_shards(rank):
                got = torch.from_numpy(ckpt.read_window(rank, name).view(np.float32))
                assert torch.equal(got, _cut(full, name, cfg.tp, cfg.coords(rank).tp)), (rank, name)
                checked += 1
                stages.add((name, cfg.coords(rank).pp))
    # every (tensor, tp rank) of both stages: the layers split between them, the first stage
    # holds the embedding, the last the final norm and head
    assert len({n for n, _ in stages}) == 3 * PARAMS and checked == 2 * len(stages)
    assert {s for n, s in stages if "layers.0." in n} == {0} and {s for n, s in stages if "out." in n} == {1}


def test_inspect_shows_a_dcp_checkpoint_and_what_it_maps_to(fsdp_tp_dcp, tmp_path, capsys):
    path, _ = fsdp_tp_dcp
    rules = _rules_file(tmp_path)
    full = dcp_load_whole(path)
    r = run(capsys, "inspect", path, "--rules", rules, "--json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["format"] == "pytorch-dcp" and info["step"] == 2 and info["laid_out"] and info["num_layers"] == LAYERS
    assert info["tensors"] == len(full) and info["bytes"] == sum(v.numel() * v.element_size() for v in full.values())
    by_key = {t["key"]: t for t in info["tensor_list"]}
    assert by_key["model.layers.1.w2.weight"]["maps_to"] == "layers.1.w2.weight"
    assert by_key["optim.state.out.weight.exp_avg"]["maps_to"] == "optimizer.exp_avg.out.weight"
    assert by_key["optim.state.out.weight.step"]["role"] == "step"
    # FSDP2 (2) over TP (2): four chunks of a matrix; a norm TP leaves whole, FSDP2 cut in two
    assert by_key["model.layers.0.w1.weight"]["chunks"] == 4 and by_key["model.norm.weight"]["chunks"] == 2
    r = run(capsys, "inspect", path)
    assert r.code == 0 and "PyTorch DCP" in r.out and "give --model M or --rules FILE" in r.out, r.out + r.err


@pytest.mark.slow  # a 2-process job, four models (about 6 s quiet)
def test_training_load_of_a_dcp_directory_equals_dcp_load_in_two_other_layouts(fsdp_tp_dcp, tmp_path):
    """Saved under FSDP2 (dp=2) over tensor parallelism (tp=2); loaded into tp=2 alone and
    FSDP2 dp=2 alone, every local shard (parameters, Adam moments, Adam's step) equal to
    what dcp.load gives in the same layout. A DCP checkpoint without optimizer state is
    refused for a job with Adam, and loads with weights_only, leaving the moments alone."""
    path, _ = fsdp_tp_dcp
    weights = tmp_path / "weights"
    save_weights_only(dcp_load_whole(path), weights)
    before = tree_digest(path)
    results = run_ranks(Path(__file__).parent / "dcp_dist.py", "load_live", 2,
                        kwargs={"path": path, "weights": str(weights)})
    assert tree_digest(path) == before
    for rank, result in enumerate(results):
        assert sorted(result) == ["tp=1,pp=1,dp=2", "tp=2,pp=1,dp=1"]
        for layout, e in result.items():
            where = (rank, layout)
            # each parameter: its shard, two Adam moments and Adam's step
            assert e["checked"] == 4 * PARAMS and e["differ"] == [], where
            assert e["changed"] == 3 * PARAMS, where  # the load replaced every fresh value
            assert e["step"] == 2 and e["bytes"] > 0, where
            assert e["restored"][:4] == ["parameters", "optimizer moments", "step", "optimizer.step"], where
            assert e["not_restored"] == ["optimizer.param_groups", "rng"], where
            assert e["refused"] and "holds no optimizer.exp_avg." in e["refused"] and "weights_only=True" in e["refused"], where
            assert e["weights_differ"] == [] and e["optimizer_kept"] and e["weights_restored"] == ["parameters"], where


def _bad(kind: str, src: str, tmp_path) -> Path:
    if kind == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    bad = damaged_copy(src, tmp_path / kind)
    if kind == "missing":
        (bad / "__3_0.distcp").unlink()
    return bad


@pytest.mark.parametrize("command", ["reshard", "inspect"])
@pytest.mark.parametrize("kind, rules, message", [
    ("missing", RULES, r"__3_0\.distcp is missing"),
    ("good", {"format": "scalai-rules/1", "tensors": [
        {"name": "emb.weight", "split": "column", "where": "first", "from": ["tok_embeddings.weight"]}]},
     r"the checkpoint has no 'tok_embeddings\.weight' \(rule for emb\.weight\)"),
    ("empty", RULES, r"empty is empty: it is not a checkpoint"),
])
def test_bad_dcp_sources_get_one_line_and_leave_nothing(fsdp_tp_dcp, tmp_path, capsys, command, kind, rules,
                                                        message):
    src = fsdp_tp_dcp[0] if kind == "good" else _bad(kind, fsdp_tp_dcp[0], tmp_path)
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    before = tree_digest(src)
    args = ["reshard", src, tmp_path / "out", "--to", "tp=2,pp=2,dp=1"] if command == "reshard" else ["inspect", src]
    # an empty directory is no DCP checkpoint: the rules are refused before anything is read
    r = run(capsys, *args, *(["--rules", path] if kind != "empty" else []))
    assert r.code != 0 and re.search(message, r.err), r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]
    assert tree_digest(src) == before


def test_a_corrupted_chunk_is_caught_by_its_archive_crc(fsdp_tp_dcp, tmp_path, capsys):
    from scalai.interop.dcp import open_dcp

    bad = damaged_copy(fsdp_tp_dcp[0], tmp_path / "bad")
    with open_dcp(bad) as source:  # where the elements of w2's first chunk start
        slot = source.layout.slots[(0, "layers.1.w2.weight")]
        rec = source._record(slot)
    with open(bad / slot.chunk.blob.file, "r+b") as f:
        f.seek(rec.start + 5)
        byte = f.read(1)
        f.seek(rec.start + 5)
        f.write(bytes([byte[0] ^ 0x10]))
    r = run(capsys, "inspect", fsdp_tp_dcp[0], "--verify")
    assert r.code == 0 and re.search(r"verified +\d+ chunks match", r.out), r.out + r.err
    r = run(capsys, "inspect", bad, "--verify")
    assert r.code != 0 and "checksum mismatch in" in r.err and "layers.1.w2.weight" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1
    r = run(capsys, "reshard", bad, tmp_path / "out", "--to", "tp=1,pp=2,dp=1", "--rules", _rules_file(tmp_path))
    assert r.code != 0 and "checksum mismatch in" in r.err and not (tmp_path / "out").exists(), r.err


def _rules_file(tmp_path) -> Path:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(RULES))
    return path


def test_model_and_rules_are_refused_for_a_scalai_checkpoint(tmp_path, capsys):
    r = run(capsys, "synth", "gpt-tiny", tmp_path / "c", "--layout", "tp=1,pp=1,dp=1")
    assert r.code == 0, r.err
    r = run(capsys, "reshard", tmp_path / "c", tmp_path / "out", "--to", "tp=2,pp=1,dp=1", "--model", "gpt-tiny")
    assert r.code != 0 and "is not one (a scalai checkpoint knows its own layout)" in r.err, r.err
    assert not (tmp_path / "out").exists()
