"""Fixtures of the training tests: the corpus index, and running trainer segments on gloo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # _dist, cli_helpers

WORKERS = Path(__file__).resolve().parent / "_workers.py"


@pytest.fixture(scope="session")
def corpus_index(tmp_path_factory) -> str:
    """The stdlib byte corpus indexed at gpt-tiny's seq_len (64), once per session."""
    from scalai.examples.gpt.corpus import ensure_index

    return str(ensure_index(64, tmp_path_factory.mktemp("corpus") / "index").path)


def run_segment(corpus_index: str, layout: str, steps: int, *, timeout: float = 300, **options) -> dict:
    """Train ``layout`` up to ``steps`` on tp*pp*dp gloo processes; rank 0's summary."""
    from _dist import run_ranks
    from scalai.config import ParallelConfig

    world = ParallelConfig.parse(layout).world_size
    results = run_ranks(WORKERS, "train_segment", world, timeout=timeout,
                        kwargs=dict(layout=layout, steps=steps, data=corpus_index, **options))
    assert all(r["losses"] == results[0]["losses"] for r in results), "ranks disagree on the loss"
    return results[0]


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
