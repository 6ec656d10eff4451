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


@pytest.fixture(scope="session")
def fsdp_tp_dcp(tmp_path_factory) -> tuple[str, dict]:
    """A DCP checkpoint saved by ``dcp.save`` from a 4-process gloo job: torch's FSDP2 (dp=2)
    over its tensor parallelism (tp=2) of a model of torch's own modules, after two Adam
    steps; and the placements torch gave its parameters."""
    from _dist import run_ranks

    path = str(tmp_path_factory.mktemp("dcp") / "fsdp_tp")
    placements = run_ranks(Path(__file__).parent / "dcp_dist.py", "save_fsdp_tp", 4, kwargs={"path": path})
    return path, placements[0]
