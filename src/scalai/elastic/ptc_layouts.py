"""Layouts for a user's own model, from the PTC its script describes. Pure.

The reference trainer's layouts come from its model's shape (:mod:`.layouts`). A script
run with ``scalai run --module M`` has its own model, which scalai learns only from the
PTC the script describes (announced on the meta device, or reported when ready). From
then on:

- **constraints**: a layout is possible when the PTC can be laid out in it (every split
  rule divides its dimension: tensor parallelism must divide the heads and widths the
  script split, pipeline parallelism its layers);
- **cost**: the state bytes of the fullest device under the layout (weights and optimizer
  state, exactly, from the PTC), against the devices' memory (``device_memory``, when
  known); activations are the script's business and are not counted.

Among the layouts that fit, :meth:`PtcLayouts.ranking` puts data parallelism first (for a
model that fits, it communicates least per step: one gradient reduction), then pipeline
before tensor parallelism (tensor parallelism communicates inside every layer), and
replicated optimizer state before ZeRO-1 (replicas let a failure be recovered without
losing steps). Before the script has described its model, only data parallelism
(``tp=1,pp=1``) is used: every script can run it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ParallelConfig
from ..errors import ScalaiError
from .layouts import candidates

__all__ = ["PtcLayouts"]


@dataclass(frozen=True)
class PtcLayouts:
    """A script's layouts (see the module docstring). ``device_memory``: bytes per device
    (None: unknown, everything fits)."""

    device_memory: float | None = None

    def why_not(self, layout: ParallelConfig, ptcs) -> str | None:
        """Why the script's model cannot take ``layout`` (None: it can)."""
        if not ptcs:
            if layout.tp == 1 and layout.pp == 1:
                return None
            return (f"the script has not described its model yet; {layout} needs it (only data parallelism "
                    f"until then)")
        try:
            laid = ptcs[0].relayout(layout)
            laid.rank_shards(0)
            laid.rank_shards(layout.world_size - 1)
        except (ValueError, ScalaiError) as exc:
            return str(exc)
        return None

    def device_bytes(self, layout: ParallelConfig, ptcs) -> int:
        """State bytes of the fullest device under ``layout`` (0 without a PTC)."""
        if not ptcs:
            return 0
        laid = ptcs[0].relayout(layout)
        return max(laid.rank_nbytes(r) for r in range(layout.world_size))

    def ranking(self, devices: int, ptcs) -> list[tuple[ParallelConfig, bool, int]]:
        """``(layout, fits, device bytes)`` of every possible layout, best first."""
        ranked = []
        for layout in candidates(devices):
            if self.why_not(layout, ptcs) is not None:
                continue
            nbytes = self.device_bytes(layout, ptcs)
            fits = self.device_memory is None or nbytes <= 0.9 * self.device_memory
            ranked.append((layout, fits, nbytes))
        return sorted(ranked, key=lambda e: (not e[1], e[0].tp * e[0].pp, e[0].tp, e[0].zero, e[2]))

    def choose(self, devices: int, ptcs) -> ParallelConfig:
        """The best layout for ``devices`` devices.

        Raises:
            ValueError: none is possible, or none fits the devices' memory.
        """
        ranked = self.ranking(devices, ptcs)
        if not ranked or not ranked[0][1]:
            why = "none fits their memory" if ranked else "the model cannot be laid out on that many"
            raise ValueError(f"no layout of the script's model for {devices} devices: {why}; ask for another "
                             f"device count")
        return ranked[0][0]
