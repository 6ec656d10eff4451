"""scalai.limits: sizes refused before anything is built, with an error that names the
limit and how to raise it (issue 11, item 4); the CLI's one-line refusals."""

from __future__ import annotations

import json
import resource

import pytest

from cli_helpers import run
from scalai import PTC, ParallelConfig, TensorSpec
from scalai.checkpoint.limits import reserve_descriptors
from scalai.elastic.layouts import rank_layouts
from scalai.limits import LOCAL_TENSORS, RANKS, LimitError
from scalai.models import get_model_shape


def test_a_limit_names_itself_and_its_variable(monkeypatch):
    with pytest.raises(LimitError, match=r"200,000 ranks, more than scalai's limit of 131,072 .*SCALAI_MAX_RANKS"):
        ParallelConfig(tp=2, dp=100_000)
    monkeypatch.setenv("SCALAI_MAX_RANKS", "300000")
    assert ParallelConfig(tp=2, dp=100_000).world_size == 200_000
    monkeypatch.setenv("SCALAI_MAX_RANKS", "many")
    with pytest.raises(ValueError, match="SCALAI_MAX_RANKS='many' is not an integer"):
        RANKS.value


def test_a_tensor_spec_over_a_limit_is_named_in_the_refusal(monkeypatch):
    """Specs format their subject only when a limit is exceeded; the refusal still names
    the tensor (and its shape for too many elements)."""
    monkeypatch.setenv("SCALAI_MAX_DIMS", "2")
    with pytest.raises(LimitError, match=r"tensor deep has 3 dimensions, .*SCALAI_MAX_DIMS"):
        TensorSpec("deep", (1, 2, 3), "float32")
    monkeypatch.setenv("SCALAI_MAX_ELEMENTS", "100")
    with pytest.raises(LimitError, match=r"tensor big \(shape \[10, 11\]\) has 110 elements"):
        TensorSpec("big", (10, 11), "float32")
    assert TensorSpec("small", (10, 10), "float32").numel == 100
    asked = []
    assert RANKS.check(3, lambda: asked.append(1) or "unused") == 3 and not asked


def test_layers_are_bounded_before_a_stage_table_is_built():
    with pytest.raises(LimitError, match="1,000,000,000,000 layers.*SCALAI_MAX_LAYERS"):
        ParallelConfig(pp=4).stage_layers(10**12)
    with pytest.raises(LimitError, match="layers"):
        PTC(ParallelConfig(), [TensorSpec("w", (4,), "float32")], 10**12)
    with pytest.raises(ValueError, match="non-negative"):
        ParallelConfig().stage_layers(-4)
    with pytest.raises(LimitError, match="stages=.*layers"):
        ParallelConfig(pp=2, layers_per_stage=(10**9, 10**9))


def test_tensors_and_pairs_are_bounded(monkeypatch):
    specs = [TensorSpec(f"t{i}", (8,), "float32") for i in range(8)]
    assert len(PTC(ParallelConfig(dp=4), specs, 0).rank_shards(3)) == 8
    monkeypatch.setenv("SCALAI_MAX_LOCAL_TENSORS", "31")  # 8 tensors x 4 ranks = 32 pairs
    with pytest.raises(LimitError, match=r"has 32 \(rank, tensor\) pairs, more than scalai's limit of 31"):
        PTC(ParallelConfig(dp=4), specs, 0)
    assert LOCAL_TENSORS.value == 31
    monkeypatch.setenv("SCALAI_MAX_TENSORS", "7")
    with pytest.raises(LimitError, match="8 tensors.*SCALAI_MAX_TENSORS"):
        PTC(ParallelConfig(), specs, 0)


def test_tensor_shapes_are_bounded():
    with pytest.raises(LimitError, match="17 dimensions"):
        TensorSpec("w", (1,) * 17, "float32")
    with pytest.raises(LimitError, match="elements"):
        TensorSpec("w", (2**30, 2**30), "float32")
    with pytest.raises(ValueError, match="negative"):
        TensorSpec("w", (4, -1), "float32")


def test_layouts_refuses_absurd_device_counts():
    with pytest.raises(LimitError, match="99,999,999,999 ranks"):
        rank_layouts(get_model_shape("gpt-tiny"), 99_999_999_999)


def test_checkpoints_of_more_ranks_than_files_allowed_are_refused_up_front(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 20000))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: None)
    with pytest.raises(LimitError, match="65,536 ranks keeps 131,072 files open.*at most 20,000"):
        reserve_descriptors(65536)
    reserve_descriptors(1000)  # fits


@pytest.mark.parametrize("args,names", [
    (["layouts", "gpt-tiny", "-n", "99999999999"], "SCALAI_MAX_RANKS"),
    (["plan", "--model", "gpt3-175b", "--from", "tp=8,pp=16,dp=100000", "--to", "tp=8,pp=8,dp=16"],
     "SCALAI_MAX_RANKS"),
    (["synth", "gpt-tiny", "{out}", "--layout", "tp=1,pp=1,dp=100000"], "ulimit -Hn"),
    (["synth", "gpt-tiny", "{out}", "--layout", "tp=4,pp=4,dp=4096"], "ulimit -Hn"),
])
def test_cli_refuses_in_one_line(capsys, tmp_path, monkeypatch, args, names):
    # the machine's own hard limit varies (CI runs as root): pin it so the refusal is the same everywhere
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 20000))
    out = tmp_path / "out"
    r = run(capsys, *[a.format(out=out) for a in args])
    assert r.code == 2, r.err
    assert r.err.startswith("scalai: ") and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
    assert names in r.err
    assert not out.exists()


def test_cli_pair_limit_names_its_variable(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALAI_MAX_LOCAL_TENSORS", "100")
    r = run(capsys, "plan", "--model", "gpt-tiny", "--from", "tp=1,pp=1,dp=2", "--to", "tp=2,pp=1,dp=2", "--json")
    assert r.code == 2 and "SCALAI_MAX_LOCAL_TENSORS" in r.err and r.err.count("\n") == 1, r.err
    monkeypatch.delenv("SCALAI_MAX_LOCAL_TENSORS")
    r = run(capsys, "plan", "--model", "gpt-tiny", "--from", "tp=1,pp=1,dp=2", "--to", "tp=2,pp=1,dp=2", "--json")
    assert r.code == 0 and json.loads(r.out)["to"] == "tp=2,pp=1,dp=2"
