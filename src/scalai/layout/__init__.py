"""Layouts: split rules, tensor specs, rule tables, DTensor placements and the PTC."""

from . import dtensor as _dtensor  # noqa: F401  (registers the "mesh" split kind for JSON)
