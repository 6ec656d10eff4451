"""Rank functions of the DCP tests (run by ``_dist.run_ranks``): a model built from torch's own
modules, laid out with torch's own FSDP2 and tensor parallelism, trained one Adam step and
saved with ``dcp.save`` as ``get_state_dict`` gives it."""

from __future__ import annotations

import warnings

import torch
from torch import nn

#: The model's sizes: vocabulary, width, layers.
VOCAB, DIM, LAYERS = 16, 8, 2

#: How the saved keys map onto scalai tensors (a rules file): torch's TP plan below, as splits.
RULES = {
    "format": "scalai-rules/1",
    "tensors": [
        {"name": "emb.weight", "split": "column", "where": "first", "from": ["emb.weight"]},
        {"name": "layers.{layer}.norm.weight", "split": "replicate", "from": ["layers.{layer}.norm.weight"]},
        {"name": "layers.{layer}.w1.weight", "split": "column", "from": ["layers.{layer}.w1.weight"]},
        {"name": "layers.{layer}.w2.weight", "split": "row", "from": ["layers.{layer}.w2.weight"]},
        {"name": "norm.weight", "split": "replicate", "where": "last", "from": ["norm.weight"]},
        {"name": "out.weight", "split": "column", "where": "last", "from": ["out.weight"]},
    ],
}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM, bias=False)
        self.w1 = nn.Linear(DIM, 4 * DIM, bias=False)
        self.w2 = nn.Linear(4 * DIM, DIM, bias=False)

    def forward(self, x):
        return x + self.w2(torch.relu(self.w1(self.norm(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM, bias=False)
        self.out = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.emb(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.out(self.norm(x))


def parallel(model: Net, tp_mesh=None, dp_mesh=None) -> Net:
    """``model`` laid out with torch's tensor parallelism over ``tp_mesh`` (embedding and
    ``w2`` row-wise, ``w1`` and the output head column-wise), then FSDP2 over ``dp_mesh``."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if tp_mesh is not None:
        plan = {"emb": RowwiseParallel(input_layouts=Replicate()), "out": ColwiseParallel(output_layouts=Replicate())}
        for i in range(LAYERS):
            plan[f"layers.{i}.w1"] = ColwiseParallel()
            plan[f"layers.{i}.w2"] = RowwiseParallel()
        parallelize_module(model, tp_mesh, plan)
    if dp_mesh is not None:
        for layer in model.layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    return model


def save_fsdp_tp(rank: int, world_size: int, path: str) -> dict:
    """FSDP2 (dp=2) over tensor parallelism (tp=2): train one step, ``dcp.save``; returns the
    placements torch gave each parameter (to show what the checkpoint was saved from)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = parallel(Net(), mesh["tp"], mesh["dp"])
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(100 + mesh.get_coordinate()[0])
    for _ in range(2):
        tokens = torch.randint(0, VOCAB, (2, 5), generator=g)
        model(tokens).float().pow(2).mean().backward()
        optim.step()
        optim.zero_grad()
    msd, osd = get_state_dict(model, optim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    return {k: str(v.placements) for k, v in msd.items()}


def load_tp(rank: int, world_size: int, path: str) -> dict:
    """``dcp.load`` of ``path`` into the model laid out with tensor parallelism only
    (tp=``world_size``) and into its Adam state; returns every loaded tensor whole (lists),
    and its placements."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(1)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    model = parallel(Net(), mesh)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    msd, osd = get_state_dict(model, optim)  # initializes Adam's state
    state = {"model": msd, "optim": {"state": osd["state"]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=path)
    def whole(v):  # a norm's weight is not a DTensor: tensor parallelism leaves it replicated
        return (v.full_tensor() if hasattr(v, "full_tensor") else v).tolist()

    out = {f"model.{k}": whole(v) for k, v in msd.items()}
    for fqn, states in osd["state"].items():
        out.update({f"optim.state.{fqn}.{s}": whole(v) for s, v in states.items()})
    return {"tensors": out, "placements": {k: str(getattr(v, "placements", "plain")) for k, v in msd.items()}}


def _locals(model, optim) -> dict[str, torch.Tensor]:
    """Every local shard of the model's parameters and Adam state, by scalai's names."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
        for s, v in optim.state[p].items():
            local = v.to_local() if hasattr(v, "to_local") else v
            out[f"optimizer.{s}.{name}" if s != "step" else f"step.{name}"] = local.detach().clone()
    return out


def load_live(rank: int, world_size: int, path: str, weights: str) -> dict:
    """``scalai.training.load`` of the DCP checkpoint ``path`` into live jobs of two other
    layouts (tensor parallelism alone, FSDP2 alone, over ``world_size`` ranks); each compared,
    local shard by local shard, with ``dcp.load`` of the same checkpoint into the same
    layout. Then ``weights`` (a DCP checkpoint without optimizer state): refused, then
    loaded with ``weights_only``. Returns what each rank saw."""
    import gc

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from scalai.training import CollectiveError, describe, load

    out = {}
    for layout, axis in ((f"tp={world_size},pp=1,dp=1", "tp"), (f"tp=1,pp=1,dp={world_size}", "dp")):
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=(axis,))

        def build(seed):
            torch.manual_seed(seed)
            model = parallel(Net(), *((mesh, None) if axis == "tp" else (None, mesh)))
            return model, torch.optim.Adam(model.parameters(), lr=0.01)

        oracle, oracle_optim = build(1)
        msd, osd = get_state_dict(oracle, oracle_optim)  # initializes Adam's state
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load({"model": msd, "optim": {"state": osd["state"]}}, checkpoint_id=path)
        want = _locals(oracle, oracle_optim)

        model, optim = build(2)
        job = describe(model, optim, layout, num_layers=LAYERS)
        before = {k: v.clone() for k, v in _locals(model, optim).items()}
        report = load(job, path)
        got = _locals(model, optim)
        assert set(got) == set(want), (sorted(got), sorted(want))
        differ = [k for k in want if not torch.equal(got[k], want[k])]
        changed = [k for k in want if not k.startswith("step.") and not torch.equal(got[k], before[k])]
        entry = {"differ": differ, "checked": len(want), "changed": len(changed), "step": job.step,
                 "restored": list(report.restored), "not_restored": sorted(report.not_restored),
                 "saved_layout": report.saved_layout, "bytes": report.rank_bytes}

        try:
            load(job, weights)
            entry["refused"] = None
        except CollectiveError as exc:
            entry["refused"] = str(exc)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        report = load(job, weights, weights_only=True)
        after = _locals(model, optim)
        entry["weights_differ"] = [k for k in want if not k.startswith(("optimizer.", "step.")) and
                                   not torch.equal(after[k], want[k])]
        entry["optimizer_kept"] = all(torch.equal(after[k], got[k]) for k in got if k.startswith("optimizer."))
        entry["weights_restored"] = list(report.restored)
        out[layout] = entry
        del job, model, optim, oracle, oracle_optim, msd, osd
        gc.collect()
    return out
