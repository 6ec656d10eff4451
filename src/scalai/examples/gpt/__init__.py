"""Reference trainer: a GPT decoder under TP x PP x DP whose state survives any change of layout.

- :mod:`.model`: the decoder, cut into pipeline stages that keep global layer names.
- :mod:`.parallel`: TP (``parallelize_module``), PP (``torch.distributed.pipelining``),
  DP (FSDP2 ``replicate`` / ``fully_shard``), in torchtitan's order.
- :mod:`.corpus`: the bundled byte-level corpus (this Python's standard library).
- :mod:`.train`: the loop, with :mod:`scalai.training` for save, load and stop.

Run ``python -m scalai.examples.gpt --help`` under torchrun, or ``scalai train``.
"""

from .model import PRESETS, GPTConfig, GPTStage, preset
from .options import TrainOptions, parse_args

__all__ = ["GPTConfig", "GPTStage", "PRESETS", "preset", "TrainOptions", "parse_args"]
