"""Split rules, specs from models and rule tables, and PTC layouts of real transformer state."""

import numpy as np
import pytest

from scalai.config import ParallelConfig
from scalai.layout.ptc import PTC, LayoutError
from scalai.layout.rules import GPT_RULES, AttentionDims, Rule, specs_from_named_tensors
from scalai.layout.spec import Residence, TensorSpec, with_optimizer_state
from scalai.layout.splits import Fused, Split, VocabSplit, padded_vocab, split_from_json
from scalai.models import get_model_shape, model_ptc, model_specs
from simulate import gather, global_arrays, scatter


def test_megatron_vocab_padding():
    assert padded_vocab(50257, 128, 1) == 50304
    assert padded_vocab(50257, 128, 2) == 50432
    assert padded_vocab(50257, 128, 8) == 51200


def test_vocab_split_never_maps_padding_rows():
    rule = VocabSplit(0, 128)
    shards = [rule.shard((50257, 4), 2, r) for r in range(2)]
    assert all(s.shape == (25216, 4) for s in shards)
    (p0,), (p1,) = shards[0].pieces, shards[1].pieces
    assert p0.global_region.offsets == (0, 0) and p0.global_region.sizes == (25216, 4)
    assert p1.global_region.offsets == (25216, 0) and p1.global_region.sizes == (50257 - 25216, 4)
    assert p1.local_region.offsets == (0, 0)  # real rows first, padding after
    assert shards[1].covered < 25216 * 4


def test_fused_qkv_with_gqa_gives_non_contiguous_slices_in_megatron_order():
    nq, nkv, hd = 8, 4, 2  # two query heads per group
    rule = Fused(0, (nq * hd, nkv * hd, nkv * hd), nkv, "key/value heads")
    shard = rule.shard(((nq + 2 * nkv) * hd, 3), 2, 1)  # rank 1 owns groups 2 and 3
    got = [(p.global_region.offsets[0], p.global_region.sizes[0], p.local_region.offsets[0])
           for p in shard.pieces]
    q, k, v = 0, nq * hd, nq * hd + nkv * hd
    assert got == [(q + 2 * 4, 4, 0), (k + 2 * 2, 2, 4), (v + 2 * 2, 2, 6),
                   (q + 3 * 4, 4, 8), (k + 3 * 2, 2, 12), (v + 3 * 2, 2, 14)]
    assert shard.shape == (16, 3)
    assert "tp=3 does not divide 4 key/value heads" in rule.check(((nq + 2 * nkv) * hd, 3), 3)


def test_fused_gate_up_splits_each_half():
    rule = Fused(0, (6, 6))
    shard = rule.shard((12, 2), 3, 2)
    assert [(p.global_region.offsets[0], p.local_region.offsets[0]) for p in shard.pieces] == [(4, 0), (10, 2)]


def test_split_rules_round_trip_json():
    for rule in (Split(1), VocabSplit(0, 64), Fused(0, (4, 2, 2), 2, "key/value heads")):
        assert split_from_json(rule.to_json()) == rule


def test_a_parsed_split_rule_is_reused_but_never_for_json_of_other_types():
    """Rules parsed once serve every tensor naming the same JSON (one object), but JSON
    that Python calls equal with other types (true for 1, 1.0 for 1) is parsed, and
    refused, on its own."""
    assert split_from_json({"kind": "split", "dim": 1}) is split_from_json({"kind": "split", "dim": 1})
    for bad in ({"kind": "split", "dim": True}, {"kind": "split", "dim": 1.0},
                {"kind": "fused", "dim": 0, "segments": [4, True], "groups": 2, "unit": "heads"}):
        with pytest.raises(ValueError):
            split_from_json(bad)
    assert split_from_json({"kind": "fused", "dim": 0, "segments": [4, 4], "groups": 2, "unit": "heads"}) \
        == Fused(0, (4, 4), 2, "heads")
    with pytest.raises(ValueError):
        split_from_json({"kind": "split", "dim": [[1]]})  # does not hash: parsed, and refused


@pytest.mark.parametrize("model", ["gpt-tiny", "llama-tiny", "gpt2-small"])
@pytest.mark.parametrize("layout", ["tp=1,pp=1,dp=1", "tp=2,pp=2,dp=2", "tp=4,pp=4,dp=1,zero=1",
                                    "tp=2,pp=1,dp=3,zero=1", "tp=1,pp=2,dp=2,stages=1+3"])
