"""Specs from DTensor placements: MeshSplit against torch's own sharding, pure and on gloo.

Pure tier: torch's placement code (``Shard._split_tensor``, ``_StridedShard._split_tensor``,
the functions ``distribute_tensor`` runs on every rank) applied to an index tensor in one
process is the reference for every rank of meshes that are not running.
Multi-process tier: real DTensors from ``distribute_tensor``, ``parallelize_module`` and
``fully_shard`` (FSDP2) on 2, 3 and 4 gloo ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.distributed.tensor.placement_types import Partial, Replicate as TR, Shard as TS
from torch.distributed.tensor.placement_types import _StridedShard as TSS

from scalai.config import ParallelConfig
from scalai.layout.dtensor import (AxisPlacement, MeshSplit, specs_from_module,
                                   split_from_placements)
from scalai.layout.ptc import PTC, LayoutError
from scalai.layout.spec import Residence, TensorSpec
from scalai.layout.splits import Replicate, split_from_json

from _dist import run_ranks  # workers run with OMP_NUM_THREADS=1 on 127.0.0.1

R = AxisPlacement.replicate
S = AxisPlacement.shard
SS = AxisPlacement.strided
FSDP_TP_COL = MeshSplit((SS("dp", 0, ("tp",)), S("tp", 0)))   # FSDP2 + column-parallel
FSDP_TP_ROW = MeshSplit((S("dp", 0), S("tp", 1)))              # FSDP2 + row-parallel


# -- reference: torch's own split functions, one rank at a time ----------------------------

def torch_placements(rule, tp, dp):
    """Torch placements of ``rule`` at degrees ``tp``, ``dp`` (mesh order as in the rule)."""
    degrees = {"tp": tp, "dp": dp}
    out = []
    for p in rule.placements:
        if p.kind == "replicate":
            out.append(TR())
        elif p.kind == "shard":
            out.append(TS(p.dim))
        else:
            factor = p.factor
            for a in p.split_by:
                factor *= degrees[a]
            out.append(TSS(p.dim, split_factor=factor))
    return out


def torch_local(global_tensor, rule, tp, tp_rank, dp, dp_rank):
    """What distribute_tensor leaves on the rank: placements applied left to right."""
    degrees, coords = {"tp": tp, "dp": dp}, {"tp": tp_rank, "dp": dp_rank}
    local = global_tensor
    for p, tp_p in zip(rule.placements, torch_placements(rule, tp, dp)):
        if p.kind != "replicate":
            local = tp_p._split_tensor(local, degrees[p.axis], with_padding=False)[0][coords[p.axis]]
    return local


def read_through(global_tensor, shard):
    """The rank's local tensor rebuilt from the global one through the shard's pieces."""
    local = torch.full(shard.shape, -1, dtype=global_tensor.dtype)
    for piece in shard.pieces:
        local[piece.local_region.to_slices()] = global_tensor[piece.global_region.to_slices()]
    return local


def assert_matches_torch(rule, shape, tp, dp):
    """Every rank's shard equals torch's local tensor bit for bit; returns pieces per rank."""
    global_tensor = torch.arange(torch.Size(shape).numel(), dtype=torch.int64).reshape(shape)
    counts = []
    for t in range(tp):
        for d in range(dp):
            shard = rule.shard(shape, tp, t, dp, d)
            expected = torch_local(global_tensor, rule, tp, t, dp, d)
            assert shard.shape == tuple(expected.shape), (rule, shape, tp, t, dp, d)
            assert shard.covered == expected.numel(), "pieces must fill the local tensor"
            assert torch.equal(read_through(global_tensor, shard), expected), (rule, shape, t, d)
            counts.append(len(shard.pieces))
    return counts


def assert_tiles(rule, shape, tp, dp):
    """A PTC of one tensor with ``rule`` validates: pieces cover it exactly."""
    spec = TensorSpec("w", shape, "float32", rule, Residence("all"))
    ptc = PTC(ParallelConfig(tp=tp, dp=dp), [spec], num_layers=0)
    ptc.validate()
    return ptc


RULES = [
    FSDP_TP_COL,
    FSDP_TP_ROW,
    MeshSplit((S("dp", 0), S("tp", 0))),
    MeshSplit((S("dp", 1), S("tp", 0))),
    MeshSplit((R("dp"), S("tp", 1))),
    MeshSplit((S("dp", 0), R("tp"))),
    MeshSplit((S("tp", 0), S("dp", 0))),
    MeshSplit((SS("tp", 0, ("dp",)), S("dp", 0))),
    MeshSplit((S("tp", 1),)),
    MeshSplit((S("dp", 0),)),
    MeshSplit((SS("dp", 0, factor=2),)),
    MeshSplit((SS("dp", 0, factor=3), S("tp", 1))),
]
SHAPES = [(8, 6), (7, 5), (5, 3), (3, 2), (1, 4), (2, 1), (0, 3), (11, 6, 2), (9, 10)]
DEGREES = [(1, 1), (2, 1), (1, 2), (2, 2), (3, 2), (2, 3), (4, 2), (1, 5), (5, 1), (4, 4)]


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_shard_equals_torch_and_tiles(rule):
    checked = 0
    for shape in SHAPES:
        for tp, dp in DEGREES:
            assert_matches_torch(rule, shape, tp, dp)
            if rule.check(shape, tp, dp) is None:
                assert_tiles(rule, shape, tp, dp)
                checked += 1
    assert checked >= len(SHAPES) * len(DEGREES) // 2


def test_fsdp_tp_worked_example():
    # 8 rows on mesh ("dp", "tp") = 2 x 2: tp cuts first (rows 0-3 | 4-7), dp cuts each half.
    rows = {(t, d): [(p.global_region.offsets[0], p.global_region.sizes[0])
                     for p in FSDP_TP_COL.shard((8, 3), 2, t, 2, d).pieces]
            for t in range(2) for d in range(2)}
    assert rows == {(0, 0): [(0, 2)], (0, 1): [(2, 2)], (1, 0): [(4, 2)], (1, 1): [(6, 2)]}
    # Same placements, laid out at tp=4, dp=2 on 10 rows: uneven, trailing rank empty.
    shards = [FSDP_TP_COL.shard((10, 3), 4, t, 2, d) for d in range(2) for t in range(4)]
    assert [s.shape[0] for s in shards] == [2, 2, 2, 1, 1, 1, 1, 0]
    assert shards[-1].pieces == () and shards[-1].shape == (0, 3)


def test_strided_view_owns_non_contiguous_slices():
    # _StridedShard(0, split_factor=2) on 8 rows over 2 ranks: rank 0 holds rows 0-1 and 4-5.
    rule = MeshSplit((SS("dp", 0, factor=2),))
    shard = rule.shard((8, 3), 1, 0, 2, 0)
    assert [(p.global_region.offsets[0], p.local_region.offsets[0], p.global_region.sizes[0])
            for p in shard.pieces] == [(0, 0, 2), (4, 2, 2)]
    assert assert_matches_torch(rule, (8, 3), 1, 2) == [2, 2]
    assert_tiles(rule, (8, 3), 1, 2)


def test_uneven_fsdp_tp_torch_and_fsdp_disagree_is_refused():
    # 7 rows, tp=2, dp=3: FSDP2 stores chunk(chunk(rows, tp)[t], dp)[d]; torch reads its
    # _StridedShard label differently, so neither data layout is safe: check() refuses.
    why = FSDP_TP_COL.check((7, 4), 2, 3)
    assert why is not None and "ambiguous" in why and "tp=2, dp=3" in why
    with pytest.raises(LayoutError, match="ambiguous"):
        PTC(ParallelConfig(tp=2, dp=3), [TensorSpec("w", (7, 4), "float32", FSDP_TP_COL)], 0)
    # shard() still answers what torch's DTensor holds.
    assert_matches_torch(FSDP_TP_COL, (7, 4), 2, 3)


def _fsdp_stores(rows, tp, t, dp, d):
    """Rows FSDP2 + TP store on (tp rank t, dp rank d): torch.chunk of a torch.chunk."""
    tp_chunks = list(torch.arange(rows).chunk(tp))
    tp_part = tp_chunks[t] if t < len(tp_chunks) else torch.arange(0)
    dp_chunks = list(tp_part.chunk(dp))
    return (dp_chunks[d] if d < len(dp_chunks) else torch.arange(0)).tolist()


@pytest.mark.parametrize("tp,dp", [(2, 2), (2, 3), (3, 2), (4, 2), (2, 4), (3, 3), (4, 4), (8, 2)])
def test_accepted_strided_layouts_match_fsdp_storage(tp, dp):
    accepted = refused = 0
    for rows in range(0, 40):
        if FSDP_TP_COL.check((rows, 2), tp, dp) is not None:
            refused += 1
            continue
        accepted += 1
        for t in range(tp):
            for d in range(dp):
                shard = FSDP_TP_COL.shard((rows, 2), tp, t, dp, d)
                got = [r for p in shard.pieces for r in range(p.global_region.offsets[0],
                                                               p.global_region.ends[0])]
                assert got == _fsdp_stores(rows, tp, t, dp, d), (rows, tp, t, dp, d)
    assert accepted > 0
    # Over dp=2 the two readings always agree; over dp >= 3 some uneven sizes differ.
    assert (refused > 0) == (dp >= 3), refused


# -- property test --------------------------------------------------------------------------

@st.composite
def mesh_rules(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    axes = draw(st.sampled_from([("dp", "tp"), ("tp", "dp"), ("dp",), ("tp",)]))
    placements = []
    for i, axis in enumerate(axes):
        kind = draw(st.sampled_from(["replicate", "shard", "strided"]))
        dim = draw(st.integers(0, ndim - 1))
        if kind == "replicate":
            placements.append(R(axis))
        elif kind == "shard":
            placements.append(S(axis, dim))
        elif i + 1 < len(axes) and draw(st.booleans()):
            # FSDP2 + TP form: interleaved with the next axis, which shards the same dim.
            placements.append(SS(axis, dim, (axes[i + 1],)))
            placements.append(S(axes[i + 1], dim))
            break
        else:
            placements.append(SS(axis, dim, factor=draw(st.integers(2, 3))))
    return MeshSplit(tuple(placements)), shape


@settings(max_examples=300, deadline=None)
@given(mesh_rules(), st.integers(1, 5), st.integers(1, 5))
def test_property_pieces_equal_torch_and_tile(rule_shape, tp, dp):
    rule, shape = rule_shape
    assert split_from_json(json.loads(json.dumps(rule.to_json()))) == rule
    assert_matches_torch(rule, shape, tp, dp)
    if rule.check(shape, tp, dp) is None:
        ptc = assert_tiles(rule, shape, tp, dp)
        # Every rank appears in exactly one holding (empty shards have none).
        ranks = [r for h in ptc.holdings("w") for r in h.ranks]
        assert len(ranks) == len(set(ranks))


# -- rule basics ----------------------------------------------------------------------------

def test_json_round_trip_and_hash():
    for rule in RULES:
        text = json.dumps(TensorSpec("w", (4, 4), "bfloat16", rule).to_json())
        back = TensorSpec.from_json(json.loads(text)).split
        assert back == rule and hash(back) == hash(rule) and isinstance(back, MeshSplit)
    assert json.loads(json.dumps(FSDP_TP_COL.to_json())) == {
        "kind": "mesh", "placements": [{"axis": "dp", "kind": "strided", "dim": 0, "split_by": ["tp"]},
                                       {"axis": "tp", "kind": "shard", "dim": 0}]}


@pytest.mark.parametrize("build,match", [
    (lambda: MeshSplit(()), "one placement per mesh axis"),
    (lambda: MeshSplit((S("dp", 0), S("dp", 1))), "repeat"),
    (lambda: MeshSplit((SS("dp", 0, ("tp",)),)), "must come later"),
    (lambda: MeshSplit((SS("dp", 0, ("tp",)), S("tp", 1))), "same dim 0"),
    (lambda: MeshSplit((S("tp", 0), SS("dp", 0, ("tp",)))), "must come later"),
    (lambda: AxisPlacement("pp", "shard", 0), "not one of"),
    (lambda: AxisPlacement("dp", "partial", 0), "not one of"),
    (lambda: S("dp", -1), "non-negative"),
    (lambda: SS("dp", 0), "neither"),
    (lambda: SS("dp", 0, ("tp",), factor=2), "both"),
    (lambda: AxisPlacement("dp", "replicate", 0), "takes no dim"),
])
def test_bad_rules_say_what_is_wrong(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_check_and_shard_reject_out_of_range():
    rule = MeshSplit((S("tp", 2),))
    assert "shards dim 2 but the tensor has 2 dims" in rule.check((4, 4), 2, 1)
    with pytest.raises(LayoutError, match="shards dim 2"):
        PTC(ParallelConfig(tp=2), [TensorSpec("w", (4, 4), "float32", rule)], 0)
    with pytest.raises(ValueError, match="tp_rank=2 lies outside tp=2"):
        FSDP_TP_COL.shard((4, 4), 2, 2, 1, 0)


def test_axis_missing_from_mesh_means_replicas():
    tp_only = MeshSplit((S("tp", 1),))
    shards = {tp_only.shard((3, 5), 2, t, 3, d) for t in range(2) for d in range(3)}
    assert len(shards) == 2  # one per tp rank, identical across dp ranks
    fsdp_only = MeshSplit((S("dp", 0),))
    assert fsdp_only.shard((5, 2), 4, 1, 2, 1) == fsdp_only.shard((5, 2), 4, 3, 2, 1)


# -- from torch placements ------------------------------------------------------------------

def test_split_from_placements_maps_torch():
    assert split_from_placements(("dp", "tp"), [TSS(0, split_factor=2), TS(0)],
                                 mesh_shape=(4, 2)) == FSDP_TP_COL
    assert split_from_placements(("dp_shard", "tp"), [TS(0), TS(1)]) == FSDP_TP_ROW
    assert split_from_placements(("fsdp",), [TS(0)]) == MeshSplit((S("dp", 0),))
    assert split_from_placements(("tp",), [TS(-1)], ndim=2) == MeshSplit((S("tp", 1),))
    assert split_from_placements(("dp", "tp"), [TR(), TR()]) == Replicate()
    assert split_from_placements(("dp",), [TSS(0, split_factor=2)]) == MeshSplit((SS("dp", 0, factor=2),))
    assert split_from_placements(("dp", "tp"), [TSS(0, split_factor=1), TS(0)]) == \
        MeshSplit((S("dp", 0), S("tp", 0)))
    assert split_from_placements(("data", "model"), [TS(0), TS(0)],
                                 axis_names={"data": "dp", "model": "tp"}) == \
        MeshSplit((S("dp", 0), S("tp", 0)))


@pytest.mark.parametrize("names,placements,kw,match", [
    (("dp", "tp"), [TS(0), Partial()], {}, "partial values"),
    (("dp", "cp"), [TS(0), TR()], {}, "'cp' is neither.*accepted names are"),
    (None, [TS(0)], {}, "no axis names"),
    (("dp", "tp"), [TS(0)], {}, "1 placements"),
    (("dp", "fsdp"), [TS(0), TS(1)], {}, "each of"),
    (("dp", "tp"), [TSS(0, split_factor=3), TS(0)], {"mesh_shape": (2, 2)}, "not the product 2"),
    (("tp",), [TS(-1)], {}, "pass ndim"),
])
def test_split_from_placements_errors(names, placements, kw, match):
    with pytest.raises(ValueError, match=match):
        split_from_placements(names, placements, **kw)


# -- from a module --------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)


class _Tiny(nn.Module):
    """Embedding, ``layers`` keyed by global index, final norm, output head."""

    def __init__(self, vocab=11, dim=6, hidden=7, layers=2, tied=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleDict({str(i): _Block(dim, hidden) for i in range(layers)})
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.out.weight = self.tok.weight
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)


def _expected_residence(name):
    if name.startswith("layers."):
        return Residence.of_layer(int(name.split(".")[1]))
    return Residence("first") if name.startswith("tok") else Residence("last")


def test_specs_from_plain_module():
    model = _Tiny(layers=3)
    specs = specs_from_module(model)
    assert [s.name for s in specs] == [n for n, _ in model.named_parameters()]
    for spec in specs:
        assert spec.split == Replicate() and spec.dtype == "float32"
        assert spec.residence == _expected_residence(spec.name), spec.name
        assert spec.shape == tuple(model.get_parameter(spec.name).shape)
    assert {s.name: s.shape for s in specs}["layers.2.up.weight"] == (7, 6)
    PTC(ParallelConfig(tp=2, pp=3, dp=2), specs, num_layers=3).validate()


def test_specs_tied_buffers_and_overrides():
    model = _Tiny(tied=True).to(torch.bfloat16)
    specs = {s.name: s for s in specs_from_module(model, buffers=True)}
    assert "out.weight" not in specs and specs["tok.weight"].residence == Residence("tied")
    assert specs["step"].dtype == "int64" and "scratch" not in specs
    assert specs["layers.1.down.bias"].dtype == "bfloat16"
    custom = specs_from_module(model, residence_of=lambda n: Residence("all") if "norm" in n else None)
    assert {s.residence for s in custom if "norm" in s.name} == {Residence("all")}
    blocks = nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])})
    assert [s.residence for s in specs_from_module(blocks, layer_containers=("blocks",))] == \
        [Residence.of_layer(0)] * 2 + [Residence.of_layer(1)] * 2
    assert {s.residence for s in specs_from_module(nn.Linear(2, 2))} == {Residence("all")}


def test_specs_reject_unsupported_dtype():
    model = nn.Module()
    model.register_buffer("freqs", torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="freqs: unsupported dtype 'complex64'"):
        specs_from_module(model, buffers=True)


# -- multi-process: real DTensors on gloo ---------------------------------------------------

def _check_dtensor(name, dt, global_tensor):
    """The rank's to_local() equals the global tensor read through the rule's pieces."""
    mesh = dt.device_mesh
    rule = split_from_placements(mesh.mesh_dim_names, dt.placements, mesh_shape=tuple(mesh.shape),
                                 ndim=dt.ndim)
    coords = dict(zip(mesh.mesh_dim_names, mesh.get_coordinate()))
    sizes = dict(zip(mesh.mesh_dim_names, mesh.shape))
    tp_axis = "tp" if "tp" in sizes else None
    dp_axis = next((a for a in sizes if a != "tp"), None)
    tp, tp_rank = (sizes[tp_axis], coords[tp_axis]) if tp_axis else (1, 0)
    dp, dp_rank = (sizes[dp_axis], coords[dp_axis]) if dp_axis else (1, 0)
    assert rule.check(tuple(dt.shape), tp, dp) is None, (name, rule)
    shard = rule.shard(tuple(dt.shape), tp, tp_rank, dp, dp_rank)
    local = dt.to_local()
    assert tuple(local.shape) == shard.shape, (name, rule, tuple(local.shape), shard.shape)
    assert shard.covered == local.numel()
    expected = read_through(global_tensor.to(local.dtype), shard)
    assert torch.equal(local, expected), (name, rule, local, expected)
    return {"name": name, "rule": str(rule), "pieces": len(shard.pieces), "numel": local.numel()}


def _distribute_cases(mesh, cases):
    from torch.distributed.tensor import distribute_tensor

    out = []
    for shape, placements in cases:
        global_tensor = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
        # Torch scatters uneven _StridedShard pieces with unequal padding and asserts;
        # every rank holds the global tensor here, so let each one split it locally.
        strided = any(isinstance(p, TSS) for p in placements)
        dt = distribute_tensor(global_tensor, mesh, placements,
                               src_data_rank=None if strided else 0)
        out.append(_check_dtensor(f"{shape}:{placements}", dt, global_tensor))
    return out


def _arange_params(model):
    """Fill every parameter with distinct integers; return name -> global tensor."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) + 1000 * i)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _tp_plan(layers):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {"tok": RowwiseParallel(input_layouts=TR()), "out": ColwiseParallel()}
    for i in range(layers):
        plan[f"layers.{i}.up"] = ColwiseParallel()
        plan[f"layers.{i}.down"] = RowwiseParallel()
    return plan


