"""Failures on some ranks are seen on every rank, at once, without a hang (gloo, 2 ranks)."""

from __future__ import annotations

import pytest

from training_helpers import WORKERS


@pytest.fixture(scope="module")
def outcomes(corpus_index, tmp_path_factory):
    from _dist import run_ranks

    tmp = tmp_path_factory.mktemp("failures")
    return run_ranks(WORKERS, "failure_scenarios", 2, timeout=240,
                     kwargs={"data": corpus_index, "tmp": str(tmp)})


def test_missing_shard_fails_on_every_rank(outcomes):
    seen = [o["missing"] for o in outcomes]
    assert all(s is not None for s in seen), "loading a checkpoint with a missing shard must fail"
    assert seen[0] == seen[1], "every rank raises the same error"
    assert seen[0]["ranks"] == [0, 1] and seen[0]["kinds"] == ["CheckpointError"]
    assert "rank-00001.safetensors is missing" in seen[0]["message"]


def test_corrupted_shard_fails_on_every_rank(outcomes):
    seen = [o["corrupt"] for o in outcomes]
    assert all(s is not None for s in seen) and seen[0] == seen[1]
    # saved rank 0 is verified by live rank 0 only; rank 1 learns it through the collective
    assert seen[0]["ranks"] == [0] and seen[0]["kinds"] == ["ChecksumError"]
    assert "checksum mismatch" in seen[0]["message"] and "rank-00000.safetensors" in seen[0]["message"]


def test_a_write_failure_on_one_rank_fails_the_save_everywhere_and_leaves_nothing(outcomes):
    seen = [o["save"] for o in outcomes]
    assert all(s is not None for s in seen) and seen[0] == seen[1]
    assert seen[0]["ranks"] == [1] and "No space left on device" in seen[0]["message"]
    assert outcomes[0]["leftovers"] == [] and outcomes[1]["leftovers"] == []


def test_a_stop_request_on_one_rank_stops_every_rank_at_the_same_step(outcomes):
    assert [o["stopped_at"] for o in outcomes] == [3, 3]
    assert outcomes[1]["reason"] == "only rank 1 was told"
    assert outcomes[0]["reason"] == "requested on another rank"


def test_a_dump_finds_the_sharded_state_in_the_middle_of_forward_and_of_backward(corpus_index, tmp_path):
    """What a survivor's dump reads (``job.local_tensors()``) when a peer dies mid-step:
    FSDP2 (``replicate`` at dp=2, ``fully_shard`` with zero=1) has swapped the modules'
    parameters for unsharded ones then; the dump must still find every sharded parameter
    and Adam moment, with the values of the last completed step. The reference trainer,
    and the small model of one's own of the worker protocol's documented script."""
    from _dist import run_ranks
    from doc_examples import write_worker_example

    layouts = ["tp=1,pp=1,dp=2", "tp=1,pp=1,dp=2,zero=1", "tp=2,pp=1,dp=1"]
    seen = run_ranks(WORKERS, "midstep_dumps", 2, timeout=240,
                     kwargs={"layouts": layouts, "data": corpus_index,
                             "example": str(write_worker_example(tmp_path))})
    for rank, out in enumerate(seen):
        assert set(out) == set(layouts) | {f"example {layout}" for layout in layouts[:2]}
        for layout, phases in out.items():
            assert phases == {"forward": "ok", "backward": "ok"}, (rank, layout, phases)