def test_model_layouts_cover_every_tensor_exactly(model, layout):
    shape = get_model_shape(model)
    cfg = ParallelConfig.parse(layout)
    if shape.num_layers != 4 and cfg.layers_per_stage:
        cfg = cfg.with_(layers_per_stage=(5, 7))
    model_ptc(shape, cfg).validate()


def test_layout_reproduces_global_tensors_through_scatter_and_gather():
    ptc = model_ptc("llama-tiny", "tp=2,pp=2,dp=2,zero=1")
    glob = global_arrays(ptc)
    back = gather(ptc, scatter(ptc, glob))
    assert all(np.array_equal(back[k], glob[k]) for k in glob)


def test_specs_from_meta_model_follow_megatron_names_and_rules():
    specs = {s.name: s for s in model_specs(get_model_shape("llama-tiny"))}
    qkv = specs["decoder.layers.2.self_attention.linear_qkv.weight"]
    assert qkv.shape == ((8 + 2 * 4) * 8, 64) and isinstance(qkv.split, Fused) and qkv.split.groups == 4
    assert qkv.residence == Residence.of_layer(2)
    fc1 = specs["decoder.layers.0.mlp.linear_fc1.weight"]
    assert fc1.split == Fused(0, (192, 192), 0, "MLP columns")
    assert specs["output_layer.weight"].residence == Residence("last")
    assert specs["optimizer.exp_avg.output_layer.weight"].dtype == "float32"
    assert specs["optimizer.master.output_layer.weight"].param == "output_layer.weight"
    gpt = {s.name: s for s in model_specs(get_model_shape("gpt-tiny"))}
    assert gpt["embedding.word_embeddings.weight"].residence == Residence("tied")
    assert "output_layer.weight" not in gpt


def test_tied_embedding_is_held_by_first_and_last_stage():
    ptc = model_ptc("gpt-tiny", "tp=2,pp=4,dp=1")
    ranks = sorted(r for h in ptc.holdings("embedding.word_embeddings.weight") for r in h.ranks)
    assert ranks == [0, 1, 6, 7]


