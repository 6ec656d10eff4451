"""Helpers of the elastic tests (a uniquely named module: several test directories have a
conftest.py, so ``from conftest import ...`` would depend on collection order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # doc_examples, _dist

SCALAI = str(Path(sys.executable).parent / "scalai")  # the console script, as a user runs it


def scalai_cmd(*args) -> list[str]:
    return [SCALAI, *map(str, args)]


def run_cli(*args, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``scalai ARGS`` in a new process, as a user runs it; its output captured."""
    return subprocess.run(scalai_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

