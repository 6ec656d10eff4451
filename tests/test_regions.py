"""Region algebra, checked element by element against numpy masks."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from scalai.regions import Region, bounding_box, contiguous_boxes, disjoint, flat_runs, subtract

SHAPE = (6, 5, 4)


@st.composite
def regions(draw, shape=SHAPE):
    offsets, sizes = [], []
    for n in shape:
        lo = draw(st.integers(0, n - 1))
        offsets.append(lo)
        sizes.append(draw(st.integers(1, n - lo)))
    return Region(tuple(offsets), tuple(sizes))


def mask(r: Region, shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[r.to_slices()] = True
    return m


@given(regions(), regions())
def test_intersection_is_the_common_elements(a, b):
    cut = a.intersect(b)
    both = mask(a) & mask(b)
    if cut is None:
        assert not both.any()
    else:
        assert np.array_equal(mask(cut), both)
        assert cut == b.intersect(a)
        assert a.contains(cut) and b.contains(cut)
        assert cut.volume == both.sum()


@given(regions(), regions())
def test_subtract_gives_disjoint_boxes_covering_the_difference(a, b):
    parts = subtract(a, b)
    assert disjoint(parts)
    covered = np.zeros(SHAPE, dtype=bool)
    for p in parts:
        covered |= mask(p)
    assert np.array_equal(covered, mask(a) & ~mask(b))
    assert len(parts) <= 2 * a.ndim


@given(st.lists(regions(), min_size=0, max_size=6))
def test_disjoint_agrees_with_masks(rs):
    total = sum(mask(r).astype(int) for r in rs) if rs else np.zeros(SHAPE, int)
    assert disjoint(rs) == bool((total <= 1).all())


@given(regions())
def test_flat_runs_are_the_row_major_positions(r):
    want = np.flatnonzero(mask(r).ravel())
    runs = flat_runs(SHAPE, r)
    got = np.concatenate([np.arange(a, b) for a, b in runs])
    assert np.array_equal(got, want)
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(runs, runs[1:]))  # merged: gaps between runs


@given(st.integers(0, 120), st.integers(0, 120))
def test_contiguous_boxes_tile_a_flat_range_in_order(start, stop):
    start, stop = min(start, stop), max(start, stop)
    arr = np.arange(120).reshape(SHAPE)
    boxes = contiguous_boxes(SHAPE, start, stop)
    got = np.concatenate([arr[b.to_slices()].ravel() for b in boxes]) if boxes else np.array([], int)
    assert np.array_equal(got, np.arange(start, stop))
    assert len(boxes) <= 2 * len(SHAPE) - 1
    for b in boxes:  # each box is itself one contiguous run
        assert len(flat_runs(SHAPE, b)) == 1


@given(st.lists(regions(), min_size=1, max_size=5))
def test_bounding_box_contains_all(rs):
    box = bounding_box(rs)
    assert all(box.contains(r) for r in rs)


def test_scalar_region_and_json_round_trip():
    s = Region((), ())
    assert s.volume == 1 and s.intersect(s) == s
    r = Region((1, 2), (3, 4))
    assert Region.from_json(r.to_json()) == r
    assert r.to_slices() == (slice(1, 4), slice(2, 6))


def test_bad_regions_are_rejected():
    import pytest

    with pytest.raises(ValueError):
        Region((0,), (1, 2))
    with pytest.raises(ValueError):
        Region((-1,), (2,))
