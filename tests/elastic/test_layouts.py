"""Layout feasibility and the cost model."""

import pytest

from scalai.config import ParallelConfig
from scalai.elastic.layouts import Hardware, Workload, estimate, rank_layouts
from scalai.models import get_model_shape


def test_every_candidate_uses_all_devices_and_respects_the_model():
    shape = get_model_shape("gpt-tiny")
    for e in rank_layouts(shape, 8):
        c = e.config
        assert c.world_size == 8
        shape.check(c)  # would raise if heads/layers did not split
        assert not (c.zero and c.dp == 1)


def test_fitting_layouts_come_first_and_are_ordered_by_step_time():
    ranked = rank_layouts(get_model_shape("gpt3-6.7b"), 16, Hardware(device_memory_gib=40))
    fits = [e.fits for e in ranked]
    assert fits == sorted(fits, reverse=True) and any(fits) and not all(fits)
    times = [e.step_seconds for e in ranked if e.fits]
    assert times == sorted(times)


def test_zero_saves_optimizer_memory_and_nothing_else():
    shape, hw, work = get_model_shape("gpt3-1.3b"), Hardware(), Workload()
    plain = estimate(shape, ParallelConfig(tp=1, pp=1, dp=8), hw, work)
    zero = estimate(shape, ParallelConfig(tp=1, pp=1, dp=8, zero=True), hw, work)
    params = shape.num_params  # roughly: tied embedding counted once, padding ignored
    saved_gib = (plain.memory_gib - zero.memory_gib)
    assert saved_gib == pytest.approx(12 * params * 7 / 8 / 2**30, rel=0.05)
    assert zero.step_seconds == plain.step_seconds


def test_175b_on_1024_gpus_prefers_tensor_parallelism_within_a_host():
    best = rank_layouts(get_model_shape("gpt3-175b"), 1024)[0]
    assert best.fits and best.config.tp == 8  # tp inside the 8-GPU host, never across hosts


def test_nothing_fits_in_too_little_memory():
    ranked = rank_layouts(get_model_shape("gpt3-175b"), 8, Hardware(device_memory_gib=80))
    assert ranked and not any(e.fits for e in ranked)


def test_bad_arguments():
    with pytest.raises(ValueError):
        rank_layouts(get_model_shape("gpt-tiny"), 0)
    with pytest.raises(ValueError):
        Hardware(device_memory_gib=0)
