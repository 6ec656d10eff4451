"""Code examples of the project's docstrings, extracted so that tests run what the docs show."""

from __future__ import annotations

from pathlib import Path


def literal_blocks(doc: str) -> list[str]:
    """The literal blocks of a reStructuredText docstring (a paragraph ending in ``::``,
    a blank line, then the indented block), dedented, in order."""
    blocks, lines, i = [], doc.splitlines(), 0
    while i < len(lines):
        if lines[i].rstrip().endswith("::") and i + 1 < len(lines) and not lines[i + 1].strip():
            indent = len(lines[i]) - len(lines[i].lstrip())
            body, i = [], i + 2
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i])
                i += 1
            cut = min(len(b) - len(b.lstrip()) for b in body if b.strip())
            blocks.append("\n".join(b[cut:] for b in body).strip("\n") + "\n")
        else:
            i += 1
    return blocks


def worker_example() -> str:
    """The complete training script of :mod:`scalai.elastic.worker`'s docstring."""
    import scalai.elastic.worker as worker

    (block,) = literal_blocks(worker.__doc__)
    return block


def write_worker_example(folder: str | Path, name: str = "doc_example") -> Path:
    """Write :func:`worker_example` as ``folder/NAME.py`` (importable, runnable with ``-m``)."""
    path = Path(folder) / f"{name}.py"
    path.write_text(worker_example())
    return path
