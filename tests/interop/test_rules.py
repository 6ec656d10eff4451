"""Rules files and the Hugging Face families: names, fused order, configs (pure, in process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_helpers  # noqa: E402
from scalai.interop.hf_models import hf_config, hf_rules, shape_from_specs  # noqa: E402
from scalai.interop.mapping import Foreign, resolve  # noqa: E402
from scalai.interop.rules import Rules, load_rules  # noqa: E402
from scalai.config import ParallelConfig  # noqa: E402
from scalai.layout.ptc import PTC  # noqa: E402
from scalai.models import get_model_shape, model_specs  # noqa: E402
from scalai.regions import Region  # noqa: E402

pytest.importorskip("transformers")


def _table(model) -> dict[str, Foreign]:
    return {n: Foreign(tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for n, t in model.state_dict().items()}


def _global(mapped, state) -> torch.Tensor:
    """A scalai global tensor assembled from the foreign tensors through ``Part.window``."""
    spec = mapped.spec
    out = torch.full(spec.shape, float("nan"))
    box = Region.full(spec.shape)
    for part in mapped.parts:
        src, inside = part.window(box)
        t = state[part.key][src.to_slices()]
        out[inside.to_slices()] = t.T if part.transpose else t
    assert not out.isnan().any()
    return out


@pytest.mark.parametrize("family,model_name", [("llama", "llama-tiny"), ("gpt2", "gpt-tiny")])
def test_hf_models_map_onto_the_specs_of_the_matching_scalai_model(family, model_name):
    model = hf_helpers.llama() if family == "llama" else hf_helpers.gpt2()
    mapping = resolve(hf_rules(model.config.to_dict()), _table(model))
    expected = [s for s in model_specs(get_model_shape(model_name), optimizer=False)]
    got = list(mapping.specs)
    assert [s.name for s in got] == [s.name for s in expected]  # names and model order
    for g, e in zip(got, expected):
        assert (g.shape, g.split, g.residence) == (e.shape, e.split, e.residence), g.name
        assert g.dtype == "float32"
    assert mapping.num_layers == 4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_reference_model_with_mapped_weights_computes_what_transformers_computes(family):
    """The semantic check of the fused order and the transposes: scalai's own reference
    model (Megatron names), filled with the global tensors the rules make, gives the
    logits of the transformers model it came from."""
    from scalai.models.megatron import MegatronGPT

    hf = hf_helpers.llama() if family == "llama" else hf_helpers.gpt2()
    mapping = resolve(hf_rules(hf.config.to_dict()), _table(hf))
    shape = shape_from_specs(mapping.specs, mapping.num_layers)
    ours = MegatronGPT(shape).float()
    state = hf.state_dict()
    ours.load_state_dict({m.spec.name: _global(m, state) for m in mapping.tensors}, strict=True)
    with torch.no_grad():
        got = ours(hf_helpers.TOKENS)
    torch.testing.assert_close(got, hf_helpers.logits(hf), rtol=1e-4, atol=1e-4)


def test_a_wrong_fused_order_changes_the_logits():
    """The check above can fail: k before q gives other logits."""
    from scalai.models.megatron import MegatronGPT

    hf = hf_helpers.llama()
    rules = hf_rules(hf.config.to_dict())
    obj = rules.to_json()
    qkv = next(t for t in obj["tensors"] if t["name"].endswith("linear_qkv.weight"))
    q, k, v = qkv["from"]
    mapping = resolve(Rules.from_json(obj), _table(hf))
    qkv["from"] = [k, q, v]
    with pytest.raises(ValueError, match=r"parts have \[32, 64, 32\] rows.*check the order"):
        resolve(Rules.from_json(obj), _table(hf))
    # swap two query heads' worth of rows: shapes fit, logits differ
    ours = MegatronGPT(shape_from_specs(mapping.specs, mapping.num_layers)).float()
    state = hf.state_dict()
    weights = {m.spec.name: _global(m, state) for m in mapping.tensors}
    w = weights["decoder.layers.0.self_attention.linear_qkv.weight"]
    w[:64] = torch.cat((w[8:16], w[:8], w[16:64]))
    ours.load_state_dict(weights)
    with torch.no_grad():
        assert not torch.allclose(ours(hf_helpers.TOKENS), hf_helpers.logits(hf), atol=1e-3)


def test_hf_config_of_gpt2_small_is_transformers_default_gpt2():
    from transformers import GPT2Config

    ours, default = GPT2Config(**hf_config(get_model_shape("gpt2-small"))), GPT2Config()
    for key in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "n_inner", "activation_function",
                "layer_norm_epsilon", "tie_word_embeddings"):
        assert getattr(ours, key) == getattr(default, key), key


def test_hf_config_of_llama_tiny_builds_a_model_with_llama_tinys_tensors():
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = get_model_shape("llama-tiny")
    config = LlamaConfig(**hf_config(shape))
    assert config.rms_norm_eps == 1e-5 and config.num_key_value_heads == 4
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    mapping = resolve(hf_rules(config.to_dict()), _table(model))
    assert [(s.name, s.shape, s.split) for s in mapping.specs] == \
        [(s.name, s.shape, s.split) for s in model_specs(shape, optimizer=False)]
    assert shape_from_specs(model_specs(shape), shape.num_layers, "llama-tiny", 128) == shape
    gpt = get_model_shape("gpt2-small")
    assert shape_from_specs(model_specs(gpt), gpt.num_layers, "gpt2-small") == gpt


def test_rules_round_trip_through_json_and_a_file(tmp_path):
    hf = hf_helpers.gpt2()
    rules = hf_rules(hf.config.to_dict())
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps(rules.to_json(), indent=1))
    again = load_rules(path)
    assert again == rules
    assert resolve(again, _table(hf)) == resolve(rules, _table(hf))


def test_base_model_layout_checked_against_rules_and_the_ignored_keys():
    hf = hf_helpers.gpt2()
    table = _table(hf)
    table["transformer.h.0.attn.masked_bias"] = Foreign((), "float32")
    table["lm_head.weight"] = table["transformer.wte.weight"]
    mapping = resolve(hf_rules(hf.config.to_dict()), table)
    assert set(mapping.ignored) == {"transformer.h.0.attn.masked_bias", "lm_head.weight"}


def _tiny_rules(**dims) -> dict:
    return {"format": "scalai-rules/1",
            "dims": {"num_heads": 2, "num_kv_heads": 1, "head_dim": 2, **dims},
            "tensors": [
                {"name": "emb", "split": "vocab", "where": "embedding", "from": ["tok.weight"]},
                {"name": "l.{layer}.qkv", "split": "qkv",
                 "from": ["layers.{layer}.wq", "layers.{layer}.wk", "layers.{layer}.wv"]},
                {"split": "row", "from": [{"key": "layers.{layer}.wo", "transpose": True}]},
            ],
            "ignore": ["layers.{layer}.inv_freq"],
            "optimizer": {"exp_avg": "optim.{param}.m", "exp_avg_sq": "optim.{param}.v"}}


def _tiny_table(layers: int = 2, optimizer: bool = True) -> dict[str, Foreign]:
    t = {"tok.weight": Foreign((10, 4), "float32")}
    for i in range(layers):
        t.update({f"layers.{i}.wq": Foreign((4, 4), "float32"), f"layers.{i}.wk": Foreign((2, 4), "float32"),
                  f"layers.{i}.wv": Foreign((2, 4), "float32"), f"layers.{i}.wo": Foreign((6, 4), "float32"),
                  f"layers.{i}.inv_freq": Foreign((2,), "float32")})
    if optimizer:
        for k in [k for k in t if "inv_freq" not in k]:
            t[f"optim.{k}.m"] = t[k]
            t[f"optim.{k}.v"] = t[k]
    return t


def test_a_generic_rules_file_maps_names_fused_parts_transposes_padding_and_optimizer_state():
    rules = Rules.from_json(_tiny_rules(vocab_size=7))
    mapping = resolve(rules, _tiny_table())
    names = [s.name for s in mapping.specs]
    assert names[:4] == ["emb", "l.0.qkv", "layers.0.wo", "l.1.qkv"]
    assert names[5:] == [f"optimizer.{s}.{n}" for s in ("exp_avg", "exp_avg_sq") for n in names[:5]]
    emb = mapping["emb"]
    assert emb.spec.shape == (7, 4) and emb.parts[0].rows == 7 and emb.parts[0].shape == (10, 4)  # padded rows dropped
    wo = mapping["layers.1.wo"]
    assert wo.spec.shape == (4, 6) and wo.parts[0].transpose
    assert [(p.key, p.start, p.rows) for p in mapping["l.1.qkv"].parts] == \
        [("layers.1.wq", 0, 4), ("layers.1.wk", 4, 2), ("layers.1.wv", 6, 2)]
    m = mapping["optimizer.exp_avg.l.1.qkv"]
    assert m.spec.param == "l.1.qkv" and [p.key for p in m.parts][0] == "optim.layers.1.wq.m"
    assert set(mapping.ignored) == {"layers.0.inv_freq", "layers.1.inv_freq"}
    # parameters only: optimizer keys are then ignored, not errors
    only = resolve(rules, _tiny_table(), states=())
    assert len(only.specs) == 5 and len(only.ignored) == 2 + 2 * 9
    # a layout of it is valid at tp=2 (qkv by key/value head group: 1 group does not split)
    with pytest.raises(ValueError, match="tp=2 does not divide 1"):
        PTC(ParallelConfig(tp=2), mapping.specs, mapping.num_layers)


@pytest.mark.parametrize("edit,table_edit,message", [
    (lambda r: r["tensors"][0].update(split="diagonal"), None, "split 'diagonal' is unknown"),
    (lambda r: r.update(extra=1), None, r"unknown \['extra'\]"),
    (lambda r: r["tensors"][1].update(name="l.qkv", where="all"), None, "must appear in the name and in every key"),
    (lambda r: r["tensors"][0].pop("where"), None, "has no {layer} and no where"),
    (lambda r: r["dims"].update(num_heads=0), None, "dims.num_heads=0 is not a positive integer"),
    (lambda r: r["dims"].pop("head_dim"), None, "needs dims.head_dim"),
    (lambda r: r.update(format="scalai-rules/2"), None, "needs \"format\": \"scalai-rules/1\" .it has"),
    (lambda r: r["tensors"][1].pop("split"), None, r"\(l.\{layer\}.qkv\) has no split; say how tp splits it"),
    (lambda r: r.update(model="gpt-huge"), None, "unknown model 'gpt-huge'"),
    (lambda r: r["tensors"][2].update(**{"from": ["a{x}.{layer}"]}), None, "placeholder other than {layer}"),
    (None, lambda t: t.pop("layers.1.wk"), "has layers.1.wq but not 'layers.1.wk'"),
    (None, lambda t: t.update({"layers.1.extra": Foreign((1,), "float32")}), "no rule uses layers.1.extra"),
    (None, lambda t: t.update({"layers.1.wv": Foreign((2, 4), "bfloat16")}), "parts of l.1.qkv disagree"),
    (None, lambda t: t.pop("optim.layers.1.wo.m"), "exp_avg for emb but not for layers.1.wo"),
    (None, lambda t: t.update({"tok.weight": Foreign((5, 4), "float32")}), "fewer than dims.vocab_size=7"),
    (lambda r: r["dims"].update(num_layers=3), None, "stop short or run over at layer 2"),
])
def test_bad_rules_and_tables_are_refused_with_what_and_how(edit, table_edit, message):
    obj = _tiny_rules(vocab_size=7)
    table = _tiny_table()
    if edit:
        edit(obj)
    if table_edit:
        table_edit(table)
    with pytest.raises(ValueError, match=message):
        resolve(Rules.from_json(obj), table)


def test_load_rules_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_rules(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_rules(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("[]")
    with pytest.raises(ValueError, match="other.json: not a rules file"):
        load_rules(tmp_path / "other.json")


def test_hf_directory_reads_boxes_of_single_and_sharded_saves_and_bare_models(tmp_path):
    import numpy as np

    from scalai.interop.hf_files import HFDirectory

    hf = hf_helpers.llama()
    state = hf.state_dict()
    for shard, sub in ((None, "one"), ("60KB", "many")):
        path = hf_helpers.save(hf, tmp_path / sub, shard)
        with HFDirectory(path) as d:
            assert d.tensors == _table(hf)
            name = "model.layers.1.mlp.up_proj.weight"  # [192, 64]
            for box in (Region((5, 0), (7, 64)), Region((3, 10), (50, 13)), Region((0, 0), (192, 64))):
                out = np.zeros(box.sizes, np.uint32)
                d.read(name, box, out)
                assert np.array_equal(out, state[name][box.to_slices()].numpy().view(np.uint32))
            t = np.zeros((64, 7), np.uint32)  # into a transposed (strided) destination
            d.read(name, Region((5, 0), (7, 64)), t.T)
            assert np.array_equal(t.T, state[name][5:12].numpy().view(np.uint32))
    hf.model.save_pretrained(str(tmp_path / "bare"))  # LlamaModel alone: no "model." prefix
    with HFDirectory(tmp_path / "bare") as d:
        assert "model.layers.0.self_attn.q_proj.weight" in d.tensors


def test_a_named_model_gives_dims_splits_and_residence(tmp_path):
    """torchtitan's Llama names onto llama-tiny: each entry names its scalai tensor and its
    sources, nothing else."""
    shape = get_model_shape("llama-tiny")
    L = "layers.{layer}."
    obj = {"format": "scalai-rules/1", "model": "llama-tiny", "tensors": [
        {"name": "embedding.word_embeddings.weight", "from": ["tok_embeddings.weight"]},
        {"name": "decoder.layers.{layer}.input_layernorm.weight", "from": [L + "attention_norm.weight"]},
        {"name": "decoder.layers.{layer}.self_attention.linear_qkv.weight",
         "from": [L + "attention.wq.weight", L + "attention.wk.weight", L + "attention.wv.weight"]},
        {"name": "decoder.layers.{layer}.self_attention.linear_proj.weight", "from": [L + "attention.wo.weight"]},
        {"name": "decoder.layers.{layer}.pre_mlp_layernorm.weight", "from": [L + "ffn_norm.weight"]},
        {"name": "decoder.layers.{layer}.mlp.linear_fc1.weight",
         "from": [L + "feed_forward.w1.weight", L + "feed_forward.w3.weight"]},
        {"name": "decoder.layers.{layer}.mlp.linear_fc2.weight", "from": [L + "feed_forward.w2.weight"]},
        {"name": "decoder.final_layernorm.weight", "from": ["norm.weight"]},
        {"name": "output_layer.weight", "from": ["output.weight"]}]}
    rules = Rules.from_json(obj)
    assert rules.dims.num_kv_heads == 4 and rules.dims.vocab_size == 1100
    expected = model_specs(shape, optimizer=False)
    table = {}  # the torchtitan tensors, cut from llama-tiny's own shapes
    for rule in rules.tensors:
        for layer in (range(4) if rule.layered else (None,)):
            name = rule.name.replace("{layer}", str(layer))
            spec = next(s for s in expected if s.name == name)
            rows = [spec.shape[0]] if len(rule.sources) == 1 else (
                [64, 32, 32] if "qkv" in name else [192, 192])
            for src, r in zip(rule.sources, rows):
                table[src.key.replace("{layer}", str(layer))] = Foreign((r, *spec.shape[1:]), "bfloat16")
    mapping = resolve(rules, table)
    assert [(s.name, s.shape, s.split, s.residence) for s in mapping.specs] == \
        [(s.name, s.shape, s.split, s.residence) for s in expected]
    assert Rules.from_json(rules.to_json()) == rules


def test_a_named_model_without_tensors_maps_its_own_names():
    rules = Rules.from_json({"format": "scalai-rules/1", "model": "gpt-tiny"})
    expected = model_specs(get_model_shape("gpt-tiny"), optimizer=False)
    table = {s.name: Foreign(s.shape, s.dtype) for s in expected}
    mapping = resolve(rules, table)
    assert [(s.name, s.shape, s.split, s.residence) for s in mapping.specs] == \
        [(s.name, s.shape, s.split, s.residence) for s in expected]
    with pytest.raises(ValueError, match="has no tensors; list them, or name the scalai model"):
        Rules.from_json({"format": "scalai-rules/1"})
