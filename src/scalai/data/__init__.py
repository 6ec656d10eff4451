"""Dataset state in the PTC: an exactly-once global sample order under any change of DP.

- :func:`build_index` / :class:`SampleIndex`: fixed-length samples over token files,
  Megatron ``.bin``/``.idx`` datasets and raw text (byte level), read in place.
- :func:`global_order` / :func:`sample_ids`: the seeded order, a pure function of
  (seed, epoch, number of samples), the same for any number of replicas.
- :class:`DataState`: seed, epoch, consumed samples, global batch; ``to_json()`` goes
  into the checkpoint manifest under ``"data"``.
- :class:`Division` / :func:`rank_plan`: the next global batches divided among ``dp``
  replicas and micro-batches, with the loss weights that keep uneven parts exact.
- :class:`TokenDataset`, :class:`ElasticSampler`, :class:`ElasticDataLoader`: the
  PyTorch API (imported lazily, so the core needs no torch import).
- :func:`mount`: the same views as a FUSE file system (imported lazily).
"""

from __future__ import annotations

from typing import Any

from .division import Division, RankPlan, dp_rank, plan_table, rank_plan, step_ids
from .index import SampleIndex, build_index
from .order import ORDERS, epoch_order, global_order, sample_ids
from .reader import SampleReader
from .sources import SourceFile
from .state import DataState
from .vfs_tree import MountConfig, View

__all__ = [
    "SampleIndex", "build_index", "SourceFile", "SampleReader",
    "ORDERS", "global_order", "epoch_order", "sample_ids",
    "DataState", "Division", "RankPlan", "rank_plan", "step_ids", "plan_table", "dp_rank",
    "MountConfig", "View", "mount", "fuse_unavailable_reason", "FuseUnavailable",
    "TokenDataset", "ElasticSampler", "ElasticDataLoader",
]

_LAZY = {
    "TokenDataset": "torch_api", "ElasticSampler": "torch_api", "ElasticDataLoader": "torch_api",
    "mount": "vfs", "fuse_unavailable_reason": "vfs", "FuseUnavailable": "vfs",
}


def __getattr__(name: str) -> Any:
    # torch and the FUSE binding are heavy or optional: import them on first use.
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
