"""Hugging Face model families: rules from a ``config.json``, configs for scalai's models.

Two families are built in, both decoder-only transformers that scalai lays out with
Megatron-core names (see :mod:`scalai.models.megatron`):

- ``llama`` (``LlamaForCausalLM``: RMSNorm, rotary positions, grouped-query attention,
  SwiGLU): ``q_proj``/``k_proj``/``v_proj`` become the fused ``linear_qkv`` (``[Q; K; V]``,
  which the layout cuts by key/value head group, Megatron's order), ``gate_proj``/
  ``up_proj`` the fused ``linear_fc1`` (``[gate; up]``); optional biases
  (``attention_bias``, ``mlp_bias``) follow their weights.
- ``gpt2`` (``GPT2LMHeadModel``: LayerNorm, learned positions, GELU): its ``Conv1D``
  weights are stored ``[in, out]``, so every linear weight is transposed; ``c_attn`` is
  already the fused ``[Q; K; V]``.

Checkpoints of the bare models (``LlamaModel``, ``GPT2Model``: keys without ``model.`` /
``transformer.``) are read too; exports always write the causal-LM names, which
``from_pretrained`` of either class loads.

:func:`hf_config` gives the ``config.json`` of a scalai model shape (``llama-tiny``,
``gpt2-small``, ...): the Hugging Face counterpart that computes what scalai's reference
model computes (RMSNorm and LayerNorm epsilon 1e-5, rotary base 10000, GELU with the tanh
approximation); :func:`shape_from_specs` recovers the shape from a checkpoint's tensor specs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..layout.spec import TensorSpec
from ..layout.splits import Fused, VocabSplit
from ..models.shapes import ModelShape
from .rules import ModelDims, Rules, Source, TensorRule

__all__ = ["FAMILIES", "family_of", "hf_rules", "base_prefix", "hf_config", "shape_from_specs"]

#: Hugging Face ``model_type`` -> scalai model family.
FAMILIES = {"llama": "llama", "gpt2": "gpt"}

_BASE_PREFIX = {"llama": "model.", "gpt2": "transformer."}

_D = "decoder.layers.{layer}."


def family_of(config: Mapping[str, Any], where: str = "config.json") -> str:
    """The Hugging Face ``model_type`` of ``config`` if scalai has rules for it.

    Raises:
        ValueError: another model type (the message says to pass a rules file).
    """
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{where} has model_type {model_type!r}; scalai's built-in rules cover "
                         f"{', '.join(FAMILIES)}: pass --rules FILE for another model (docs/interop.md)")
    return model_type


def base_prefix(model_type: str) -> str:
    """Key prefix of the base model inside the causal-LM class (``"model."``)."""
    return _BASE_PREFIX[model_type]


def _int(config: Mapping[str, Any], key: str, where: str, default: Any = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key}={value!r} is not a positive integer")
    return value


def hf_rules(config: Mapping[str, Any], where: str = "config.json") -> Rules:
    """The rules that map a Hugging Face checkpoint of ``config`` onto scalai's tensors.

    Raises:
        ValueError: unknown model type, or sizes missing or inconsistent in ``config``.
    """
    model_type = family_of(config, where)
    if model_type == "llama":
        heads = _int(config, "num_attention_heads", where)
        hidden = _int(config, "hidden_size", where)
        head_dim = config.get("head_dim") or hidden // heads
        dims = ModelDims(num_layers=_int(config, "num_hidden_layers", where), num_heads=heads,
                         num_kv_heads=_int(config, "num_key_value_heads", where, heads),
                         head_dim=_int({"head_dim": head_dim}, "head_dim", where),
                         ffn_hidden=_int(config, "intermediate_size", where),
                         vocab_size=_int(config, "vocab_size", where),
                         tied_embeddings=bool(config.get("tie_word_embeddings", False)))
        if dims.tied_embeddings:
            return Rules(dims, _LLAMA, ("lm_head.weight",))
        return Rules(dims, _LLAMA + _HEAD)
    hidden = _int(config, "n_embd", where)
    dims = ModelDims(num_layers=_int(config, "n_layer", where), num_heads=_int(config, "n_head", where),
                     num_kv_heads=_int(config, "n_head", where), head_dim=hidden // _int(config, "n_head", where),
                     ffn_hidden=_int(config, "n_inner", where, None) if config.get("n_inner") else 4 * hidden,
                     vocab_size=_int(config, "vocab_size", where),
                     tied_embeddings=bool(config.get("tie_word_embeddings", True)))
    # attn.bias / attn.masked_bias: causal-mask buffers that old GPT-2 checkpoints saved
    ignore = ("transformer.h.{layer}.attn.bias", "transformer.h.{layer}.attn.masked_bias")
    return Rules(dims, _GPT2 if dims.tied_embeddings else _GPT2 + _HEAD,
                 ignore + (("lm_head.weight",) if dims.tied_embeddings else ()))


def _t(name: str, split: str, keys: Sequence[str], where: str = "layer", optional: bool = False,
       transpose: bool = False) -> TensorRule:
    return TensorRule(name, split, tuple(Source(k, transpose) for k in keys), where, optional)


_L = "model.layers.{layer}."
_LLAMA = (
    _t("embedding.word_embeddings.weight", "vocab", ["model.embed_tokens.weight"], "embedding"),
    _t(_D + "input_layernorm.weight", "replicate", [_L + "input_layernorm.weight"]),
    _t(_D + "self_attention.linear_qkv.weight", "qkv", [_L + f"self_attn.{p}_proj.weight" for p in "qkv"]),
    _t(_D + "self_attention.linear_qkv.bias", "qkv", [_L + f"self_attn.{p}_proj.bias" for p in "qkv"],
       optional=True),
    _t(_D + "self_attention.linear_proj.weight", "row", [_L + "self_attn.o_proj.weight"]),
    _t(_D + "self_attention.linear_proj.bias", "replicate", [_L + "self_attn.o_proj.bias"], optional=True),
    _t(_D + "pre_mlp_layernorm.weight", "replicate", [_L + "post_attention_layernorm.weight"]),
    _t(_D + "mlp.linear_fc1.weight", "gate_up", [_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"]),
    _t(_D + "mlp.linear_fc1.bias", "gate_up", [_L + "mlp.gate_proj.bias", _L + "mlp.up_proj.bias"], optional=True),
    _t(_D + "mlp.linear_fc2.weight", "row", [_L + "mlp.down_proj.weight"]),
    _t(_D + "mlp.linear_fc2.bias", "replicate", [_L + "mlp.down_proj.bias"], optional=True),
    _t("decoder.final_layernorm.weight", "replicate", ["model.norm.weight"], "last"),
)
_HEAD = (_t("output_layer.weight", "vocab", ["lm_head.weight"], "last"),)

_H = "transformer.h.{layer}."
_GPT2 = (
    _t("embedding.word_embeddings.weight", "vocab", ["transformer.wte.weight"], "embedding"),
    _t("embedding.position_embeddings.weight", "replicate", ["transformer.wpe.weight"], "first"),
    *(_t(_D + f"input_layernorm.{w}", "replicate", [_H + f"ln_1.{w}"]) for w in ("weight", "bias")),
    _t(_D + "self_attention.linear_qkv.weight", "qkv", [_H + "attn.c_attn.weight"], transpose=True),
    _t(_D + "self_attention.linear_qkv.bias", "qkv", [_H + "attn.c_attn.bias"]),
    _t(_D + "self_attention.linear_proj.weight", "row", [_H + "attn.c_proj.weight"], transpose=True),
    _t(_D + "self_attention.linear_proj.bias", "replicate", [_H + "attn.c_proj.bias"]),
    *(_t(_D + f"pre_mlp_layernorm.{w}", "replicate", [_H + f"ln_2.{w}"]) for w in ("weight", "bias")),
    _t(_D + "mlp.linear_fc1.weight", "column", [_H + "mlp.c_fc.weight"], transpose=True),
    _t(_D + "mlp.linear_fc1.bias", "column", [_H + "mlp.c_fc.bias"]),
    _t(_D + "mlp.linear_fc2.weight", "row", [_H + "mlp.c_proj.weight"], transpose=True),
    _t(_D + "mlp.linear_fc2.bias", "replicate", [_H + "mlp.c_proj.bias"]),
    *(_t(f"decoder.final_layernorm.{w}", "replicate", [f"transformer.ln_f.{w}"], "last") for w in ("weight", "bias")),
)


def hf_config(shape: ModelShape) -> dict[str, Any]:
    """The ``config.json`` of the Hugging Face model that matches scalai's model ``shape``
    (``LlamaConfig`` for the ``llama`` family, ``GPT2Config`` for ``gpt``)."""
    if shape.family == "llama":
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": shape.vocab_size, "hidden_size": shape.hidden,
            "intermediate_size": shape.ffn_hidden, "num_hidden_layers": shape.num_layers,
            "num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim, "max_position_embeddings": shape.max_seq_len,
            "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "rope_theta": 10000.0,
            "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": shape.tied_embeddings, "dtype": shape.dtype,
        }
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": shape.vocab_size, "n_embd": shape.hidden, "n_layer": shape.num_layers,
        "n_head": shape.num_heads, "n_positions": shape.max_seq_len,
        "n_inner": None if shape.ffn_hidden == 4 * shape.hidden else shape.ffn_hidden,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": shape.tied_embeddings, "dtype": shape.dtype,
    }


def shape_from_specs(specs: Sequence[TensorSpec], num_layers: int, name: str = "custom",
                     max_seq_len: int = 2048) -> ModelShape:
    """The :class:`~scalai.models.ModelShape` whose parameters are ``specs`` (Megatron-core
    names, as :func:`~scalai.models.model_specs` makes them); ``max_seq_len`` is used
    where no tensor tells it (the ``llama`` family has no position embedding).

    Raises:
        ValueError: the specs are not those of a scalai GPT or Llama model.
    """
    by_name = {s.name: s for s in specs if not s.is_optimizer_state}
    try:
        emb = by_name["embedding.word_embeddings.weight"]
        qkv = by_name["decoder.layers.0.self_attention.linear_qkv.weight"]
        fc1 = by_name["decoder.layers.0.mlp.linear_fc1.weight"]
    except KeyError as exc:
        raise ValueError(f"the checkpoint has no {exc.args[0]}: it is not a scalai GPT or Llama model "
                         f"(Megatron-core names); export it with --rules FILE") from None
    if not isinstance(qkv.split, Fused) or not qkv.split.groups or not isinstance(emb.split, VocabSplit):
        raise ValueError("the checkpoint's QKV or embedding is not split as scalai's models split them; "
                         "export it with --rules FILE")
    q, kv, _ = qkv.split.segments
    kv_heads = qkv.split.groups
    head_dim = kv // kv_heads
    llama = isinstance(fc1.split, Fused)
    positions = by_name.get("embedding.position_embeddings.weight")
    return ModelShape(
        "llama" if llama else "gpt", num_layers, emb.shape[1], q // head_dim, kv_heads,
        fc1.shape[0] // 2 if llama else fc1.shape[0], emb.shape[0],
        positions.shape[0] if positions is not None else max_seq_len, "output_layer.weight" not in by_name,
        emb.split.multiple, emb.dtype, name)
