"""scalai export dcp: a scalai checkpoint written as a DCP directory that torch's own
``dcp.load`` reads, equal, into a DTensor model of another layout."""

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
from dcp_dist import RULES
from test_dcp_import import _dcp_load

from scalai.interop.convert import export_dcp, import_dcp
from scalai.interop.rules import Rules


@pytest.fixture(scope="module")
def imported(fsdp_tp_dcp, tmp_path_factory) -> str:
    """The FSDP2+TP checkpoint imported at tp=2, pp=2 (Adam state included)."""
    out = str(tmp_path_factory.mktemp("dcp-export") / "ckpt")
    import_dcp(fsdp_tp_dcp[0], out, "tp=2,pp=2,dp=1", rules=Rules.from_json(RULES, "rules"), sync=False)
    return out


@pytest.mark.slow  # a second 4-process job (about 10 s quiet, 20 s under load)
def test_export_is_read_by_dcp_load_into_another_dtensor_layout(fsdp_tp_dcp, imported, tmp_path):
    before = tree_digest(imported)
    conv = export_dcp(imported, str(tmp_path / "dcp"), rules=Rules.from_json(RULES, "rules"), sync=False)
    assert tree_digest(imported) == before and conv.layout == "dcp"
    want = _dcp_load(fsdp_tp_dcp[0])  # what torch saved, as dcp.load gives it whole
    assert _dcp_load(str(tmp_path / "dcp")).keys() == want.keys()
    results = run_ranks(Path(__file__).parent / "dcp_dist.py", "load_tp", 4, kwargs={"path": str(tmp_path / "dcp")})
    got = results[0]["tensors"]
    assert "Shard(dim=0)" in results[0]["placements"]["layers.0.w1.weight"]  # a DTensor job at tp=4
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(torch.tensor(got[key], dtype=value.dtype), value), key
    assert float(want["optim.state.norm.weight.step"]) == 2.0


def test_export_without_rules_imports_back_under_scalai_names(imported, tmp_path):
    export_dcp(imported, str(tmp_path / "dcp"), weights_only=True, sync=False)
    keys = _dcp_load(str(tmp_path / "dcp")).keys()
    assert "model.layers.1.w2.weight" in keys and not [k for k in keys if k.startswith("optim.")]


def test_export_dcp_from_the_command_line(imported, tmp_path, capsys):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(RULES))
    r = run(capsys, "export", "dcp", imported, tmp_path / "out", "--rules", rules)
    assert r.code == 0 and re.match(r"exported ckpt: wrote .*out \(a PyTorch DCP directory\): 27 tensors", r.out), \
        r.out + r.err
    assert sorted(os.listdir(tmp_path / "out"))[0] == ".metadata"
    r = run(capsys, "export", "dcp", imported, tmp_path / "out")
    assert r.code == 2 and "already exists" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    r = run(capsys, "export", "dcp", tmp_path / "out", tmp_path / "again")  # a DCP directory is not scalai's
    assert r.code == 2 and "scalai import dcp" in r.err and not (tmp_path / "again").exists(), r.err


def test_a_scalai_model_exports_and_imports_back_under_its_own_names(tmp_path):
    """gpt-tiny at tp=2,pp=2,dp=2,zero=1 (fused QKV cut by head group, a padded vocabulary,
    ZeRO-1 optimizer parts): dcp.load reads each tensor whole equal to the synthetic values
    of its global positions, and the export imports back (--model) into another layout
    equal to them too."""
    from scalai.config import ParallelConfig
    from scalai.layout.ptc import PTC
    from scalai.locations import open_source
    from scalai.models.synth import synth_region, write_synthetic_checkpoint
    from scalai.regions import Region

    write_synthetic_checkpoint("gpt-tiny", tmp_path / "s", ParallelConfig.parse("tp=2,pp=2,dp=2,zero=1"), seed=3)
    with open_source(tmp_path / "s") as src:
        specs = {s.name: s for s in src.ptc.specs}
    export_dcp(str(tmp_path / "s"), str(tmp_path / "dcp"), sync=False)
    loaded = _dcp_load(str(tmp_path / "dcp"))
    exported = {k.removeprefix("model."): v for k, v in loaded.items() if k.startswith("model.")}
    for key, value in loaded.items():
        if key.startswith("optim.state.") and not key.endswith(".step"):
            param, state = key.removeprefix("optim.state.").rsplit(".", 1)
            exported[f"optimizer.{state}.{param}"] = value
    assert set(exported) == {n for n, s in specs.items() if s.state != "master"}
    assert float(loaded["optim.state.decoder.final_layernorm.weight.step"]) == 1000  # synth's step
    for name, value in exported.items():
        want = synth_region(specs[name], Region.full(specs[name].shape), 3)
        assert value.dtype == getattr(torch, specs[name].dtype), name
        assert value.reshape(-1).view(torch.uint8).numpy().tobytes() == np.ascontiguousarray(want).tobytes(), name
    import_dcp(str(tmp_path / "dcp"), str(tmp_path / "back"), "tp=4,pp=1,dp=1", model="gpt-tiny", sync=False)
    with open_source(tmp_path / "back") as back:
        assert back.state["step"] == 1000 and back.state["model"] == "gpt-tiny"
        layout = PTC(back.ptc.config, back.ptc.specs, back.ptc.num_layers)
        for rank in layout.config.ranks():
            for name, shard in layout.rank_shards(rank):
                got = back.read_window(rank, name)
                for piece in shard.pieces:
                    want = synth_region(specs[name], piece.global_region, 3).view(got.dtype)
                    assert np.array_equal(got[piece.local_region.to_slices()], want), (rank, name)
