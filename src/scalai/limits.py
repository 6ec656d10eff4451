"""The sizes scalai accepts, in one place. Pure.

Every input that could make scalai allocate or compute without bound (a layout, a model,
a PTC read from a manifest or an HTTP body) is checked against these limits *before*
anything is built from it, so that a typo such as ``dp=100000`` or a hostile manifest with
``num_layers: 10**12`` is refused in one line instead of allocating gigabytes or running
for minutes.

=================  ===================  =========  ===========================================
limit              environment          default    what it bounds
=================  ===================  =========  ===========================================
``LAYERS``         SCALAI_MAX_LAYERS    16384      transformer layers of a model or PTC
``RANKS``          SCALAI_MAX_RANKS     131072     ranks (devices) of one layout
``TENSORS``        SCALAI_MAX_TENSORS   262144     tensors of one job state (PTC specs)
``LOCAL_TENSORS``  SCALAI_MAX_LOCAL_    4194304    (rank, tensor) pairs of one layout: what
                   TENSORS                         PTCs, plans and checkpoints scale with
                                                   (planning costs about 1 KB and 1-5 us each)
``DIMS``           SCALAI_MAX_DIMS      16         dimensions of one tensor
``ELEMENTS``       SCALAI_MAX_ELEMENTS  2**48      elements of one tensor
=================  ===================  =========  ===========================================

The defaults are several times what the largest published jobs need (GPT-3 175B on
4096 ranks: 96 layers, ~4,600 tensors, ~900,000 (rank, tensor) pairs); a larger job
raises a limit through its environment variable, which every process that builds its
layouts (CLI, workers, stores) must see. A refusal is a :class:`LimitError` (a
``ValueError``: exit code 2 in the CLI, HTTP 422 from a store) naming the limit and the
variable::

    LimitError: layout tp=8,pp=16,dp=100000 has 12,800,000 ranks, more than scalai's limit
    of 131,072 (set SCALAI_MAX_RANKS to raise it if this is intended)

The nesting of JSON documents (manifests, request bodies) is bounded where they are read,
by :mod:`scalai.bounded` (``MAX_JSON_DEPTH``, 100 levels); the process's own open-file
limit, which checkpoints of many ranks run into, by :mod:`scalai.checkpoint.limits`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from .validate import integer

__all__ = ["Limit", "LimitError", "LAYERS", "RANKS", "TENSORS", "LOCAL_TENSORS", "DIMS", "ELEMENTS", "ALL"]


class LimitError(ValueError):
    """An input larger than a limit of :mod:`scalai.limits` (the message names the limit and
    how to raise it)."""


@dataclass(frozen=True)
class Limit:
    """One limit: its default, the environment variable that overrides it, what it counts."""

    name: str
    env: str
    default: int
    unit: str

    @property
    def value(self) -> int:
        """The limit in force: ``$env`` when set (a positive integer), else the default."""
        text = os.environ.get(self.env)
        if text is None or not text.strip():
            return self.default
        hint = f"; unset it or give a limit of {self.unit}, e.g. {self.env}={self.default}"
        try:
            value = int(text.strip().replace("_", ""))
        except ValueError:
            raise ValueError(f"{self.env}={text[:40]!r} is not an integer{hint}") from None
        return integer(self.env, value, 1, hint=hint)

    def check(self, count: int, subject: str | Callable[[], str]) -> int:
        """Return ``count`` if within the limit, else raise :class:`LimitError` saying that
        ``subject`` (e.g. ``"layout tp=1,pp=1,dp=100000"``, or a function that says it, called
        only then: a check made per tensor need not format its name) has too many."""
        limit = self.value
        if count > limit:
            if callable(subject):
                subject = subject()
            raise LimitError(f"{subject} has {count:,} {self.unit}, more than scalai's limit of {limit:,} "
                             f"(set {self.env} to raise it if this is intended)")
        return count


LAYERS = Limit("LAYERS", "SCALAI_MAX_LAYERS", 16384, "layers")
RANKS = Limit("RANKS", "SCALAI_MAX_RANKS", 1 << 17, "ranks")
TENSORS = Limit("TENSORS", "SCALAI_MAX_TENSORS", 1 << 18, "tensors")
LOCAL_TENSORS = Limit("LOCAL_TENSORS", "SCALAI_MAX_LOCAL_TENSORS", 1 << 22, "(rank, tensor) pairs")
DIMS = Limit("DIMS", "SCALAI_MAX_DIMS", 16, "dimensions")
ELEMENTS = Limit("ELEMENTS", "SCALAI_MAX_ELEMENTS", 1 << 48, "elements")

#: Every limit, for documentation and ``--help`` texts.
ALL = (LAYERS, RANKS, TENSORS, LOCAL_TENSORS, DIMS, ELEMENTS)
