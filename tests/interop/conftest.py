"""Fixtures of the interop tests: DCP checkpoints written by torch itself."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # _dist, cli_helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # dcp_helpers


@pytest.fixture(scope="session")
def small_dcp(tmp_path_factory) -> tuple[str, dict]:
    """A DCP checkpoint saved by ``dcp.save`` in one process (one chunk per tensor), and
    the state dict it holds."""
    from dcp_helpers import save_small_dcp

    path = tmp_path_factory.mktemp("dcp") / "small"
    return str(path), save_small_dcp(path)
