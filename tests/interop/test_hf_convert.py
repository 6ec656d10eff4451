"""Hugging Face import and export through the one plan runner, against transformers itself."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_helpers  # noqa: E402

pytest.importorskip("transformers")

from scalai.checkpoint import Checkpoint  # noqa: E402
from scalai.config import ParallelConfig  # noqa: E402
from scalai.interop.convert import export_hf, import_hf  # noqa: E402
from scalai.reshard import reshard_checkpoint  # noqa: E402


def _load(path, family):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    cls = LlamaForCausalLM if family == "llama" else GPT2LMHeadModel
    return cls.from_pretrained(str(path)).eval()


@pytest.mark.parametrize("family,first,second,changes", [
    ("llama", "tp=2,pp=2,dp=2,zero=1", "tp=4,pp=1,dp=1", {}),
    ("gpt2", "tp=2,pp=2,dp=1", "tp=4,pp=2,dp=1,stages=1+3", {}),  # tp=4: a rank of vocabulary padding only
    ("llama", "tp=2,pp=2,dp=1", "tp=1,pp=1,dp=2", {"tie_word_embeddings": True, "attention_bias": True,
                                                   "mlp_bias": True}),
])
def test_import_reshard_export_gives_back_every_weight_and_the_logits_bit_for_bit(tmp_path, family, first, second,
                                                                                  changes):
    hf = hf_helpers.llama(**changes) if family == "llama" else hf_helpers.gpt2(**changes)
    src = hf_helpers.save(hf, tmp_path / "hf", shard="60KB")  # sharded, with an index
    import_hf(src, str(tmp_path / "a"), first)
    reshard_checkpoint(tmp_path / "a", tmp_path / "b", second)
    with Checkpoint.open(tmp_path / "b") as c:
        assert str(c.ptc.config) == second and c.state["imported"]["from"] == "huggingface"
        c.verify()
    conv = export_hf(tmp_path / "b", str(tmp_path / "out"), max_shard_bytes=100_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists() and conv.layout == "hf"
    back = _load(tmp_path / "out", family)
    theirs, ours = hf.state_dict(), back.state_dict()
    assert set(theirs) == set(ours)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    assert torch.equal(hf_helpers.logits(back), hf_helpers.logits(hf))


@pytest.mark.parametrize("model,family", [("llama-tiny", "llama"), ("gpt-tiny", "gpt2")])
def test_a_scalai_model_exports_as_its_transformers_counterpart(tmp_path, model, family):
    import numpy as np

    from scalai.storage.arrays import to_torch
    from scalai.models.synth import write_synthetic_checkpoint

    write_synthetic_checkpoint(model, tmp_path / "c", ParallelConfig.parse("tp=2,pp=2,dp=1"))
    export_hf(tmp_path / "c", str(tmp_path / "out"))
    back = _load(tmp_path / "out", family)
    ours = back.state_dict()
    with Checkpoint.open(tmp_path / "c") as c:
        def glob(name):
            return to_torch(c.read_global(name), "bfloat16")

        assert back.config.num_hidden_layers == 4 and back.dtype == torch.bfloat16
        if family == "llama":
            assert back.config.num_key_value_heads == 4 and back.config.max_position_embeddings == 128
            q, k, v = glob("decoder.layers.2.self_attention.linear_qkv.weight").split([64, 32, 32])
            assert torch.equal(ours["model.layers.2.self_attn.k_proj.weight"], k)
            gate, up = glob("decoder.layers.3.mlp.linear_fc1.weight").chunk(2)
            assert torch.equal(ours["model.layers.3.mlp.up_proj.weight"], up)
            assert torch.equal(ours["lm_head.weight"], glob("output_layer.weight"))
        else:
            qkv = glob("decoder.layers.1.self_attention.linear_qkv.weight")
            assert torch.equal(ours["transformer.h.1.attn.c_attn.weight"], qkv.T)
            assert torch.equal(ours["lm_head.weight"], glob("embedding.word_embeddings.weight"))  # tied
        assert np.isfinite(hf_helpers.logits(back).float().numpy()).all()
