"""The FUSE mount, run as a user runs it: ``scalai data mount`` in its own process.

These tests need FUSE (/dev/fuse, fusermount3, mfusepy). Without it they fail, unless
SCALAI_ALLOW_NO_FUSE=1 says this machine cannot have it.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scalai.data import build_index, global_order
from scalai.data.vfs import is_mounted

from data_helpers import concat_bytes

_SCALAI = [sys.executable, "-c", "import sys; from scalai.cli.main import main; sys.exit(main())"]


class Mount:
    """A ``scalai data mount`` process; waits until the mount answers."""

    def __init__(self, index: Path, mountpoint: Path, *args: str) -> None:
        self.mountpoint = mountpoint
        self.proc = subprocess.Popen([*_SCALAI, "data", "mount", str(index), str(mountpoint), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self._answers():
            if self.proc.poll() is not None:
                raise AssertionError(f"mount exited with {self.proc.returncode}: {self.proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                self.cleanup()
                raise AssertionError("mount did not come up in 60 s")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return is_mounted(self.mountpoint) and (self.mountpoint / "state.json").exists()
        except OSError:  # a stale mount the new process has not cleared yet
            return False

    def stop(self, sig: int) -> tuple[int, str]:
        self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, err.decode()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _wait_unmounted(self.mountpoint, 10)
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)


def _wait_unmounted(path: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while is_mounted(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not is_mounted(path)


@pytest.fixture
def corpus(tmp_path, text_dir):
    files = sorted(p for p in text_dir.rglob("*") if p.is_file())
    index = build_index([text_dir], tmp_path / "idx", 31)
    return index, concat_bytes(files)


@pytest.fixture
def mounted(fuse_ok, tmp_path, corpus):
    mounts = []

    def start(*args: str, mountpoint: Path | None = None) -> Mount:
        mount = Mount(corpus[0].path, mountpoint or tmp_path / "mnt", *args)
        mounts.append(mount)
        return mount

    yield start
    for mount in mounts:
        mount.cleanup()


def _check_rank_files(mnt: Path, dp: int, stream: bytes, seq_len: int = 31) -> list[list[int]]:
    """Compare every rank's files with the source bytes; returns each rank's ids."""
    per_rank = []
    for rank in range(dp):
        index = json.loads((mnt / f"rank-{rank}" / "index.json").read_text())
        ids = index["sample_id"]
        expected = [stream[i * seq_len: i * seq_len + seq_len + 1] for i in ids]
        assert (mnt / f"rank-{rank}" / "samples.bin").read_bytes() == b"".join(expected)
        for j, sample in enumerate(expected):
            assert (mnt / f"rank-{rank}" / f"{j:06d}.bin").read_bytes() == sample
        per_rank.append(ids)
    return per_rank


@pytest.mark.fuse
def test_mount_reads_source_bytes_before_and_after_a_dp_change(mounted, tmp_path, corpus):
    index, stream = corpus
    n = index.num_samples
    mount = mounted("--seed", "4", "--global-batch", "6", "--consumed", str(n - 4), "--dp", "4", "--steps", "2")
    mnt = mount.mountpoint
    assert sorted(os.listdir(mnt)) == ["rank-0", "rank-1", "rank-2", "rank-3", "state.json"]
    before = _check_rank_files(mnt, 4, stream)
    mapped = np.memmap(mnt / "rank-1" / "samples.bin", mode="r", dtype=np.uint8)  # mmap works too
    assert mapped.tobytes() == (mnt / "rank-1" / "samples.bin").read_bytes()
    del mapped
    # Step 0 of dp=4, then a finished step and a change to dp=5 (does not divide 6).
    (mnt / "state.json").write_text(json.dumps({"advance": 1, "dp": 5}))
    assert sorted(os.listdir(mnt)) == ["rank-0", "rank-1", "rank-2", "rank-3", "rank-4", "state.json"]
    after = _check_rank_files(mnt, 5, stream)
    step0 = sum((ids[: len(ids) // 2] for ids in before), [])
    step1 = sum((ids[: len(ids) // 2] for ids in after), [])
    assert np.array_equal(step0 + step1, global_order(n - 4, 12, n, 4))  # across the epoch end
    with pytest.raises(OSError):
        (mnt / "state.json").write_text(json.dumps({"dp": 7}))  # 6 samples cannot feed 7 ranks
    assert json.loads((mnt / "state.json").read_text())["dp"] == 5
    with pytest.raises(OSError):
        (mnt / "rank-0" / "samples.bin").write_bytes(b"x")
    code, err = mount.stop(signal.SIGTERM)
    assert code == 0, err
    assert not is_mounted(mnt) and os.listdir(mnt) == []
    assert "unmounted" in err and "Traceback" not in err


def _write_state(mnt: Path, data: bytes) -> None:
    """One write(2) to state.json, then close(2): an error of the write itself raises."""
    fd = os.open(mnt / "state.json", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@pytest.mark.fuse
@pytest.mark.parametrize("data", [
    b'{"epoch": 99999999999999999}',           # a position past what 64 bits count
    b'{"consumed": 9223372036854775807}',
    b'{"epoch": 1, "consumed": 1e999}',        # not a JSON number
    b"garbage",                                # can never become JSON: refused by write(), not close()
    b'{"dp": }',
    b"[" * 5000,                               # nested past the limit
])
def test_bad_state_json_writes_fail_at_write_and_change_nothing(mounted, data):
    mount = mounted("--seed", "1", "--global-batch", "4", "--dp", "2")
    mnt = mount.mountpoint
    before = (mnt / "state.json").read_bytes(), (mnt / "rank-1" / "index.json").read_bytes()
    fd = os.open(mnt / "state.json", os.O_WRONLY | os.O_TRUNC)
    try:
        with pytest.raises(OSError) as refused:
            os.write(fd, data)  # the write itself fails, not only the close after it
    finally:
        os.close(fd)  # and the close after a refused write does not fail again
    assert refused.value.errno == errno.EINVAL
    # the view is unchanged and still reads
    assert ((mnt / "state.json").read_bytes(), (mnt / "rank-1" / "index.json").read_bytes()) == before
    _write_state(mnt, b'{"advance": 1}')  # and takes a good change afterwards
    assert json.loads((mnt / "state.json").read_text())["consumed"] == 4
    code, err = mount.stop(signal.SIGTERM)
    assert code == 0 and "state.json not changed" in err and "Traceback" not in err, err


@pytest.mark.fuse
def test_a_change_written_in_pieces_is_applied_when_complete(mounted):
    mount = mounted("--seed", "1", "--global-batch", "4", "--dp", "2")
    fd = os.open(mount.mountpoint / "state.json", os.O_WRONLY | os.O_TRUNC)
    try:
        # cut inside a name, a literal and a number
        for piece in (b'{"dp', b'": 4, "micro_batch_size": nu', b'll, "advance": 1', b"0}"):
            os.write(fd, piece)
    finally:
        os.close(fd)
    state = json.loads((mount.mountpoint / "state.json").read_text())
    assert state["dp"] == 4 and state["consumed"] == 40 and state["micro_batch_size"] is None


@pytest.mark.fuse
def test_sigint_unmounts_cleanly(mounted):
    mount = mounted("--seed", "1", "--global-batch", "4", "--dp", "2")
    code, err = mount.stop(signal.SIGINT)
    assert code == 0 and not is_mounted(mount.mountpoint), err


@pytest.mark.fuse
def test_sigkill_leaves_no_hung_mount(mounted):
    mount = mounted("--seed", "1", "--global-batch", "4", "--dp", "2")
    os.kill(mount.proc.pid, signal.SIGKILL)
    mount.proc.wait(timeout=10)
    assert _wait_unmounted(mount.mountpoint, 30), "the mount survived its process"
    (mount.mountpoint / "probe").write_text("usable")  # not 'Transport endpoint is not connected'
    assert (mount.mountpoint / "probe").read_text() == "usable"
    (mount.mountpoint / "probe").unlink()


def _children(pid: int, name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        comm, rest = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if comm == name and int(rest[1]) == pid:
            found.append(int(entry.name))
    return found


@pytest.mark.fuse
def test_a_stale_mount_is_cleared_by_the_next_mount(mounted, tmp_path):
    # Kill the fusermount3 watcher first, then the mount: the kernel keeps a dead mount
    # ("Transport endpoint is not connected"), as after a crash of the whole machine's
    # process tree. The next mount at that place must clear it.
    mount = mounted("--seed", "1", "--global-batch", "4", "--dp", "2")
    watchers = _children(mount.proc.pid, "fusermount3")
    assert watchers, "auto_unmount should keep a fusermount3 watcher beside the mount"
    for pid in watchers:
        os.kill(pid, signal.SIGKILL)
    os.kill(mount.proc.pid, signal.SIGKILL)
    mount.proc.wait(timeout=10)
    with pytest.raises(OSError) as dead:
        os.listdir(mount.mountpoint)
    assert dead.value.errno == errno.ENOTCONN
    again = mounted("--seed", "1", "--global-batch", "4", "--dp", "3", mountpoint=mount.mountpoint)
    assert sorted(os.listdir(again.mountpoint)) == ["rank-0", "rank-1", "rank-2", "state.json"]
    code, err = again.stop(signal.SIGTERM)
    assert code == 0 and not is_mounted(again.mountpoint), err
    assert "stale FUSE mount" in err


@pytest.mark.fuse
def test_mount_refuses_a_non_empty_mountpoint_and_leaves_it_alone(fuse_ok, tmp_path, corpus):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    result = subprocess.run([*_SCALAI, "data", "mount", str(corpus[0].path), str(target), "--seed", "1",
                             "--global-batch", "4", "--dp", "2"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and not is_mounted(target)
    assert result.stderr.count("\n") == 1 and "not empty" in result.stderr
    assert (target / "mine.txt").read_text() == "keep"
