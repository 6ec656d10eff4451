"""A legacy Megatron-LM checkpoint tree built by the tests, with Megatron's documented key
layout (``checkpointing.py``, ``language_model`` state dicts), from global tensors defined
per head, so that the expected scalai tensors follow from Megatron's semantics alone:

- ``query_key_value`` of tp rank ``r``: for each of its query groups ``g``, the group's query
  heads, then key head ``g``, then value head ``g`` (``[ng, np/ng + 2, hn]``);
- ``dense_h_to_4h`` with ``--swiglu``: the rank's rows of gate, then of up;
- column-parallel weights split rows, row-parallel ones columns;
- vocabulary rows padded to ``make_vocab_size_divisible_by * tp``, every rank its share
  (the padding rows hold values: Megatron trains them);
- the optimizer: torch's state dict, parameters numbered group after group; biases and
  norms in the group without weight decay; fp32 masters per group.
"""

from __future__ import annotations

import argparse
import os
import random

import numpy as np
import torch

ITERATION = 100


def config(family: str) -> dict:
    if family == "gpt":  # MHA, LayerNorm with biases, GELU, tied embeddings (copy on the last stage)
        return dict(layers=4, hidden=32, heads=4, groups=4, ffn=128, vocab=200, swiglu=False, tied=True,
                    bias=True, norm_bias=True, positions=16, dtype=torch.bfloat16)
    # GQA, RMSNorm, SwiGLU, no biases, untied head; fp32 params (FP32Optimizer: no masters)
    return dict(layers=4, hidden=32, heads=4, groups=2, ffn=48, vocab=300, swiglu=True, tied=False,
                bias=False, norm_bias=False, positions=0, dtype=torch.float32)


