"""What a step fed, from every rank's report (pure: many ranks simulated in one process)."""

import pytest

from scalai.config import ParallelConfig
from scalai.training import fed


def test_replicas_rows_in_data_parallel_order():
    config = ParallelConfig.parse("tp=2,pp=1,dp=2")  # ranks: (tp0 dp0) (tp1 dp0) (tp0 dp1) (tp1 dp1)
    got = fed.fed_samples([[3, 1], [3, 1], [7, 5], [7, 5]], config)
    assert got.ids == [3, 1, 7, 5] and got.mismatched == []
    assert got.to_json() == {"sample_ids": [3, 1, 7, 5]}


def test_a_rank_that_fed_other_rows_than_its_replica_is_named():
    config = ParallelConfig.parse("tp=2,pp=1,dp=2")
    got = fed.fed_samples([[3, 1], [3, 3], [7, 5], [5, 7]], config)
    assert got.ids == [3, 1, 7, 5] and got.mismatched == [1, 3]
    assert got.to_json()["fed_mismatch"] == [1, 3]


def test_middle_pipeline_stages_feed_nothing_the_last_feeds_the_targets():
    config = ParallelConfig.parse("tp=1,pp=3,dp=1")
    assert fed.fed_samples([[4, 2], [], [4, 2]], config).mismatched == []
    assert fed.fed_samples([[4, 2], [], []], config).mismatched == [2]  # the last stage must feed
    assert fed.fed_samples([[4, 2], [9], [4, 2]], config).mismatched == [1]  # a middle stage fed rows
    with pytest.raises(ValueError, match="2 ranks reported"):
        fed.fed_samples([[1], [2]], config)


def test_gather_without_a_process_group_is_this_rank_alone():
    got = fed.gather_fed(__import__("torch").tensor([5, 6]), ParallelConfig.parse("tp=1,pp=1,dp=1"))
    assert got.ids == [5, 6] and got.mismatched == []
