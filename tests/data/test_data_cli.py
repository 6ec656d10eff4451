"""``scalai data index|order|plan|mount`` as a user runs them."""

from __future__ import annotations

import json
import os

import pytest

from scalai.cli.main import main
from scalai.data import DataState, Division, SampleIndex, global_order, plan_table


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def index_path(tmp_path, text_dir, capsys):
    out = tmp_path / "idx"
    code, stdout, _ = _run(capsys, "data", "index", str(text_dir), str(out), "--seq-len", "20", "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["num_samples"] == SampleIndex.open(out).num_samples > 0 and summary["dtype"] == "uint8"
    return out


def test_index_prints_a_summary(tmp_path, token_files, capsys):
    code, out, _ = _run(capsys, "data", "index", *map(str, token_files), str(tmp_path / "i"), "--seq-len", "16")
    assert code == 0 and "into 111 samples of 16 + 1 tokens" in out and "3 files" in out


def test_order_json_is_the_global_order_across_epochs(index_path, capsys):
    n = SampleIndex.open(index_path).num_samples
    code, out, _ = _run(capsys, "data", "order", "--index", str(index_path), "--seed", "7",
                        "--count", str(n + 5), "--json")
    assert code == 0 and json.loads(out) == global_order(0, n + 5, n, 7).tolist()
    code, out, _ = _run(capsys, "data", "order", "--index", str(index_path), "--seed", "7", "--count", str(n + 5))
    assert code == 0 and "epoch 0" in out and "epoch 1" in out


def test_plan_json_lists_steps_of_ranks_of_ids(index_path, capsys):
    n = SampleIndex.open(index_path).num_samples
    code, out, _ = _run(capsys, "data", "plan", "--index", str(index_path), "--seed", "3", "--global-batch", "10",
                        "--consumed", str(n - 4), "--dp", "3", "--steps", "2", "--json")
    table = json.loads(out)
    assert code == 0 and [[len(ids) for ids in step] for step in table] == [[4, 3, 3], [4, 3, 3]]
    assert sum((ids for step in table for ids in step), []) == global_order(n - 4, 20, n, 3).tolist()
    state = DataState.at_position(n - 4, seed=3, global_batch=10, num_samples=n)
    assert table == plan_table(state, Division(10, 3), 2)
    code, out, _ = _run(capsys, "data", "plan", "--index", str(index_path), "--seed", "3", "--global-batch", "10",
                        "--dp", "3")
    assert code == 0 and "rank 2 (3)" in out


def test_plan_reads_the_state_from_a_checkpoint_manifest(index_path, tmp_path, capsys):
    n = SampleIndex.open(index_path).num_samples
    state = DataState(seed=11, global_batch=8, num_samples=n, epoch=3, consumed=5)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format": "whatever", "data": state.to_json()}))
    code, out, _ = _run(capsys, "data", "plan", "--index", str(index_path), "--state", str(manifest), "--dp", "2",
                        "--json")
    assert code == 0 and sum(json.loads(out)[0], []) == global_order(state.position, 8, n, 11).tolist()


@pytest.mark.parametrize("args, message", [
    (["plan", "--seed", "1", "--global-batch", "7", "--dp", "8"], "global_batch=7 is smaller than dp=8"),
    (["plan", "--global-batch", "7", "--dp", "2"], "missing --seed"),
    (["plan", "--seed", "1", "--global-batch", "8", "--dp", "2", "--micro-batch-size", "2",
      "--num-micro-batches", "2"], "not both"),
    (["order", "--seed", "-3", "--count", "4"], "'--seed': -3 is out of range"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(index_path, capsys, args, message):
    code, out, err = _run(capsys, "data", args[0], "--index", str(index_path), *args[1:])
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_bad_index_input_leaves_inputs_and_output_untouched(tmp_path, capsys):
    src = tmp_path / "odd.bin"
    src.write_bytes(b"\1\2\3")
    code, _, err = _run(capsys, "data", "index", str(src), str(tmp_path / "out"), "--seq-len", "4")
    assert code == 2 and "not a whole number of uint16 tokens" in err and err.count("\n") == 1
    assert src.read_bytes() == b"\1\2\3" and sorted(os.listdir(tmp_path)) == ["odd.bin"]
    code, _, err = _run(capsys, "data", "plan", "--index", str(tmp_path / "nope"), "--seed", "1",
                        "--global-batch", "2", "--dp", "1")
    assert code == 2 and "not a scalai data index" in err


def test_mount_says_clearly_when_fuse_is_unavailable(index_path, tmp_path, capsys, monkeypatch):
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: False if p == "/dev/fuse" else real_exists(p))
    code, _, err = _run(capsys, "data", "mount", str(index_path), str(tmp_path / "mnt"), "--seed", "1",
                        "--global-batch", "4", "--dp", "2")
    assert code == 1 and err.count("\n") == 1 and "/dev/fuse does not exist" in err
    assert not (tmp_path / "mnt").exists()
    # Everything else works without FUSE.
    assert _run(capsys, "data", "plan", "--index", str(index_path), "--seed", "1", "--global-batch", "4",
                "--dp", "2", "--json")[0] == 0
