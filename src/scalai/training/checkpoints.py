"""Checkpoint roots: a directory of step checkpoints (``step-000020``), the latest found by name.

A job saves into ``ROOT/step-NNNNNN`` (one complete checkpoint each) and resumes from a
root (the highest step inside with a manifest) or from one checkpoint directly. Partial
saves are hidden ``.step-*.partial-*`` directories and never match.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..checkpoint import MANIFEST_NAME
from ..checkpoint.objects import is_object_url, object_children, object_exists, redact
from ..errors import CheckpointError

__all__ = ["step_dir", "find_checkpoint", "list_checkpoints"]

_STEP = re.compile(r"^step-(\d{6,})$")


def step_dir(root: str | os.PathLike, step: int) -> Path | str:
    """``ROOT/step-NNNNNN`` for ``step`` (a string for a URL root, ``s3://B/run/step-NNNNNN``)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be a non-negative integer")
    if is_object_url(root):
        return f"{root.rstrip('/')}/step-{step:06d}"
    return Path(root) / f"step-{step:06d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path | str]]:
    """``(step, path)`` of every complete checkpoint under ``root``, by step."""
    if is_object_url(root):
        return sorted((int(m.group(1)), f"{root.rstrip('/')}/{name}") for name in object_children(root)
                      if (m := _STEP.match(name)) and object_exists(f"{root.rstrip('/')}/{name}"))
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for entry in root.iterdir():
        match = _STEP.match(entry.name)
        if match and (entry / MANIFEST_NAME).is_file():
            out.append((int(match.group(1)), entry))
    return sorted(out)


def find_checkpoint(path: str | os.PathLike) -> Path | str:
    """The checkpoint to resume from: ``path`` itself if it has a manifest, else the
    latest ``step-*`` checkpoint under it.

    Raises:
        CheckpointError: neither (names what was looked for).
    """
    if is_object_url(path):
        if object_exists(path):
            return path
        found = list_checkpoints(path)
        if found:
            return found[-1][1]
        raise CheckpointError(f"{redact(path)} has no {MANIFEST_NAME} and no complete step-NNNNNN checkpoint; "
                              f"the save did not finish or this is not a checkpoint")
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1][1]
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint directory or a root "
                              f"holding step-NNNNNN checkpoints")
    raise CheckpointError(f"{path} has no {MANIFEST_NAME} and no complete step-NNNNNN checkpoint; "
                          f"the save did not finish or this is not a checkpoint")
