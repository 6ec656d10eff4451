"""Fixtures of the training tests: the corpus index (helpers live in training_helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # _dist, cli_helpers


@pytest.fixture(scope="session")
def corpus_index(tmp_path_factory) -> str:
    """The stdlib byte corpus indexed at gpt-tiny's seq_len (64), once per session."""
    from scalai.examples.gpt.corpus import ensure_index

    return str(ensure_index(64, tmp_path_factory.mktemp("corpus") / "index").path)
