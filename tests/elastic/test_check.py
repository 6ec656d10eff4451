"""The exactly-once and loss check of an elastic run against the unchanged run (pure)."""

from scalai.elastic.check import TOLERANCE, check_run


def _rows(steps=4, batch=4, **changes):
    """Rows of a run of ``steps`` steps reading ``batch`` consecutive ids per step;
    ``changes[step]`` replaces fields of that step's row."""
    rows = [{"step": s, "loss": 5.0 - s / 10, "samples": list(range((s - 1) * batch, s * batch))}
            for s in range(1, steps + 1)]
    for key, fields in changes.items():
        rows[int(key.removeprefix("s")) - 1].update(fields)
    return rows


def test_a_faithful_run_passes_with_every_step_compared():
    check = check_run(_rows(), _rows(), 4)
    assert check.ok and check.samples == 16 and check.compared == 4
    assert check.lines()[0].startswith("ok   data: 16 samples over 4 steps, each read exactly once")
    assert check.lines()[1].startswith("ok   loss:") and "over 4 of 4 steps" in check.lines()[1]


def test_a_sample_read_twice_or_skipped_fails():
    twice = check_run(_rows(s2={"samples": [4, 4, 6, 7]}), _rows(), 4)  # 5 skipped, 4 read twice
    assert not twice.ok and twice.repeated == 1 and twice.differing == [2]
    assert twice.lines()[0].startswith("FAIL data:") and "1 read more than once" in twice.lines()[0]
    skipped = check_run(_rows(s3={"samples": [8, 9, 10]}), _rows(), 4)  # 11 never read
    assert not skipped.ok and skipped.repeated == 0 and skipped.differing == [3]
    assert "other samples than the unchanged run: 3" in skipped.lines()[0]


def test_ranks_of_a_replica_disagreeing_fails():
    check = check_run(_rows(s1={"fed_mismatch": [1]}), _rows(), 4)
    assert not check.ok and check.mismatched == [1] and "fed different rows: 1" in check.lines()[0]


def test_nothing_passes_without_a_full_comparison():
    assert not check_run([], [], 4).ok  # "ok ... over 0 steps" is impossible
    assert not check_run(_rows(), [], 4).ok
    unreported = [dict(r, samples=[]) for r in _rows()]  # a script that reports no ids
    check = check_run(unreported, unreported, 4)
    assert not check.ok and check.differing == [1, 2, 3, 4]
    short = check_run(_rows(), _rows(steps=3), 4)  # the unchanged run lacks step 4
    assert not short.ok and short.not_compared == [4] and "over 3 of 4 steps" in short.lines()[1]
    missing = check_run(_rows(steps=3), _rows(), 4)
    assert not missing.ok and missing.missing_steps == [4]


def test_lost_steps_do_not_count_and_the_loss_is_compared():
    rows = _rows()
    rows.insert(2, dict(rows[2], lost=True, loss=9.0))  # step 3 ran twice; the first is lost
    assert check_run(rows, _rows(), 4).ok
    drift = check_run(_rows(s4={"loss": 4.6 * (1 + 3 * TOLERANCE)}), _rows(), 4)
    assert drift.data_ok and not drift.loss_ok and drift.at_step == 4
