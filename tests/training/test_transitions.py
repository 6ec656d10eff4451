"""Convergence across changes of layout: stop at A, resume at B, same losses as staying at A.

Every chain starts with an uninterrupted run at layout A that also saves checkpoints on
the way (saving does not touch the training state), then resumes those checkpoints at
other layouts step by step. Each resumed step must give the loss the uninterrupted run
had at that step, within TOLERANCE, and read exactly the same samples.

TOLERANCE: the layouts compute the same sums in different orders (tensor-parallel
all-reduces of partial products, data-parallel gradient averaging, vocabulary-parallel
log-sum-exp), which changes fp32 results by a few ulps per step; measured drift over 20
steps of gpt-tiny stays below 1e-6 relative (docs/training.md); 1e-4 is the issue's target.
"""

from __future__ import annotations

import pytest

from training_helpers import WORKERS, read_metrics, run_segment

TOLERANCE = 1e-4

CHAINS = {
    # every single-dimension change, in both directions, one dimension per arrow
    # (the pp=2 segment runs the GPipe schedule; every other pipeline here runs 1F1B)
    "single": (24, ["tp=2,pp=1,dp=1", "tp=1,pp=1,dp=1", "tp=1,pp=2,dp=1 gpipe", "tp=1,pp=1,dp=1",
                    "tp=1,pp=1,dp=2", "tp=1,pp=1,dp=2,zero=1", "tp=1,pp=1,dp=2", "tp=1,pp=1,dp=1",
                    "tp=2,pp=1,dp=1"]),
    # mixed changes, through an uneven data-parallel division (8 samples over 3 replicas)
    # and ZeRO with a pipeline, back to the first layout
    "mixed": (20, ["tp=2,pp=2,dp=1", "tp=1,pp=1,dp=4", "tp=2,pp=1,dp=2", "tp=1,pp=1,dp=3",
                   "tp=1,pp=2,dp=2,zero=1", "tp=2,pp=2,dp=1"]),
}


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHAINS))
def test_chain_follows_the_unchanged_run(name, corpus_index, tmp_path):
    steps, layouts = CHAINS[name]
    cuts = [round(steps * i / len(layouts)) for i in range(len(layouts) + 1)]  # 0, 3, 5, 8, ...
    ref_metrics = tmp_path / "reference.jsonl"
    reference = run_segment(corpus_index, layouts[0], steps, save=str(tmp_path / "a"),
                            metrics=str(ref_metrics), save_every=cuts[1])
    assert reference["step"] == steps and len(reference["losses"]) == steps
    ref_steps = {r["step"]: r for r in read_metrics(ref_metrics)}

    resumed = str(tmp_path / "a" / f"step-{cuts[1]:06d}")
    report = []
    for i, entry in enumerate(layouts[1:], 1):
        layout, _, schedule = entry.partition(" ")
        metrics = tmp_path / f"segment{i}.jsonl"
        out = run_segment(corpus_index, layout, cuts[i + 1], resume=resumed, schedule=schedule or "1f1b",
                          save=str(tmp_path / f"s{i}"), metrics=str(metrics))
        rows = read_metrics(metrics)
        assert [r["step"] for r in rows] == list(range(cuts[i] + 1, cuts[i + 1] + 1)), \
            "the resumed run must continue at the saved step and stop at --steps"
        worst = 0.0
        for row in rows:
            ref = ref_steps[row["step"]]
            assert row["layout"] == layout
            assert row["sample_ids"] == ref["sample_ids"] and row["samples"] == ref["samples"], \
                f"step {row['step']} at {layout} read other samples than the unchanged run"
            assert len(row["sample_ids"]) == 8 and not row.get("fed_mismatch"), row  # every rank agreed
            diff = _relative(row["loss"], ref["loss"])
            worst = max(worst, diff)
            assert diff < TOLERANCE, (f"{layouts[i - 1]} -> {layout}: step {row['step']} loss "
                                      f"{row['loss']!r} vs {ref['loss']!r} (rel {diff:.2e})")
        assert out["losses"] == [r["loss"] for r in rows]
        report.append(f"{layouts[i - 1]} -> {entry} (steps {cuts[i] + 1}-{cuts[i + 1]}): {worst:.1e}")
        resumed = str(tmp_path / f"s{i}")  # a root: its latest step-* checkpoint
    print(f"\n{name} chain, max relative loss difference to the unchanged run at {layouts[0]}:\n  "
          + "\n  ".join(report))


