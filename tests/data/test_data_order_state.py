"""The global order and the data state: pure, no files."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from scalai.data import DataState, epoch_order, global_order, sample_ids


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), seed=st.integers(0, 2**63 - 1), epoch=st.integers(0, 10**6))
def test_every_epoch_is_a_permutation(n, seed, epoch):
    perm = epoch_order(n, seed, epoch)
    assert perm.dtype == np.int64
    assert np.array_equal(np.sort(perm), np.arange(n))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 400), seed=st.integers(0, 1000), start=st.integers(0, 2000), count=st.integers(0, 900))
def test_any_slice_equals_the_concatenated_epoch_permutations(n, seed, start, count):
    # The reference: materialize whole epochs one after another and cut the window out.
    epochs = range(start // n, (start + count) // n + 1)
    reference = np.concatenate([epoch_order(n, seed, e) for e in epochs])
    offset = start - epochs[0] * n
    assert np.array_equal(global_order(start, count, n, seed), reference[offset: offset + count])


def test_order_depends_on_seed_and_epoch_only():
    n = 1000
    a, b = epoch_order(n, 7, 0), epoch_order(n, 7, 0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, epoch_order(n, 8, 0))
    assert not np.array_equal(a, epoch_order(n, 7, 1))
    # Shuffled, not the identity or a rotation of it.
    assert np.mean(a == np.arange(n)) < 0.05
    assert len(np.unique(np.diff(a))) > 100


def test_order_is_frozen_across_releases():
    # The order is part of the saved state: a job resumed by a later scalai must draw the
    # same samples. These golden ids pin the "feistel" algorithm; changing it must come
    # with a new order name, never silently. (Pure integer arithmetic, so no NumPy
    # release can change them.)
    assert epoch_order(10, 1, 0).tolist() == [8, 7, 0, 6, 2, 5, 9, 1, 4, 3]
    assert global_order(999_990, 12, 1_000_000, 2**40).tolist() == [
        714397, 64786, 242552, 214205, 251817, 825860, 82645, 223568, 643917, 760021,  # epoch 0
        322135, 962166]  # epoch 1


def test_sequential_order_is_the_identity_every_epoch():
    assert global_order(7, 6, 5, seed=3, order="sequential").tolist() == [2, 3, 4, 0, 1, 2]


def test_shuffle_is_roughly_uniform():
    # Position 0 of 2000 epochs should land on each of 10 samples about 200 times.
    firsts = np.array([epoch_order(10, 5, e)[0] for e in range(2000)])
    counts = np.bincount(firsts, minlength=10)
    assert counts.min() > 140 and counts.max() < 260, counts


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0, "seed": 1}, "num_samples=0"),
    ({"n": 5, "seed": -1}, "seed=-1"),
    ({"n": 5, "seed": 1, "order": "random"}, "order='random'"),
])
def test_order_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_ids(np.arange(3), **kwargs)


# -- DataState ---------------------------------------------------------------------------
def test_state_round_trips_through_json():
    state = DataState(seed=3, global_batch=16, num_samples=100, epoch=2, consumed=37)
    obj = state.to_json()
    assert obj == {"version": 1, "seed": 3, "epoch": 2, "consumed": 37, "global_batch": 16,
                   "num_samples": 100, "order": "feistel"}
    assert DataState.from_json(obj) == state
    assert DataState.from_json(obj, num_samples=100) == state


def test_state_advances_across_epochs():
    state = DataState(seed=0, global_batch=30, num_samples=100, epoch=0, consumed=90)
    after = state.advance(1)
    assert (after.epoch, after.consumed, after.position) == (1, 20, 120)
    assert state.advance(4).position == state.position + 120
    assert DataState.at_position(250, seed=0, global_batch=30, num_samples=100) == \
        DataState(seed=0, global_batch=30, num_samples=100, epoch=2, consumed=50)


@pytest.mark.parametrize("kwargs, message", [
    ({"global_batch": 0}, "global_batch=0"),
    ({"consumed": 100}, "consumed=100 is not below num_samples=100.*epoch=1, consumed=0"),
    ({"epoch": -1}, "epoch=-1"),
    ({"seed": 2**63}, "seed="),
    ({"order": "shuffled"}, "order='shuffled'"),
])
def test_state_rejects_bad_values_with_a_fix(kwargs, message):
    base = {"seed": 1, "global_batch": 8, "num_samples": 100}
    with pytest.raises(ValueError, match=message):
        DataState(**{**base, **kwargs})


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(version=2), "newer"),
    (lambda d: d.pop("version"), "version"),
    (lambda d: d.update(extra=1), "unknown \\['extra'\\]"),
    (lambda d: d.pop("consumed"), "missing \\['consumed'\\]"),
])
def test_state_parsing_is_strict(mutate, message):
    obj = DataState(seed=1, global_batch=8, num_samples=100).to_json()
    mutate(obj)
    with pytest.raises(ValueError, match=message):
        DataState.from_json(obj)


def test_state_refuses_an_index_of_another_size():
    obj = DataState(seed=1, global_batch=8, num_samples=100).to_json()
    with pytest.raises(ValueError, match="100 samples but this index holds 101"):
        DataState.from_json(obj, num_samples=101)
