"""Checkpoints in and out: foreign formats as tensor sources and sinks.

- :mod:`scalai.interop.rules`: the rules-file format (how foreign tensor names map onto
  scalai's tensor specs: fused parts, transposes, padding, optimizer keys) and
  :func:`~scalai.interop.rules.resolve`.
- :mod:`scalai.interop.hf_models`: the Hugging Face families scalai knows (rules from a
  ``config.json``; the ``config.json`` of a scalai model).
"""

from .rules import Foreign, Mapping, Rules, load_rules, resolve

__all__ = ["Rules", "Mapping", "Foreign", "load_rules", "resolve"]
