"""scalai import / export as a user runs them: results, and one line for every bad input."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_helpers  # noqa: E402
import megatron_helpers as mh  # noqa: E402
from cli_helpers import run, tree_digest  # noqa: E402

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return hf_helpers.save(hf_helpers.llama(), tmp_path_factory.mktemp("hf") / "llama", shard="80KB")


def test_import_then_export_from_the_command_line(tmp_path, capsys, llama_dir):
    from transformers import LlamaForCausalLM

    before = tree_digest(llama_dir)
    r = run(capsys, "import", "hf", llama_dir, tmp_path / "c", "--layout", "tp=2,pp=2,dp=1", "--json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["layout"] == "tp=2,pp=2,dp=1"
    # scalai's tensors: the model's own less three per layer (q, k, v fused into one; gate, up into one)
    assert info["tensors"] == len(hf_helpers.llama().state_dict()) - 3 * hf_helpers.LLAMA["num_hidden_layers"]
    assert info["local_tensors"] > info["tensors"]  # two tensor-parallel ranks hold most of them
    r = run(capsys, "inspect", tmp_path / "c", "--verify")
    assert r.code == 0, r.err
    r = run(capsys, "export", "hf", tmp_path / "c", tmp_path / "out", "--max-shard-size", "100K")
    assert r.code == 0 and "wrote" in r.out and "Hugging Face" in r.out, r.err
    assert tree_digest(llama_dir) == before  # the input is never modified
    back = LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert torch.equal(hf_helpers.logits(back), hf_helpers.logits(LlamaForCausalLM.from_pretrained(llama_dir)))


def _bad_dirs(tmp, llama_dir):
    import shutil

    none = tmp / "empty"
    none.mkdir()
    other = tmp / "other"
    shutil.copytree(llama_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (other / "config.json").write_text(json.dumps(cfg))
    short = tmp / "short"
    shutil.copytree(llama_dir, short)
    victim = sorted(short.glob("model-0000*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    escape = tmp / "escape"
    shutil.copytree(llama_dir, escape)
    index = json.loads((escape / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
    (escape / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"empty": none, "other": other, "short": short, "escape": escape}


@pytest.mark.parametrize("case,args,message,code", [
    ("empty", ["--layout", "tp=1,pp=1,dp=1"], "config.json does not exist", 2),
    ("other", ["--layout", "tp=1,pp=1,dp=1"], "model_type 'mamba'.*pass --rules FILE", 2),
    ("short", ["--layout", "tp=1,pp=1,dp=1"], "truncated or corrupt", 1),
    ("escape", ["--layout", "tp=1,pp=1,dp=1"], "outside the model directory; refused", 2),
    ("good", ["--layout", "tp=3,pp=1,dp=1"], "tp=3 does not divide", 2),
    ("good", ["--layout", "tp=1,pp=3,dp=1"], "pp=3 does not divide 4 layers", 2),
    ("good", ["--layout", "tp=1,pp=1,dp=1", "--rules", "nowhere.json"], "rules file nowhere.json does not exist", 2),
])
def test_bad_imports_get_one_line_and_leave_nothing(tmp_path, capsys, llama_dir, case, args, message, code):
    import re

    src = llama_dir if case == "good" else _bad_dirs(tmp_path, llama_dir)[case]
    before = tree_digest(src)
    r = run(capsys, "import", "hf", src, tmp_path / "out", *args)
    assert r.code == code and re.search(message, r.err), r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]
    assert tree_digest(src) == before


def test_bad_exports_get_one_line(tmp_path, capsys, llama_dir):
    r = run(capsys, "export", "hf", tmp_path / "none", tmp_path / "out")
    assert r.code != 0 and ("no manifest.json" in r.err or "does not exist" in r.err), r.err
    run(capsys, "import", "hf", llama_dir, tmp_path / "c", "--layout", "tp=1,pp=1,dp=1")
    r = run(capsys, "export", "hf", tmp_path / "c", tmp_path / "out", "--max-shard-size", "lots")
    assert r.code == 2 and "not a positive size" in r.err, r.err
    (tmp_path / "taken").mkdir()
    r = run(capsys, "export", "hf", tmp_path / "c", tmp_path / "taken")
    assert r.code == 2 and "already exists" in r.err, r.err
    r = run(capsys, "export", "hf", tmp_path / "c", tmp_path / "out", "--config", tmp_path / "none.json")
    assert r.code == 2 and "does not exist" in r.err, r.err
    r = run(capsys, "export", "hf", llama_dir, tmp_path / "out")  # the foreign directory itself
    assert r.code == 2 and "is a Hugging Face model directory" in r.err and "scalai import hf" in r.err, r.err
    assert not (tmp_path / "out").exists()


def test_megatron_import_from_the_command_line_and_a_refused_pickle(tmp_path, capsys):
    mh.write_tree(tmp_path / "tree", "llama")
    r = run(capsys, "import", "megatron", tmp_path / "tree", tmp_path / "c", "--layout", "tp=1,pp=2,dp=2,zero=1",
            "--vocab-size", "300", "--json")
    assert r.code == 0, r.err
    r = run(capsys, "inspect", tmp_path / "c", "--json")
    assert json.loads(r.out)["step"] == mh.ITERATION

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    f = tmp_path / "tree" / f"iter_{mh.ITERATION:07d}" / "mp_rank_01_001" / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    obj["rng_state"].append(Payload())
    torch.save(obj, f)
    before = tree_digest(tmp_path / "tree")
    r = run(capsys, "import", "megatron", tmp_path / "tree", tmp_path / "d", "--layout", "tp=1,pp=1,dp=1")
    assert r.code == 1 and "never runs code" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "d").exists()
    assert tree_digest(tmp_path / "tree") == before


def test_an_output_inside_the_input_is_refused(tmp_path, capsys, llama_dir):
    before = tree_digest(llama_dir)
    r = run(capsys, "import", "hf", llama_dir, Path(llama_dir) / "ckpt", "--layout", "tp=1,pp=1,dp=1")
    assert r.code == 2 and "lies inside the input" in r.err, r.err
    assert tree_digest(llama_dir) == before
