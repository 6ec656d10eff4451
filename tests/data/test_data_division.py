"""Re-division under dp: exactly once across any sequence of dp changes (pure, many ranks
simulated in one process)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from scalai.config import ParallelConfig
from scalai.data import DataState, Division, dp_rank, global_order, plan_table, rank_plan


@st.composite
def _runs(draw):
    n = draw(st.integers(1, 120))
    batch = draw(st.integers(1, 40))
    start = draw(st.integers(0, 3 * n))
    segments = []
    for _ in range(draw(st.integers(1, 6))):
        dp = min(draw(st.integers(1, 16)), batch)
        micro = draw(st.sampled_from([None, "size", "count"]))
        kwargs = {}
        if micro == "size":
            kwargs["micro_batch_size"] = draw(st.integers(1, 8))
        elif micro == "count":
            kwargs["num_micro_batches"] = draw(st.integers(1, batch // dp))
        segments.append((dp, draw(st.integers(0, 5)), kwargs))
    return n, batch, start, segments, draw(st.integers(0, 2**40))


@settings(max_examples=150, deadline=None)
@given(run=_runs())
def test_any_sequence_of_dp_changes_reads_the_global_order_exactly_once(run):
    n, batch, start, segments, seed = run
    state = DataState.at_position(start, seed=seed, global_batch=batch, num_samples=n)
    read_ids, read_positions = [], []
    for dp, steps, kwargs in segments:
        division = Division(batch, dp, **kwargs)
        plans = [rank_plan(state, division, r, steps) for r in range(dp)]
        for s in range(steps):
            for p in plans:  # ranks in order make up the step's global batch
                mask = p.step == s
                read_ids.append(p.sample_ids[mask])
                read_positions.append(p.positions[mask])
                # micro-batches cover the rank's part in order, sizes within 1 of each other
                sizes = np.bincount(p.micro_batch[mask])
                assert sizes.sum() == mask.sum() and sizes.max() - sizes.min() <= 1
        state = state.advance(steps)
    ids = np.concatenate(read_ids) if read_ids else np.zeros(0, np.int64)
    positions = np.concatenate(read_positions) if read_positions else np.zeros(0, np.int64)
    total = sum(steps for _, steps, _ in segments) * batch
    # Nothing lost, nothing repeated: the positions read are exactly the next `total` ones ...
    assert np.array_equal(positions, np.arange(start, start + total))
    # ... and the ids read are the global order there, across epoch boundaries.
    assert np.array_equal(ids, global_order(start, total, n, seed))
    # Within any epoch, each sample is read at most once (exactly once in complete epochs).
    epochs = positions // n
    for e in np.unique(epochs):
        in_epoch = ids[epochs == e]
        assert len(np.unique(in_epoch)) == len(in_epoch)
        if e * n >= start and (e + 1) * n <= start + total:
            assert np.array_equal(np.sort(in_epoch), np.arange(n))
    assert state.position == start + total


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 64), dp=st.integers(1, 16), seed=st.integers(0, 99))
def test_global_batch_composition_does_not_depend_on_dp(batch, dp, seed):
    dp = min(dp, batch)
    state = DataState(seed=seed, global_batch=batch, num_samples=97, consumed=13)
    one = plan_table(state, Division(batch, 1), steps=3)
    many = plan_table(state, Division(batch, dp), steps=3)
    for s in range(3):
        assert sum(many[s], []) == one[s][0]
        sizes = [len(part) for part in many[s]]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_parts_and_micro_batches_of_an_uneven_division():
    d = Division(10, 3, micro_batch_size=2)
    assert d.part_sizes().tolist() == [4, 3, 3]
    assert [d.part(r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert d.micro_batches(0) == [(0, 2), (2, 4)]
    assert d.micro_batches(1) == [(4, 6), (6, 7)]
    lockstep = Division(10, 3, num_micro_batches=3)
    assert [len(lockstep.micro_batches(r)) for r in range(3)] == [3, 3, 3]
    assert lockstep.micro_batch_sizes(0).tolist() == [2, 1, 1]


@pytest.mark.parametrize("args, message", [
    ((7, 8), "global_batch=7 is smaller than dp=8.*use dp <= 7"),
    ((8, 0), "dp=0"),
    ((10, 3, None, 4), "num_micro_batches=4 is more than the 3 samples"),
    ((10, 3, 2, 2), "not both"),
    ((10, 3, 0), "micro_batch_size=0"),
])
def test_division_rejects_bad_input_with_a_fix(args, message):
    with pytest.raises(ValueError, match=message):
        Division(*args)


def test_rank_outside_dp_is_rejected():
    with pytest.raises(ValueError, match="rank=3 is not a data-parallel rank of dp=3; use 0..2"):
        Division(9, 3).part(3)


@pytest.mark.parametrize("batch, dp, kwargs", [(10, 3, {"micro_batch_size": 2}), (7, 4, {}),
                                               (12, 5, {"num_micro_batches": 2}), (8, 2, {"micro_batch_size": 4})])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_loss_scale_makes_the_step_gradient_the_global_batch_mean(batch, dp, kwargs, reduce):
    torch.manual_seed(0)
    x, y = torch.randn(batch, 5), torch.randn(batch)
    w0 = torch.randn(5)

    def grad(samples: slice, scale: float) -> torch.Tensor:
        w = w0.clone().requires_grad_()
        loss = ((x[samples] @ w - y[samples]) ** 2).mean() * scale
        loss.backward()
        return w.grad

    expected = grad(slice(0, batch), 1.0)  # gradient of the mean loss over the global batch
    division = Division(batch, dp, **kwargs)
    per_rank = []
    for r in range(dp):  # gradient accumulation over micro-batches, as each replica runs it
        per_rank.append(sum(grad(slice(a, b), division.loss_scale(b - a, reduce))
                            for a, b in division.micro_batches(r)))
    reduced = torch.stack(per_rank).mean(0) if reduce == "mean" else torch.stack(per_rank).sum(0)
    torch.testing.assert_close(reduced, expected)
    # A plain per-micro-batch mean with 1/num_micro_batches weighting is wrong when parts are uneven.
    if len(set(division.part_sizes().tolist())) > 1 and reduce == "mean":
        naive = torch.stack([sum(grad(slice(a, b), 1 / len(division.micro_batches(r)))
                                 for a, b in division.micro_batches(r)) for r in range(dp)]).mean(0)
        assert not torch.allclose(naive, expected)


def test_tp_and_pp_peers_of_a_replica_read_the_same_samples():
    layout = ParallelConfig(tp=2, pp=2, dp=3)
    state = DataState(seed=4, global_batch=12, num_samples=50, consumed=7)
    division = Division(12, layout.dp)
    by_rank = {r: rank_plan(state, division, dp_rank(layout, r), 2).sample_ids for r in layout.ranks()}
    for r in layout.ranks():
        peers = [q for q in layout.ranks() if layout.coords(q).dp == layout.coords(r).dp]
        assert len(peers) == 4
        for q in peers:
            assert np.array_equal(by_rank[q], by_rank[r])
    assert not np.array_equal(by_rank[layout.rank(0, 0, 0)], by_rank[layout.rank(0, 1, 0)])
