"""Reference trainer: a GPT decoder under TP x PP x DP whose state survives any change of layout.

- :mod:`.model`: the decoder, cut into pipeline stages that keep global layer names.
- :mod:`.parallel`: TP (``parallelize_module``), PP (``torch.distributed.pipelining``),
  DP (FSDP2 ``replicate`` / ``fully_shard``), in torchtitan's order.
- :mod:`.corpus`: the bundled byte-level corpus (this Python's standard library).
- :mod:`.train`: the loop, with :mod:`scalai.training` for save, load and stop.
- :mod:`.plugin`: the trainer as a plug-in of ``scalai run``.

Run ``python -m scalai.examples.gpt --help`` under torchrun, or ``scalai train``. The
names below are imported when first used: the corpus and the plug-in need no torch (an
agent makes its machine's copy of the data without loading it).
"""

from __future__ import annotations

import importlib

__all__ = ["GPTConfig", "GPTStage", "PRESETS", "preset", "TrainOptions", "parse_args"]

_WHERE = {"GPTConfig": "model", "GPTStage": "model", "PRESETS": "model", "preset": "model",
          "TrainOptions": "options", "parse_args": "options"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
