"""Run the ``scalai`` CLI in-process and capture what a user would see."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from scalai.cli.main import main


@dataclass
class Result:
    code: int
    out: str
    err: str


def run(capsys, *args: str) -> Result:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def tree_digest(path) -> str:
    """Hash of every file's name, size and bytes under ``path``: proves inputs untouched."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            h.update(os.path.relpath(p, path).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()
