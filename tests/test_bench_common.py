"""The benchmarks' shared helpers: a scratch directory without room is refused in one line;
the reshard benchmark's file-copy floors copy what they claim."""

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _common import choose_workdir  # noqa: E402


def test_a_requested_workdir_without_room_is_refused_before_anything_is_written(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    target = tmp_path / "scratch"
    with pytest.raises(SystemExit) as exc:
        choose_workdir(free * 2, 0, str(target), "bench")
    message = str(exc.value)
    assert message.startswith(f"--workdir {target}: the run writes about") and "\n" not in message
    assert not target.exists()
    path, where = choose_workdir(1 << 20, 0, str(target), "bench")  # room enough: a fresh directory
    assert os.path.isdir(path) and path.startswith(str(target)) and where.startswith(path)


@pytest.mark.parametrize("mode", ["kernel", "buffered", "checked"])
@pytest.mark.parametrize("sizes", [[5000], [3000, 2500], [1200, 1300, 1500, 900]])
def test_the_file_copy_floor_copies_each_old_byte_once_in_turn(tmp_path, monkeypatch, mode, sizes):
    """The reshard benchmark's floors (c'), (c'b) and (c''): each new file holds the next bytes of
    the old files read one after the other (wrapping around once all were read), so that no
    two new files start at the same old byte; chunks shared over threads land in place."""
    import numpy as np
    import reshard_baselines

    monkeypatch.setattr(reshard_baselines, "_COPY_CHUNK", 700)  # several chunks per file
    monkeypatch.setattr(reshard_baselines, "_BLOCK", 300)  # several blocks per chunk
    src = tmp_path / "old"
    src.mkdir()
    old = [np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes() for i, n in enumerate([1700, 2300])]
    for i, data in enumerate(old):
        (src / f"rank-{i:05d}.safetensors").write_bytes(data)
    reshard_baselines.file_copy(str(src), str(tmp_path / "new"), sizes, workers=3, mode=mode)
    stream = b"".join(old) * 3
    at = 0
    for rank, size in enumerate(sizes):
        assert (tmp_path / "new" / f"rank-{rank:05d}.bin").read_bytes() == stream[at % 4000:at % 4000 + size]
        at += size


def test_the_file_copy_floor_refuses_an_unknown_mode_before_writing(tmp_path):
    import reshard_baselines

    with pytest.raises(ValueError, match="mode 'fast' is not one of kernel, buffered, checked"):
        reshard_baselines.file_copy(str(tmp_path), str(tmp_path / "new"), [10], workers=1, mode="fast")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("old, new", [("tp=2,pp=1,dp=1", "tp=1,pp=2,dp=1"),
                                      ("tp=1,pp=2,dp=1", "tp=1,pp=1,dp=2,zero=1")])
def test_the_window_copy_floor_fills_the_new_arrays_with_the_new_layouts_values(tmp_path, old, new):
    """(c-t): the plan's windows copied between arrays leave every new local tensor equal
    to that of a checkpoint synthesized directly in the new layout (padding aside, which
    it leaves as it found it: zero here), whatever threads got which windows."""
    import numpy as np
    import reshard_baselines

    from scalai.checkpoint import Checkpoint
    from scalai.config import ParallelConfig, Placement
    from scalai.dtypes import raw_numpy
    from scalai.models.synth import write_synthetic_checkpoint
    from scalai.planner import Deployment, make_plan

    old_cfg, new_cfg = ParallelConfig.parse(old), ParallelConfig.parse(new)
    write_synthetic_checkpoint("gpt-tiny", str(tmp_path / "old"), old_cfg)
    write_synthetic_checkpoint("gpt-tiny", str(tmp_path / "new"), new_cfg)
    with Checkpoint.open(str(tmp_path / "old")) as ckpt:
        old_ptc = ckpt.ptc
        source = {r: {n: np.array(ckpt.view(r, n)) for n, _ in old_ptc.rank_shards(r)}
                  for r in range(old_cfg.world_size)}
    new_ptc = old_ptc.relayout(new_cfg)
    dest = {r: {n: np.zeros(s.shape, raw_numpy(new_ptc.spec(n).dtype)) for n, s in new_ptc.rank_shards(r)}
            for r in range(new_cfg.world_size)}
    both = Placement(gpus_per_host=max(old_cfg.world_size, new_cfg.world_size))
    copy = reshard_baselines.WindowCopy(make_plan(Deployment(old_ptc, both), Deployment(new_ptc, both)),
                                        source, dest, workers=3)
    assert sum(map(len, copy.dealt)) > 3  # every thread has windows to copy
    copy.run()
    with Checkpoint.open(str(tmp_path / "new")) as ref:
        for r, tensors in dest.items():
            for n, array in tensors.items():
                assert np.array_equal(array, ref.view(r, n)), (r, n)


def test_every_checked_copy_of_the_floor_benchmark_copies_its_part_exactly(tmp_path):
    """benchmarks/checked_copy.py: each way of copying (kernel copy, read + CRC + write, a
    CRC through a map before or after the kernel copy) writes its part of the source,
    byte for byte, into a file of its own, with blocks that do not divide the part."""
    import os

    import numpy as np
    from checked_copy import methods

    data = np.random.default_rng(3).integers(0, 256, 3 * 4096 * 7 + 100, dtype=np.uint8).tobytes()
    src = tmp_path / "source.bin"
    src.write_bytes(data)
    lo, hi = 4096 * 5, len(data)  # a part that starts on a page (a map's offset) and ends off one
    for name, (copy, _) in methods([4096, 3 * 4096]).items():
        fi = os.open(src, os.O_RDONLY)
        fo = os.open(tmp_path / "part", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            copy(fi, fo, lo, hi, 3 * 4096)
        finally:
            os.close(fi)
            os.close(fo)
        assert (tmp_path / "part").read_bytes() == data[lo:hi], name
