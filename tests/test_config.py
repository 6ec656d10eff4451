"""Parallel configuration: text form, validation, rank order, placement."""

import pytest

from scalai.config import ParallelConfig, Placement


def test_text_round_trip_and_defaults():
    for text in ("tp=2,pp=4,dp=2", "tp=1,pp=2,dp=8,zero=1", "tp=2,pp=2,dp=1,stages=3+1"):
        assert str(ParallelConfig.parse(text)) == text
    assert ParallelConfig.parse(" dp=4 , tp=2 ") == ParallelConfig(tp=2, pp=1, dp=4)
    assert ParallelConfig.parse("stages=1+2+1").pp == 3


@pytest.mark.parametrize("text, fragment", [
    ("tp=0,pp=1,dp=1", "positive integer"),
    ("tp=2,xp=3", "unknown layout key 'xp'"),
    ("tp=two", "bad value"),
    ("tp", "not key=value"),
    ("tp=1,tp=2", "twice"),
    ("pp=2,stages=1+2+3", "lists 3 stages but pp=2"),
    ("zero=2", "bad value"),
])
def test_bad_text_says_what_is_wrong(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        ParallelConfig.parse(text)


def test_megatron_rank_order_tp_fastest_then_dp_then_pp():
    cfg = ParallelConfig(tp=2, pp=3, dp=4)
    seen = set()
    for rank in cfg.ranks():
        c = cfg.coords(rank)
        assert cfg.rank(c.tp, c.dp, c.pp) == rank
        seen.add((c.tp, c.dp, c.pp))
    assert len(seen) == cfg.world_size == 24
    assert cfg.coords(1) == (cfg.coords(1).__class__)(1, 0, 0)
    assert cfg.coords(2).dp == 1 and cfg.coords(8).pp == 1
    assert list(cfg.stage_ranks(1)) == list(range(8, 16))


def test_stage_layers_even_uneven_and_errors():
    assert [list(r) for r in ParallelConfig(pp=2).stage_layers(4)] == [[0, 1], [2, 3]]
    cfg = ParallelConfig.parse("pp=3,stages=1+2+3")
    assert [list(r) for r in cfg.stage_layers(6)] == [[0], [1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match=r"pp=3 does not divide 4 layers; use pp in \{1, 2, 4\}"):
        ParallelConfig(pp=3).stage_layers(4)
    with pytest.raises(ValueError, match="holds 6 layers but the model has 5"):
        cfg.stage_layers(5)


def test_placement_fills_hosts_in_order():
    p = Placement(gpus_per_host=4)
    assert [p.host(r) for r in (0, 3, 4, 9)] == ["host0", "host0", "host1", "host2"]
    assert p.device(5).index == 1
    named = Placement(2, ("a", "b"))
    assert named.hosts_for(4) == ["a", "b"]
    with pytest.raises(ValueError, match="only 2 hosts"):
        named.host(4)
    with pytest.raises(ValueError):
        Placement(0)
