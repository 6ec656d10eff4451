"""Helpers of the elastic tests (a uniquely named module: several test directories have a
conftest.py, so ``from conftest import ...`` would depend on collection order)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
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


class Coordinator:
    """A ``scalai run`` process and the lines it prints (also appended to ``log``), read on a
    thread."""

    def __init__(self, args: list, env: dict, log: Path):
        self.lines: queue.Queue = queue.Queue()
        self.text: list[str] = []
        self.log = open(log, "a")
        self.proc = subprocess.Popen(scalai_cmd("run", *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.text.append(line)
            self.log.write(line)
            self.log.flush()
            self.lines.put(line)

    def wait_for(self, *fragments: str, timeout: float = 240) -> str:
        """Lines until one holds every fragment (in that line); the line."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, "".join(self.text[-40:])
                continue
            if all(f in line for f in fragments):
                return line
        raise AssertionError(f"no line with {fragments} within {timeout} s:\n" + "".join(self.text[-40:]))