def _megatron_rank_params(shape, config, rank) -> list[tuple[str, tuple]]:
    """What Megatron-LM gives a rank: every parameter of its stage, each split locally
    (vocabulary rows padded to ``vocab_multiple * tp`` and cut in ``tp`` equal parts),
    computed here from the model's sizes alone."""
    c = config.coords(rank)
    per_stage = shape.num_layers // config.pp
    layers = range(c.pp * per_stage, (c.pp + 1) * per_stage)
    first, last = c.pp == 0, c.pp == config.pp - 1
    rows = -(-shape.vocab_size // (shape.vocab_multiple * config.tp)) * shape.vocab_multiple
    out = []
    if first or (last and shape.tied_embeddings):
        out.append(("embedding.word_embeddings.weight", (rows, shape.hidden)))
    out += [(s.name, None) for s in model_specs(shape, optimizer=False)
            if s.residence.kind == "layer" and s.residence.layer in layers]
    if first and shape.family == "gpt":
        out.append(("embedding.position_embeddings.weight", None))
    if last:
        out += [(s.name, None) for s in model_specs(shape, optimizer=False)
                if s.name.startswith("decoder.final_layernorm")]
        if not shape.tied_embeddings:
            out.append(("output_layer.weight", (rows, shape.hidden)))
    return out


@pytest.mark.parametrize("model,layout,padded_rank", [
    ("gpt-tiny", "tp=4,pp=2,dp=1", 3),       # 1100 rows in 4 x 384: rank 3 is all padding
    ("llama-tiny", "tp=4,pp=1,dp=2", 3),
    ("gpt3-175b", "tp=32,pp=2,dp=1", 31),    # 50257 rows in 32 x 1664: rank 31 is all padding
])
def test_every_tensor_parallel_rank_holds_its_vocabulary_shard_even_when_all_padding(model, layout, padded_rank):
    shape = get_model_shape(model)
    ptc = model_ptc(model, layout, optimizer=False)
    cfg = ptc.config
    for rank in range(cfg.world_size):
        got = dict((n, s) for n, s in ptc.rank_shards(rank))
        want = _megatron_rank_params(shape, cfg, rank)
        assert sorted(got) == sorted(n for n, _ in want)  # per-rank tensor lists equal Megatron's
        for name, local in want:
            if local is not None:
                assert got[name].shape == local
    emb = dict(ptc.rank_shards(padded_rank))["embedding.word_embeddings.weight"]
    assert emb.pieces == () and emb.covered == 0  # zeros only: nothing of the global tensor
    ptc.validate()


def test_zero1_parts_of_padding_rows_are_held_too():
    # tp=4, dp=2: stage 0's tp rank 3 has 384 padding rows (24576 elements) first in its buffer
    ptc = model_ptc("gpt-tiny", "tp=4,pp=2,dp=2,zero=1")
    held = [dict(ptc.rank_shards(ptc.config.rank(3, d, 0))).get("optimizer.exp_avg.embedding.word_embeddings.weight")
            for d in range(2)]
    assert held[0] is not None and held[0].pieces == () and held[0].shape == (384 * 64,)
    old = PTC(ptc.config, ptc.specs, ptc.num_layers, padding_shards=False)  # formats 1 and 2
    assert "optimizer.exp_avg.embedding.word_embeddings.weight" not in \
        dict(old.rank_shards(ptc.config.rank(3, 0, 0)))


def test_zero1_splits_flat_buffer_in_dp_contiguous_parts():
    ptc = model_ptc("gpt-tiny", "tp=1,pp=1,dp=3,zero=1")
    # every optimizer tensor's local shards on dp ranks are 1-d and together exactly cover it
    sizes = {}
    for r in range(3):
        for name, shard in ptc.rank_shards(r):
            if name.startswith("optimizer.exp_avg."):
                assert len(shard.shape) == 1
                sizes[r] = sizes.get(r, 0) + shard.shape[0]
    total = sum(s.numel for s in ptc.specs if s.param is None
                if s.name != "embedding.word_embeddings.weight")
    total += get_model_shape("gpt-tiny").padded_vocab(1) * 64  # padding rows are in the buffer
    assert sum(sizes.values()) == total
    assert max(sizes.values()) - min(sizes.values()) <= 1 or max(sizes.values()) == -(-total // 3)


@pytest.mark.parametrize("layout, fragment", [
    ("tp=3,pp=1,dp=1", r"tp=3 does not divide 4 attention heads of gpt-tiny; use tp in \{1, 2, 4\}"),
    ("tp=1,pp=3,dp=1", "pp=3 does not divide 4 layers"),
    ("tp=1,pp=2,dp=1,stages=1+2", "holds 3 layers but the model has 4"),
])
def test_impossible_layouts_are_explained(layout, fragment):
    with pytest.raises(ValueError, match=fragment):
        model_ptc("gpt-tiny", layout)


def test_ptc_rejects_generic_split_it_cannot_do():
    spec = TensorSpec("w", (6, 4), "float32", Split(0), Residence.of_layer(0))
    with pytest.raises(LayoutError, match=r"w \(shape \[6, 4\]\) cannot be laid out under tp=4,pp=1,dp=1: tp=4 does not divide dim 0 of size 6; use tp in \{1, 2, 3, 6\}"):
        PTC(ParallelConfig(tp=4), [spec], 1)


def test_rule_tables_require_a_rule_for_every_parameter():
    dims = AttentionDims(2, 2, 2, 8)
    with pytest.raises(ValueError, match="no layout rule matches parameter 'mystery.weight'"):
        specs_from_named_tensors([("mystery.weight", (4, 4), "float32")], GPT_RULES, dims)
    custom = GPT_RULES + (Rule(r"mystery\.weight", "column", "last"),)
    (spec,) = specs_from_named_tensors([("mystery.weight", (4, 4), "float32")], custom, dims)
    assert spec.split == Split(0) and spec.residence == Residence("last")


def test_ptc_json_round_trip():
    ptc = model_ptc("llama-tiny", "tp=2,pp=2,dp=2,zero=1")
    again = PTC.from_json(ptc.to_json())
    assert again.specs == ptc.specs and again.config == ptc.config
    explicit = ptc.to_json(explicit=True)
    assert len(explicit["ranks"]) == 8
    assert explicit["ranks"][0][0]["pieces"]


def test_optimizer_state_follows_its_parameter():
    specs = with_optimizer_state([TensorSpec("w", (4, 2), "bfloat16", Split(0), Residence.of_layer(0)),
                                  TensorSpec("b", (4,), "float32")])
    names = [s.name for s in specs]
    assert "optimizer.master.w" in names and "optimizer.master.b" not in names  # fp32 needs no master
    assert all(s.split == Split(0) for s in specs if s.param == "w")
