"""Fixtures of the elastic tests: the corpus index (helpers: ``elastic_helpers.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # simulate: the independent oracles


@pytest.fixture(scope="session")
def corpus_index(tmp_path_factory) -> str:
    """The stdlib byte corpus indexed at gpt-tiny's seq_len (64), once per session."""
    from scalai.examples.gpt.corpus import ensure_index

    return str(ensure_index(64, tmp_path_factory.mktemp("corpus") / "index").path)
