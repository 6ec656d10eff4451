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
