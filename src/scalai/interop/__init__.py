"""Checkpoints in and out: foreign formats as tensor sources and sinks.

- :mod:`scalai.interop.rules`: the rules-file format (how foreign tensor names map onto
  scalai's tensor specs: fused parts, transposes, padding, optimizer keys);
  :mod:`scalai.interop.mapping` applies one (:func:`~scalai.interop.mapping.resolve`).
- :mod:`scalai.interop.hf_models`: the Hugging Face families scalai knows (rules from a
  ``config.json``; the ``config.json`` of a scalai model).
- :mod:`scalai.interop.hf_files`, :mod:`~scalai.interop.hf_storage`: a Hugging Face
  directory read and written; :mod:`~scalai.interop.megatron`: legacy Megatron-LM trees,
  read by :mod:`~scalai.interop.unpickle`; :mod:`~scalai.interop.convert`: the conversions.
"""

from .mapping import Foreign, Mapping, foreign_tensors, resolve
from .rules import Rules, load_rules

__all__ = ["Rules", "Mapping", "Foreign", "load_rules", "resolve", "foreign_tensors"]
