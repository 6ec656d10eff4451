"""A script's own model: its layouts' constraints and cost come from the PTC it describes."""

import pytest

from scalai.config import ParallelConfig
from scalai.elastic.layouts import candidates
from scalai.elastic.ptc_layouts import PtcLayouts
from scalai.models import model_ptc


def test_candidates_use_every_device():
    got = {str(c) for c in candidates(4)}
    assert "tp=1,pp=1,dp=4" in got and "tp=1,pp=1,dp=4,zero=1" in got and "tp=4,pp=1,dp=1" in got
    assert all(c.world_size == 4 for c in candidates(4)) and len(got) == len(candidates(4))


def test_before_a_description_only_data_parallelism_and_after_it_the_models_constraints():
    layouts = PtcLayouts()
    assert layouts.why_not(ParallelConfig(tp=1, pp=1, dp=3), ()) is None
    assert "has not described its model yet" in layouts.why_not(ParallelConfig(tp=2, pp=1, dp=1), ())
    assert layouts.choose(3, ()) == ParallelConfig(tp=1, pp=1, dp=3)
    ptcs = (model_ptc("gpt-tiny", "tp=1,pp=1,dp=2"),)  # 4 layers, 4 heads: tp=3 and pp=3 impossible
    assert layouts.why_not(ParallelConfig(tp=2, pp=2, dp=1), ptcs) is None
    assert "cannot be laid out" in layouts.why_not(ParallelConfig(tp=3, pp=1, dp=1), ptcs)
    assert "does not divide 4 layers" in layouts.why_not(ParallelConfig(tp=1, pp=3, dp=1), ptcs)
    assert layouts.choose(3, ptcs) == ParallelConfig(tp=1, pp=1, dp=3)


def test_the_devices_memory_decides_against_replicas_of_a_model_that_does_not_fit():
    ptcs = (model_ptc("gpt-tiny", "tp=1,pp=1,dp=1"),)
    whole = PtcLayouts().device_bytes(ParallelConfig(tp=1, pp=1, dp=1), ptcs)
    split = PtcLayouts().device_bytes(ParallelConfig(tp=1, pp=2, dp=1), ptcs)
    assert whole > split > 0.4 * whole  # half the layers, each stage with its embedding or head
    roomy = PtcLayouts(device_memory=2 * whole)
    assert roomy.choose(2, ptcs) == ParallelConfig(tp=1, pp=1, dp=2)  # replicas first
    tight = PtcLayouts(device_memory=(split + 0.1 * split) / 0.9)  # one replica no longer fits a device
    best = tight.choose(2, ptcs)
    assert best != ParallelConfig(tp=1, pp=1, dp=2) and tight.device_bytes(best, ptcs) <= 0.9 * tight.device_memory
    with pytest.raises(ValueError, match="none fits their memory"):
        PtcLayouts(device_memory=whole / 100).choose(2, ptcs)