def _check_module(model, globals_, prefix=""):
    from torch.distributed.tensor import DTensor

    results = []
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor), f"{name} is not a DTensor"
        results.append(_check_dtensor(prefix + name, p, globals_[name]))
    specs = specs_from_module(model)
    assert [s.name for s in specs] == list(globals_)
    for spec in specs:
        assert spec.shape == tuple(globals_[spec.name].shape)
        assert spec.residence == _expected_residence(spec.name), spec.name
        assert split_from_json(json.loads(json.dumps(spec.split.to_json()))) == spec.split
    return results


def worker_2x2(rank, world_size):
    """World 4, mesh ("dp", "tp") = 2 x 2: distribute_tensor cases and FSDP2 + TP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    cases = [((8, 6), [TS(0), TS(0)]), ((5, 3), [TS(0), TS(1)]), ((7,), [TS(0), TS(0)]),
             ((3, 5), [TR(), TS(1)]), ((1, 4), [TS(0), TR()]), ((2, 3, 5), [TS(2), TS(1)]),
             ((9, 2), [TSS(0, split_factor=2), TS(0)]), ((3, 3), [TSS(0, split_factor=2), TS(0)]),
             ((6, 5), [TR(), TR()]), ((4, 7), [TS(1), TS(1)])]
    results = _distribute_cases(mesh, cases)
    model = _Tiny(vocab=11, dim=6, hidden=7, layers=2)
    globals_ = _arange_params(model)
    parallelize_module(model, mesh["tp"], _tp_plan(2))
    for i in range(2):
        fully_shard(model.layers[str(i)], mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    results += _check_module(model, globals_)
    return results


def worker_1d(rank, world_size):
    """World 2 or 3: 1-d meshes, FSDP2 only and TP only, uneven everywhere."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    fsdp_name = "fsdp" if world_size == 2 else "dp_shard"
    dp_mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=(fsdp_name,))
    tp_mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    results = _distribute_cases(dp_mesh, [((2, 5), [TS(0)]), ((7, 3), [TS(0)]), ((4, 5), [TS(1)]),
                                          ((8, 3), [TSS(0, split_factor=2)]), ((5,), [TR()])])
    results += _distribute_cases(tp_mesh, [((5, 7), [TS(1)]), ((1, 2), [TS(0)]),
                                           ((10, 2), [TSS(0, split_factor=3)])])
    fsdp_model = _Tiny(vocab=5, dim=4, hidden=2, layers=2)
    globals_ = _arange_params(fsdp_model)
    for i in range(2):
        fully_shard(fsdp_model.layers[str(i)], mesh=dp_mesh)
    fully_shard(fsdp_model, mesh=dp_mesh)
    results += _check_module(fsdp_model, globals_, prefix="fsdp:")
    tp_model = _Tiny(vocab=11, dim=5, hidden=7, layers=2)
    globals_ = _arange_params(tp_model)
    parallelize_module(tp_model, tp_mesh, _tp_plan(2))
    # Norms stay plain tensors under TP: replicated by definition.
    from torch.distributed.tensor import DTensor
    plain = [n for n, p in tp_model.named_parameters() if not isinstance(p, DTensor)]
    assert plain and all("norm" in n for n in plain)
    tp_specs = {s.name: s for s in specs_from_module(tp_model)}
    assert all(tp_specs[n].split == Replicate() for n in plain)
    for name, p in tp_model.named_parameters():
        if isinstance(p, DTensor):
            results.append(_check_dtensor("tp:" + name, p, globals_[name]))
    return results


