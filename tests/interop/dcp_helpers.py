"""Helpers of the DCP tests: checkpoints written by torch's own ``dcp.save``, and damage."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch


def save_small_dcp(path: Path) -> dict:
    """``dcp.save`` (one process, no process group) of a small model and Adam state in
    ``get_state_dict``'s shape; returns the flat key -> value it saved."""
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(0)
    model = {"emb.weight": torch.randn(6, 4, generator=g),
             "layers.0.w.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
             "norm.weight": torch.randn(4, generator=g)}
    optim = {"state": {k: {"exp_avg": torch.randn(v.shape, generator=g).to(v.dtype),
                           "exp_avg_sq": torch.rand(v.shape, generator=g).to(v.dtype),
                           "step": torch.tensor(7.0)} for k, v in model.items()},
             "param_groups": [{"lr": 0.01, "betas": (0.9, 0.95), "params": list(model)}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process": yes
        dcp.save({"model": model, "optim": optim}, checkpoint_id=str(path), no_dist=True)
    flat = {f"model.{k}": v for k, v in model.items()}
    for k, states in optim["state"].items():
        flat.update({f"optim.state.{k}.{s}": v for s, v in states.items()})
    return flat


def dcp_load_whole(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint as ``dcp.load`` gives it, whole (one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(path).read_metadata()
    full = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
            for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(full, checkpoint_id=path, no_dist=True)
    return full


def save_weights_only(full: dict[str, torch.Tensor], path: Path) -> None:
    """``dcp.save`` (one process) of the ``model.`` tensors of ``full`` alone: a checkpoint
    without optimizer state."""
    import torch.distributed.checkpoint as dcp

    model = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model}, checkpoint_id=str(path), no_dist=True)


def damaged_copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def evil_pickle(marker: Path) -> bytes:
    """A pickle that would run ``os.system`` (creating ``marker``) if loaded with pickle.load."""
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


def write_metadata_pickle(directory: Path, obj) -> None:
    with open(directory / ".metadata", "wb") as f:
        pickle.dump(obj, f)


def truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)
    assert os.path.getsize(path) == keep