def global_model(c: dict, tp: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The global tensors of the model under Megatron-core names (scalai's), [Q; K; V] order,
    every one random; the embedding and head with their padding rows (for ``tp``)."""
    g = torch.Generator().manual_seed(seed)
    h, hd = c["hidden"], c["hidden"] // c["heads"]
    padded = -(-c["vocab"] // (128 * tp)) * 128 * tp
    r = lambda *s: torch.randn(*s, generator=g).to(c["dtype"])  # noqa: E731
    out = {"embedding.word_embeddings.weight": r(padded, h)}
    if c["positions"]:
        out["embedding.position_embeddings.weight"] = r(c["positions"], h)
    fc1 = 2 * c["ffn"] if c["swiglu"] else c["ffn"]
    qkv = (c["heads"] + 2 * c["groups"]) * hd
    for i in range(c["layers"]):
        p = f"decoder.layers.{i}."
        out[p + "input_layernorm.weight"] = r(h)
        if c["norm_bias"]:
            out[p + "input_layernorm.bias"] = r(h)
        out[p + "self_attention.linear_qkv.weight"] = r(qkv, h)
        if c["bias"]:
            out[p + "self_attention.linear_qkv.bias"] = r(qkv)
        out[p + "self_attention.linear_proj.weight"] = r(h, h)
        if c["bias"]:
            out[p + "self_attention.linear_proj.bias"] = r(h)
        out[p + "pre_mlp_layernorm.weight"] = r(h)
        if c["norm_bias"]:
            out[p + "pre_mlp_layernorm.bias"] = r(h)
        out[p + "mlp.linear_fc1.weight"] = r(fc1, h)
        if c["bias"]:
            out[p + "mlp.linear_fc1.bias"] = r(fc1)
        out[p + "mlp.linear_fc2.weight"] = r(h, c["ffn"])
        if c["bias"]:
            out[p + "mlp.linear_fc2.bias"] = r(h)
    out["decoder.final_layernorm.weight"] = r(h)
    if c["norm_bias"]:
        out["decoder.final_layernorm.bias"] = r(h)
    if not c["tied"]:
        out["output_layer.weight"] = r(padded, h)
    return out


def _qkv_local(w: torch.Tensor, c: dict, rank: int, tp: int) -> torch.Tensor:
    hd = c["hidden"] // c["heads"]
    per_group = c["heads"] // c["groups"]
    q, k, v = w.split([c["heads"] * hd, c["groups"] * hd, c["groups"] * hd])
    parts = []
    for grp in range(rank * c["groups"] // tp, (rank + 1) * c["groups"] // tp):
        parts += [q[grp * per_group * hd:(grp + 1) * per_group * hd], k[grp * hd:(grp + 1) * hd],
                  v[grp * hd:(grp + 1) * hd]]
    return torch.cat(parts)


def _local(name: str, w: torch.Tensor, c: dict, rank: int, tp: int) -> torch.Tensor:
    def rows(t):
        n = t.shape[0] // tp
        return t[rank * n:(rank + 1) * n]

    if "linear_qkv" in name:
        return _qkv_local(w, c, rank, tp)
    if "linear_fc1" in name:
        if c["swiglu"]:
            gate, up = w.chunk(2)
            return torch.cat((rows(gate), rows(up)))
        return rows(w)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        n = w.shape[1] // tp
        return w[:, rank * n:(rank + 1) * n]
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return rows(w)
    return w


_LEGACY = {"input_layernorm": "input_norm", "self_attention.linear_qkv": "self_attention.query_key_value",
           "self_attention.linear_proj": "self_attention.dense", "pre_mlp_layernorm": "post_attention_norm",
           "mlp.linear_fc1": "mlp.dense_h_to_4h", "mlp.linear_fc2": "mlp.dense_4h_to_h"}


def _stage_state(glob: dict, c: dict, rank: int, stage: int, tp: int, pp: int) -> tuple[dict, dict]:
    """One file's "model" (legacy nested names, local layer numbers) and, for each of its
    flattened names, the scalai tensor it is a shard of."""
    per = c["layers"] // pp
    names = {"language_model.embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
             "language_model.embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
             "language_model.encoder.final_norm.weight": "decoder.final_layernorm.weight",
             "language_model.encoder.final_norm.bias": "decoder.final_layernorm.bias",
             "language_model.output_layer.weight": "output_layer.weight",
             "word_embeddings_for_head.weight": "embedding.word_embeddings.weight"}
    lm: dict = {}
    if stage == 0:
        emb = {"word_embeddings": {"weight": _local("embedding.word_embeddings.weight",
                                                    glob["embedding.word_embeddings.weight"], c, rank, tp)}}
        if c["positions"]:
            emb["position_embeddings"] = {"weight": glob["embedding.position_embeddings.weight"]}
        lm["embedding"] = emb
    encoder = {}
    for local in range(per):
        i = stage * per + local
        for name, w in glob.items():
            prefix = f"decoder.layers.{i}."
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            module, param = rest.rsplit(".", 1)
            encoder[f"layers.{local}.{_LEGACY[module]}.{param}"] = _local(name, w, c, rank, tp)
            names[f"language_model.encoder.layers.{local}.{_LEGACY[module]}.{param}"] = name
    if stage == pp - 1:
        for name in ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias"):
            if name in glob:
                encoder["final_norm." + name.rsplit(".", 1)[1]] = glob[name]
    lm["encoder"] = encoder
    if stage == pp - 1 and not c["tied"]:
        lm["output_layer"] = {"weight": _local("output_layer.weight", glob["output_layer.weight"], c, rank, tp)}
    model = {"language_model": lm}
    if stage == pp - 1 and c["tied"] and pp > 1:
        model["word_embeddings_for_head"] = {"weight": _local(
            "embedding.word_embeddings.weight", glob["embedding.word_embeddings.weight"], c, rank, tp)}
    return model, names


def _params_in_order(model: dict, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    out = []
    for k, v in model.items():
        if isinstance(v, dict):
            out += _params_in_order(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _optimizer(model: dict, names: dict, c: dict, seed: int, rank: int, style: str) -> tuple[dict, dict]:
    """Torch's optimizer state dict over the file's parameters (Megatron's two groups) and
    the state by (legacy) parameter name, for the test's expectations. Each parameter's
    state depends on its scalai tensor and tp rank only: the two copies of a tied embedding
    hold the same state, as their all-reduced gradients make them hold in Megatron."""
    import zlib

    params = _params_in_order(model)
    decay = [(n, t) for n, t in params if t.ndim > 1]
    no_decay = [(n, t) for n, t in params if t.ndim <= 1]
    # newer Megatron orders groups by the first parameter met and marks them with wd_mult
    order = [decay, no_decay] if params[0][1].ndim > 1 or style == "old" else [no_decay, decay]
    state, groups, masters, by_name, index = {}, [], [], {}, 0
    for members in order:
        wd = members is decay
        group = {"params": [], "lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8,
                 "weight_decay": 0.1 if wd else 0.0}
        if style == "new":
            group["wd_mult"] = 1.0 if wd else 0.0
        group_masters = []
        for name, t in members:
            group["params"].append(index)
            g = torch.Generator().manual_seed(seed + zlib.crc32(f"{names[name]}/{rank}".encode()))
            m, v = torch.randn(t.shape, generator=g), torch.rand(t.shape, generator=g)
            state[index] = {"step": torch.tensor(float(ITERATION)), "exp_avg": m, "exp_avg_sq": v}
            master = torch.randn(t.shape, generator=g)
            group_masters.append(master)
            by_name[name] = {"exp_avg": m, "exp_avg_sq": v, "master": master}
            index += 1
        groups.append(group)
        masters.append(group_masters)
    inner = {"state": state, "param_groups": groups}
    if c["dtype"] == torch.float32:  # FP32Optimizer: torch's state dict itself
        return inner, by_name
    return {"optimizer": inner, "fp32_from_fp16_params": masters, "grad_scaler": {"scale": 1.0}}, by_name


def args(c: dict, tp: int, pp: int) -> argparse.Namespace:
    return argparse.Namespace(
        num_layers=c["layers"], hidden_size=c["hidden"], num_attention_heads=c["heads"],
        group_query_attention=c["groups"] != c["heads"], num_query_groups=c["groups"],
        kv_channels=c["hidden"] // c["heads"], ffn_hidden_size=c["ffn"],
        padded_vocab_size=-(-c["vocab"] // (128 * tp)) * 128 * tp, make_vocab_size_divisible_by=128,
        untie_embeddings_and_output_weights=not c["tied"], swiglu=c["swiglu"],
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, params_dtype=c["dtype"],
        max_position_embeddings=c["positions"] or 4096, seq_length=16, bf16=c["dtype"] == torch.bfloat16)


def write_tree(root, family: str, tp: int = 2, pp: int = 2, seed: int = 0) -> tuple[dict, dict]:
    """Write the tree under ``root``; returns the global tensors and, per (tp rank, stage),
    ``{scalai tensor: {"exp_avg", "exp_avg_sq", "master": local tensor}}``."""
    c = config(family)
    glob = global_model(c, tp, seed)
    states = {}
    it = os.path.join(str(root), f"iter_{ITERATION:07d}")
    for stage in range(pp):
        for rank in range(tp):
            model, names = _stage_state(glob, c, rank, stage, tp, pp)
            opt, by_name = _optimizer(model, names, c, seed, rank, "new" if stage else "old")
            states[(rank, stage)] = {names[n]: v for n, v in by_name.items()}
            d = os.path.join(it, f"mp_rank_{rank:02d}" + (f"_{stage:03d}" if pp > 1 else ""))
            os.makedirs(d)
            torch.save({
                "args": args(c, tp, pp), "checkpoint_version": 3.0, "iteration": ITERATION,
                "model": model, "optimizer": opt,
                "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": ITERATION * 8},
                "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                               "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}],
            }, os.path.join(d, "model_optim_rng.pt"))
    with open(os.path.join(str(root), "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(ITERATION))
    return glob, states
