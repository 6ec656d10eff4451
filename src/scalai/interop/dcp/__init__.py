"""PyTorch Distributed Checkpoint (DCP) directories in and out of scalai (see docs/interop.md).

- :mod:`.pickles`: DCP's pickles unpickled with an explicit allow-list (nothing else runs).
- :mod:`.metadata`: ``.metadata`` read safely into plain data, and written.
- :mod:`.torchsave`: where a ``torch.save`` blob keeps its tensor's bytes; blobs laid out
  before their data exist.
- :mod:`.keys`: the roles of a state dict's keys (parameters, optimizer state, the rest).
- :mod:`.layout`: the stored chunks as a PTC (pure), with the model's rules for any other layout.
"""

from .layout import Chunks, DcpLayout, DcpPTC, dcp_layout, model_rules
from .metadata import DcpIndex, is_dcp_directory, read_index

__all__ = ["DcpIndex", "read_index", "is_dcp_directory", "Chunks", "DcpPTC", "DcpLayout", "dcp_layout",
           "model_rules"]
