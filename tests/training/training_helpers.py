"""Helpers of the training tests (a uniquely named module: several test directories have
a conftest.py, so ``from conftest import ...`` would depend on collection order)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # _dist, cli_helpers

WORKERS = Path(__file__).resolve().parent / "_workers.py"


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
