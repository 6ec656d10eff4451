"""Legacy Megatron-LM trees: opened as their own layout, read without running code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import megatron_helpers as mh  # noqa: E402
from scalai.errors import CheckpointError  # noqa: E402
from scalai.interop.megatron import find_tree, open_megatron  # noqa: E402
from scalai.interop.unpickle import UnsafePickleError, load_pt  # noqa: E402


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_megatron_tree_opens_as_its_own_layout_with_scalais_local_tensors(tmp_path, family):
    """Every local tensor of every file is the shard scalai's layout gives that rank: the
    global tensors, built from Megatron's semantics alone, come back through scalai's pieces."""
    glob, states = mh.write_tree(tmp_path, family)
    c = mh.config(family)
    m = open_megatron(tmp_path, vocab_size=c["vocab"])
    assert str(m.ptc.config) == "tp=2,pp=2,dp=1" and m.state["step"] == mh.ITERATION
    params = [s for s in m.ptc.specs if not s.is_optimizer_state]
    assert {s.name for s in params} == set(glob)
    assert m.ptc.spec("embedding.word_embeddings.weight").shape == (c["vocab"], c["hidden"])
    seen = set()
    for rank in range(4):
        coords = m.ptc.config.coords(rank)
        local = m.arrays[rank]
        for name, shard in m.ptc.rank_shards(rank):
            spec = m.ptc.spec(name)
            if spec.is_optimizer_state:  # by parameter index, in Megatron's groups
                expected = states[(coords.tp, coords.pp)][spec.param][spec.state]
                assert torch.equal(local[name], expected), (rank, name)
                continue
            for p in shard.pieces:
                got = local[name][p.local_region.to_slices()]
                assert torch.equal(got, glob[name][p.global_region.to_slices()]), (rank, name)
                seen.add((name, p.global_region))
    masters = [s for s in m.ptc.specs if s.state == "master"]
    assert bool(masters) == (c["dtype"] == torch.bfloat16)  # fp32 runs keep no masters
    assert len([s for s in m.ptc.specs if s.state == "exp_avg"]) == len(params)
    assert m.state["optimizer"]["step"] == mh.ITERATION and len(m.state["optimizer"]["param_groups"]) == 2
    assert m.state["imported"]["args"]["num_layers"] == 4


def test_the_padded_vocabulary_is_the_vocabulary_when_no_size_is_given(tmp_path):
    mh.write_tree(tmp_path, "gpt")
    m = open_megatron(tmp_path)
    assert m.ptc.spec("embedding.word_embeddings.weight").shape[0] == 256  # 200 padded to 128 * 2


def test_weights_only_leaves_the_optimizer_out(tmp_path):
    mh.write_tree(tmp_path, "llama")
    m = open_megatron(tmp_path / f"iter_{mh.ITERATION:07d}", vocab_size=300, weights_only=True)
    assert not any(s.is_optimizer_state for s in m.ptc.specs) and "optimizer" not in m.state


def test_a_pickle_that_tries_to_execute_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    mh.write_tree(tmp_path, "llama", tp=1, pp=1)
    f = tmp_path / f"iter_{mh.ITERATION:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    obj["args"].payload = Payload()
    torch.save(obj, f)
    with pytest.raises(UnsafePickleError, match=r"needs (posix|os)\.system to load.*refused, nothing of it was run"):
        open_megatron(tmp_path)
    assert not marker.exists()


def test_plain_data_around_the_tensors_loads(tmp_path):
    mh.write_tree(tmp_path, "gpt", tp=1, pp=1)
    obj = load_pt(tmp_path / f"iter_{mh.ITERATION:07d}" / "mp_rank_00" / "model_optim_rng.pt")
    assert obj["args"].num_layers == 4 and obj["rng_state"][0]["np_rng_state"][0] == "MT19937"


@pytest.mark.parametrize("damage,message", [
    (lambda root, it: (it / "mp_rank_01_001" / "model_optim_rng.pt").unlink(), "has no model_optim_rng.pt"),
    (lambda root, it: os.rename(it / "mp_rank_01_001", it / "other"), "has no mp_rank_01_001 of a tp=2, pp=2"),
    (lambda root, it: (root / "latest_checkpointed_iteration.txt").write_text("7"), "names iteration '7'"),
    (lambda root, it: (it / "mp_rank_00_000" / "model_optim_rng.pt").write_bytes(b"PK\x03\x04junk"),
     "not a readable torch.save file"),
    (lambda root, it: (it / "mp_rank_00_000" / "distrib_optim.pt").write_bytes(b""), "pass --weights-only"),
])
def test_bad_trees_get_one_clear_line(tmp_path, damage, message):
    mh.write_tree(tmp_path, "gpt")
    damage(tmp_path, tmp_path / f"iter_{mh.ITERATION:07d}")
    with pytest.raises((ValueError, CheckpointError), match=message):
        open_megatron(tmp_path)


def test_a_file_whose_optimizer_order_is_not_megatrons_is_refused(tmp_path):
    mh.write_tree(tmp_path, "llama", tp=1, pp=1)
    f = tmp_path / f"iter_{mh.ITERATION:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    groups = obj["optimizer"]["param_groups"]
    groups[0]["params"], groups[1]["params"] = groups[0]["params"][:-1], groups[1]["params"] + groups[0]["params"][-1:]
    torch.save(obj, f)
    with pytest.raises(ValueError, match="do not match the model's"):
        open_megatron(tmp_path)


def test_find_tree_reads_release_and_unstaged_names(tmp_path):
    mh.write_tree(tmp_path, "llama", tp=2, pp=1)
    tree = find_tree(tmp_path)
    assert (tree.tp, tree.pp) == (2, 1) and tree.directory.endswith(f"iter_{mh.ITERATION:07d}")
    with pytest.raises(ValueError, match="not a directory"):
        find_tree(tmp_path / "nothing")


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_megatron_tree_imports_into_any_layout_and_equals_its_source(tmp_path, family):
    from scalai.checkpoint import Checkpoint
    from scalai.compare import compare_checkpoints
    from scalai.interop.convert import import_megatron
    from scalai.storage.arrays import to_torch

    glob, states = mh.write_tree(tmp_path / "tree", family)
    c = mh.config(family)
    import_megatron(tmp_path / "tree", str(tmp_path / "same"), "tp=2,pp=2,dp=1", vocab_size=c["vocab"])
    import_megatron(tmp_path / "tree", str(tmp_path / "other"), "tp=1,pp=1,dp=2,zero=1", vocab_size=c["vocab"])
    with Checkpoint.open(tmp_path / "same") as a, Checkpoint.open(tmp_path / "other") as b:
        a.verify()
        b.verify()
        assert a.state["step"] == b.state["step"] == mh.ITERATION
        dtype = "bfloat16" if c["dtype"] == torch.bfloat16 else "float32"
        for name, expected in glob.items():  # weights: the real rows of every global tensor
            rows = (c["vocab"],) if name in ("embedding.word_embeddings.weight", "output_layer.weight") else ()
            got = to_torch(a.read_global(name), dtype)
            assert torch.equal(got, expected[:rows[0]] if rows else expected), name
        for rank in range(4):  # optimizer state, rank by rank in Megatron's own layout
            coords = a.ptc.config.coords(rank)
            for name, shard in a.ptc.rank_shards(rank):
                spec = a.ptc.spec(name)
                if not spec.is_optimizer_state:
                    continue
                local = to_torch(a.view(a.stored_in(rank, name), name), "float32")
                want = states[(coords.tp, coords.pp)][spec.param][spec.state]
                for p in shard.pieces:  # padding rows stay zero in scalai
                    assert torch.equal(local[p.local_region.to_slices()], want[p.local_region.to_slices()])
        assert compare_checkpoints(a, b) is None  # any layout: the same global state
