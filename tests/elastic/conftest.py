"""Fixtures of the elastic tests: the corpus index, and running the ``scalai`` CLI as a user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus_index(tmp_path_factory) -> str:
    """The stdlib byte corpus indexed at gpt-tiny's seq_len (64), once per session."""
    from scalai.examples.gpt.corpus import ensure_index

    return str(ensure_index(64, tmp_path_factory.mktemp("corpus") / "index").path)


SCALAI = str(Path(sys.executable).parent / "scalai")  # the console script, as a user runs it


def scalai_cmd(*args) -> list[str]:
    return [SCALAI, *map(str, args)]


def run_cli(*args, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``scalai ARGS`` in a new process, as a user runs it; its output captured."""
    return subprocess.run(scalai_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
