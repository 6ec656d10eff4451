"""Sharded checkpoints: one safetensors file per rank plus a strict JSON manifest.

A checkpoint directory holds ``rank-00000.safetensors``, ... (each rank's local tensors,
keyed by global tensor name) and ``manifest.json`` (format version, the PTC, per-tensor
dtype, shape and CRC-32, and the non-tensor state). Data is written first and the manifest
last, inside a staging directory renamed into place, so a crash never leaves a directory
that looks complete. Reading maps files and touches only the bytes asked for.
"""

from .manifest import FORMAT, MANIFEST_NAME, VERSION, Manifest, RankRecord, TensorRecord, rank_file_name
from .reader import Checkpoint, verify
from .safetensors_io import SafetensorsReader, SafetensorsWriter, TensorEntry
from .writer import CheckpointWriter, default_workers, save_arrays

__all__ = [
    "Checkpoint", "CheckpointWriter", "save_arrays", "verify", "default_workers",
    "Manifest", "RankRecord", "TensorRecord", "rank_file_name", "FORMAT", "VERSION", "MANIFEST_NAME",
    "SafetensorsReader", "SafetensorsWriter", "TensorEntry",
]
