"""scalai: elastic state management for multi-dimensional parallel training.

The core is pure: :class:`ParallelConfig` (degrees and rank order), :class:`Region`
(boxes of tensor index space), :class:`TensorSpec` (a tensor and how it splits),
:class:`PTC` (specs laid out under a config) and :func:`make_plan` (the copies from one
layout to another). I/O lives at the edges: checkpoints, executors, stores, trainers.
"""

from .config import Device, ParallelConfig, Placement, RankCoords
from .errors import CheckpointError, ChecksumError, PlanError, ScalaiError
from .layout.ptc import PTC, Holding, LayoutError
from .layout.spec import Residence, TensorSpec, with_optimizer_state
from .layout.splits import Fused, LocalShard, Piece, Replicate, Split, VocabSplit
from .regions import Region

__version__ = "0.1.0"

__all__ = [
    "ParallelConfig", "Placement", "RankCoords", "Device", "Region", "TensorSpec", "Residence",
    "with_optimizer_state", "PTC", "Holding", "LayoutError", "Piece", "LocalShard", "Replicate",
    "Split", "VocabSplit", "Fused", "ScalaiError", "CheckpointError", "ChecksumError", "PlanError",
]
