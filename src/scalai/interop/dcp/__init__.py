"""PyTorch Distributed Checkpoint (DCP) directories in and out of scalai (see docs/interop.md).

- :mod:`.pickles`: DCP's pickles unpickled with an explicit allow-list (nothing else runs).
- :mod:`.metadata`: ``.metadata`` read safely into plain data, and written.
- :mod:`.torchsave`: where a ``torch.save`` blob keeps its tensor's bytes; blobs laid out
  before their data exist.
- :mod:`.keys`: the roles of a state dict's keys (parameters, optimizer state, the rest).
- :mod:`.layout`: the stored chunks as a PTC (pure), with the model's rules for any other layout.
- :mod:`.source`, :mod:`.sink`: a DCP directory as a tensor source (chunks read in place)
  and as a sink (an export).
- :mod:`.open`: :func:`open_dcp`, the one way a DCP directory is opened as a source (import,
  reshard, inspect, ``scalai.training.load``), with the non-tensor state it can give.
"""

from .layout import Chunks, DcpLayout, DcpPTC, dcp_layout, model_rules
from .metadata import DcpIndex, is_dcp_directory, read_index
from .open import open_dcp

__all__ = ["DcpIndex", "read_index", "is_dcp_directory", "Chunks", "DcpPTC", "DcpLayout", "dcp_layout",
           "model_rules", "open_dcp"]
