"""Metrics rows, lost steps and the exactly-once count (pure), and the tail of a growing file."""

import json

from scalai.elastic.progress import MetricsTail, Progress, effective_rows, mark_lost, run_row, sample_counts


def test_tail_returns_whole_lines_only(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == []
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert [r["step"] for r in tail.read()] == [1, 2]
    with open(path, "a") as f:
        f.write('ep": 3}\n')
    assert tail.read() == [{"step": 3}] and tail.read() == []


def test_steps_run_again_are_marked_lost():
    raw = [{"step": s, "loss": 1.0, "layout": "tp=1,pp=1,dp=1", "sample_ids": [2 * s, 2 * s + 1], "samples": 2 * s}
           for s in (1, 2, 3, 4, 3, 4, 5)]
    rows = mark_lost(run_row(r, g) for g, r in zip([0, 0, 0, 0, 1, 1, 1], raw))
    assert [r.get("lost", False) for r in rows] == [False, False, True, True, False, False, False]
    assert [r["step"] for r in effective_rows(rows)] == [1, 2, 3, 4, 5]
    assert rows[4]["generation"] == 1 and rows[0]["samples"] == [2, 3]
    assert set(sample_counts(rows).values()) == {1} and len(sample_counts(rows)) == 10


def test_progress_line(capsys):
    import io

    out = io.StringIO()
    p = Progress(10, out, every=0)
    p.step({"step": 1, "loss": 2.5, "layout": "tp=1,pp=1,dp=2", "samples": [1, 2]})
    p.say("note")
    text = out.getvalue()
    assert "step 1/10  loss 2.5000  tp=1,pp=1,dp=2" in text and "note" in text
    json.dumps(text)