HERE = Path(__file__)


def _summarize(results, world_size):
    assert len(results) == world_size
    names = [[r["name"] for r in rank] for rank in results]
    assert all(n == names[0] for n in names), "every rank must check the same tensors"
    return {r["name"]: r["rule"] for r in results[0]}, results


def test_gloo_2x2_fsdp2_tp():
    rules, results = _summarize(run_ranks(HERE, "worker_2x2", 4, timeout=180), 4)
    assert len(rules) == 10 + len(list(_Tiny(layers=2).parameters()))
    assert rules["layers.0.up.weight"] == str(FSDP_TP_COL)
    assert rules["layers.1.down.weight"] == str(FSDP_TP_ROW)
    assert rules["tok.weight"] == str(FSDP_TP_COL)         # vocab-parallel embedding rows
    assert rules["layers.0.down.bias"] == "MeshSplit(dp:S(0), tp:R)"
    assert rules["norm.weight"] == "MeshSplit(dp:S(0))"
    # Uneven: some rank holds fewer elements than another for the 7-row column-parallel weight.
    sizes = {r["numel"] for rank in results for r in rank if r["name"] == "layers.0.up.weight"}
    assert len(sizes) > 1


@pytest.mark.parametrize("world_size", [2, 3])
def test_gloo_1d_uneven(world_size):
    rules, results = _summarize(run_ranks(HERE, "worker_1d", world_size, timeout=180), world_size)
    params = len(list(_Tiny(layers=2).parameters()))
    assert len(rules) == 8 + params + (params - 6)  # TP leaves the 6 norm parameters plain
    assert rules["fsdp:layers.1.up.weight"] == "MeshSplit(dp:S(0))"
    assert rules["tp:layers.1.up.weight"] == "MeshSplit(tp:S(0))"
    assert rules["tp:layers.1.down.weight"] == "MeshSplit(tp:S(1))"
    # The view-style strided shard gives some rank several non-contiguous slices.
    strided = [r["pieces"] for rank in results for r in rank if "_StridedShard" in r["name"]]
    assert strided and max(strided) >= 2
    if world_size == 3:
        # 2 rows over 3 ranks: the last rank's local tensor is empty, shape (0, 5).
        empties = [r for rank in results for r in rank if r["name"].startswith("(2, 5)")]
        assert sorted(r["numel"] for r in empties) == [0, 5, 5]
