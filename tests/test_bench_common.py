"""The benchmarks' shared helpers: a scratch directory without room is refused in one line."""

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
