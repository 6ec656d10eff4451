"""The worker protocol's documented script: one text in the docstring and in docs/elastic.md
(the slow test in test_run.py runs it under scalai run)."""

import re
from pathlib import Path

import elastic_helpers  # noqa: F401 - puts tests/ on sys.path (doc_examples)
from doc_examples import literal_blocks, worker_example


def test_the_docs_show_the_docstrings_script():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "elastic.md").read_text()
    section = docs[docs.index("## Using your own training script"):]
    shown = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert shown == worker_example()
    compile(shown, "worker_example.py", "exec")


def test_literal_blocks_are_extracted_whole():
    doc = "Text::\n\n    a = 1\n\n    if a:\n        b = 2\n\nMore text.\n"
    assert literal_blocks(doc) == ["a = 1\n\nif a:\n    b = 2\n"]
