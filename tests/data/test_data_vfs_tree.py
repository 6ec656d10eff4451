"""The virtual tree a mount serves, without FUSE."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scalai.data import DataState, Division, MountConfig, SampleReader, View, build_index, global_order

from data_helpers import concat_bytes


@pytest.fixture
def view(tmp_path, token_files):
    index = build_index(token_files, tmp_path / "idx", 8)
    state = DataState(seed=5, global_batch=7, num_samples=index.num_samples, consumed=index.num_samples - 3)
    return View(index, SampleReader(index), MountConfig(state, Division(7, 3, micro_batch_size=2), steps=2))


def _sample_bytes(token_files, sample, seq_len=8):
    stream = concat_bytes(token_files)
    return stream[sample * seq_len * 2: (sample * seq_len + seq_len + 1) * 2]


def test_tree_lists_one_directory_per_rank(view):
    assert view.listdir("/") == ["state.json", "rank-0", "rank-1", "rank-2"]
    names = view.listdir("/rank-0")
    assert names[:2] == ["index.json", "samples.bin"] and names[2:] == [f"{j:06d}.bin" for j in range(6)]
    assert len(view.listdir("/rank-2")) == 2 + 4  # parts of 7 over 3: 3, 2, 2 per step
    assert view.lookup("/rank-1").is_dir and view.lookup("/state.json").writable
    for missing in ("/rank-3", "/rank-01", "/nope", "/rank-0/000006.bin", "/rank-0/0.bin", "/rank-0/x/y"):
        with pytest.raises(KeyError):
            view.lookup(missing)


def test_files_hold_the_source_bytes_of_the_rank_samples(view, token_files):
    expected_ids = global_order(view.config.state.position, 14, view.index.num_samples, 5).reshape(2, 7)
    for rank, (a, b) in enumerate([(0, 3), (3, 5), (5, 7)]):
        index = json.loads(view.read(f"/rank-{rank}/index.json", 0, 1 << 20))
        ids = expected_ids[:, a:b].reshape(-1).tolist()
        assert index["sample_id"] == ids and index["step"] == [0] * (b - a) + [1] * (b - a)
        whole = b"".join(_sample_bytes(token_files, i) for i in ids)
        size = view.lookup(f"/rank-{rank}/samples.bin").size
        assert size == len(whole) == len(ids) * 18
        assert b"".join(view.read(f"/rank-{rank}/samples.bin", o, 5) for o in range(0, size, 5)) == whole
        for j, i in enumerate(ids):
            assert view.read(f"/rank-{rank}/{j:06d}.bin", 0, 100) == _sample_bytes(token_files, i)
            assert index["offset"][j] == j * 18
    assert view.read("/rank-0/000000.bin", 18, 10) == b""


def test_apply_regenerates_a_new_view_and_validates(view):
    new = view.apply({"dp": 2, "advance": 1})
    assert new.generation == 1 and view.generation == 0  # the old view is untouched
    assert new.config.division.dp == 2 and new.config.state == view.config.state.advance(1)
    assert new.config.state.epoch == 1  # crossed the epoch end
    state = json.loads(new.read("/state.json", 0, 4096))
    assert (state["dp"], state["epoch"], state["generation"]) == (2, 1, 1)
    assert new.apply({"micro_batch_size": 1}).config.division.micro_batch_size == 1
    assert new.apply({"num_micro_batches": 1}).config.division.micro_batch_size is None
    for bad, message in [({"dp": 8}, "global_batch=7 is smaller than dp=8"), ({"colour": 1}, "does not take"),
                         ({"advance": -1}, "advance=-1"), ([1], "JSON object"), ({"steps": 0}, "steps=0")]:
        with pytest.raises(ValueError, match=message):
            view.apply(bad)


def test_dp_change_in_the_view_continues_the_global_order(view):
    def ranks_step0(v):
        return sum((json.loads(v.read(f"/rank-{r}/index.json", 0, 1 << 20))["sample_id"][: len(
            v.plan(r).sample_ids) // v.config.steps] for r in range(v.config.division.dp)), [])

    first = ranks_step0(view)
    moved = view.apply({"advance": 1, "dp": 7})
    second = ranks_step0(moved)
    n = view.index.num_samples
    assert np.array_equal(first + second, global_order(view.config.state.position, 14, n, 5))