@pytest.mark.slow
def test_same_layout_resume_is_bit_exact(corpus_index, tmp_path):
    """Without a change of layout nothing is reordered: the losses are identical (every
    rank's RNG state is restored as saved under the same degrees)."""
    layout = "tp=1,pp=1,dp=2"
    reference = run_segment(corpus_index, layout, 6, save=str(tmp_path / "a"), save_every=3)
    resumed = run_segment(corpus_index, layout, 6, resume=str(tmp_path / "a" / "step-000003"))
    assert resumed["losses"] == reference["losses"][3:]


def test_the_layout_described_on_the_meta_device_is_the_built_jobs(corpus_index):
    """What a new generation announces before its devices are free (the target of the
    runner's transformation) is exactly the PTC of the job it then builds; and it is what
    a tp=1 job's own split rules cannot know: relaid out to tp=2, its replicated weights
    would put whole tensors on every rank."""
    from _dist import run_ranks

    layouts = ["tp=1,pp=1,dp=2", "tp=2,pp=1,dp=1", "tp=1,pp=1,dp=2,zero=1", "tp=1,pp=2,dp=1"]
    out = run_ranks(WORKERS, "layout_descriptions", 2, timeout=300,
                    kwargs=dict(layouts=layouts, data=corpus_index))[0]
    assert all(v["equal"] for v in out.values()), out
    whole = sum(out["tp=1,pp=1,dp=2"]["elements"]) // 2  # one replica: the whole state
    # relaid out: whole weights on both tp ranks; FSDP's sharded weights read as ZeRO-1's
    # replicated ones (only the moments split)
    for layout, most in (("tp=2,pp=1,dp=1", 0.55), ("tp=1,pp=1,dp=2,zero=1", 0.8)):
        assert sum(out[layout]["elements"]) < most * sum(out[layout]["relaid_out"]), (layout, out[layout])
        # one copy of the state, plus the tensors tensor-parallel ranks replicate (norms, biases)
        assert whole <= sum(out[layout]["elements"]) < 1.05 * whole, (layout, out[layout])
    assert out["tp=1,pp=2,dp=1"]["elements"] == out["tp=1,pp=2,dp=1"]["relaid_out"]  # residence is a rule


@pytest.mark.slow
def test_a_rank_that_reads_a_sample_twice_or_skips_one_fails_the_exactly_once_check(corpus_index, tmp_path):
    """The metrics carry what the ranks fed their models, not ids computed from the data
    position: a data source that silently goes wrong on data-parallel rank 1 (a sample read
    twice at step 2, one skipped at step 3) is seen, and the run's check fails there."""
    from _dist import run_ranks
    from scalai.elastic.check import check_run

    layout, steps = "tp=1,pp=1,dp=2", 3
    run_segment(corpus_index, layout, steps, metrics=str(tmp_path / "reference.jsonl"))
    reference = [dict(r, samples=r["sample_ids"]) for r in read_metrics(tmp_path / "reference.jsonl")]
    assert check_run(reference, reference, steps).ok and all(len(r["samples"]) == 8 for r in reference)
    run_ranks(WORKERS, "train_with_faulty_reads", 2, timeout=300,
              kwargs=dict(faults={"1:2": "twice", "1:3": "skip"}, layout=layout, steps=steps, data=corpus_index,
                          metrics=str(tmp_path / "faulty.jsonl")))
    faulty = [dict(r, samples=r["sample_ids"]) for r in read_metrics(tmp_path / "faulty.jsonl")]
    check = check_run(faulty, reference, steps)
    assert not check.data_ok and check.repeated == 1 and check.differing == [2, 3], check.lines()
    assert check.lines()[0].startswith("FAIL data:")
    read = {r["step"]: r["samples"] for r in faulty}
    expected = {r["step"]: r["samples"] for r in reference}
    assert read[1] == expected[1] and len(read[3]) == 7  # rank 1 read one row less at step 3
    assert read[2][4:6] == [expected[2][4]] * 2  # rank 1's part starts at offset 4 of the batch
