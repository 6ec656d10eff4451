"""Bad arguments and unusable outputs across the CLI (issue 11, item 7): one line, a
non-zero exit, nothing created, and the same answer for the same kind of value whichever
command takes it."""

import errno
import os
import re
import shutil
import socket
import subprocess
import sys

import click
import pytest

from cli_helpers import run, tree_digest


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from scalai.config import ParallelConfig
    from scalai.models.synth import write_synthetic_checkpoint

    path = tmp_path_factory.mktemp("args") / "gpt"
    write_synthetic_checkpoint("gpt-tiny", path, ParallelConfig.parse("tp=2,pp=1,dp=1"), seed=2)
    return path


@pytest.mark.parametrize("args, fragment", [
    # the same count refused alike by every command that takes it
    (["reshard", "{ckpt}", "{out}", "--to", "tp=1,pp=1,dp=1", "-g", "0"], "'-g': 0 is out of range: it must be an integer >= 1"),
    (["plan", "{ckpt}", "--to", "tp=1,pp=1,dp=1", "-g", "0"], "'-g': 0 is out of range: it must be an integer >= 1"),
    (["demo-reshard", "-g", "0", "--out", "{out}"], "'-g': 0 is out of range: it must be an integer >= 1"),
    (["store", "push", "{ckpt}", "--job", "j", "--stores", "http://127.0.0.1:9", "-g", "0"], "0 is out of range"),
    (["reshard", "{ckpt}", "{out}", "--to", "tp=1,pp=1,dp=1", "-j", "-5"], "'-j': -5 is out of range: it must be an integer >= 1"),
    (["layouts", "gpt-tiny", "-n", "4", "--top", "-1"], "'--top': -1 is out of range"),
    (["layouts", "gpt-tiny", "-n", "0"], "'-n': 0 is out of range"),
    (["scale", "job", "0"], "0 is out of range: it must be an integer >= 1"),
    (["train", "--layout", "tp=1,pp=1,dp=1", "--steps", "0"], "'--steps': 0 is out of range"),
    (["data", "plan", "--index", "{out}", "--seed", "1", "--global-batch", "4", "--dp", "0"], "'--dp': 0 is out of range"),
    # positive numbers: NaN and infinity are not numbers of anything
    (["layouts", "gpt-tiny", "-n", "4", "-M", "nan"], "'-M': nan is not a finite number > 0"),
    (["layouts", "gpt-tiny", "-n", "4", "-M", "-1"], "'-M': -1 is out of range: it must be a number > 0"),
    (["run", "--steps", "4", "--out", "{out}", "--lr", "inf"], "'--lr': inf is not a finite number > 0"),
    (["train", "--layout", "tp=1,pp=1,dp=1", "--steps", "4", "--lr", "nan"], "'--lr': nan is not a finite number"),
    # ports, seeds, positions
    (["store", "serve", "--root", "{out}", "--port", "99999"], "'--port': 99999 is out of range: it must be an integer >= 0 and <= 65535"),
    (["run", "--steps", "4", "--out", "{out}", "--agents", "0", "--listen", "127.0.0.1:0"], "'--agents': 0 is out of range"),
    (["run", "--steps", "4", "--out", "{out}", "--dead-after", "nan"], "'--dead-after': nan is not a finite number"),
    (["run", "--steps", "4", "--out", "{out}", "--commit-mode", "later"], "'--commit-mode': 'later' is not one of"),
    (["synth", "gpt-tiny", "{out}", "--layout", "tp=1,pp=1,dp=1", "--seed", "-3"], "'--seed': -3 is out of range"),
    (["data", "order", "--index", "{out}", "--seed", "1", "--count", "1", "--start", "9" * 30], "'--start': 9999"),
    # sizes and rates
    (["store", "serve", "--root", "{out}", "--memory-limit", "-5G"], "'--memory-limit': '-5G' is not a positive size"),
    (["store", "serve", "--root", "{out}", "--max-upload", "0"], "'--max-upload': '0' is not a positive size"),
    (["store", "serve", "--root", "{out}", "--link", "-1gbit"], "'--link': '-1gbit' is not a positive rate"),
    # layouts
    (["synth", "gpt-tiny", "{out}", "--layout", ""], "layout '' is empty"),
    (["reshard", "{ckpt}", "{out}", "--to", " , "], "is empty"),
])
def test_bad_arguments_get_one_line_and_create_nothing(capsys, tmp_path, ckpt, args, fragment):
    before = tree_digest(ckpt)
    r = run(capsys, *[a.format(ckpt=ckpt, out=tmp_path / "out") for a in args])
    assert r.code == 2, r.err
    assert len(r.err.strip().splitlines()) == 1 and fragment in r.err, r.err
    assert os.listdir(tmp_path) == []
    assert tree_digest(ckpt) == before


def _all_params():
    from scalai.cli.main import _register, cli

    _register()

    def walk(command, path):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, f"{path} {name}")
        else:
            for param in command.params:
                yield path, param
    yield from walk(cli, "scalai")


def test_every_numeric_option_uses_a_shared_validator():
    """No command parses a number with click's bare INT or FLOAT (which take 0, -5 or nan
    wherever a count, a port or a size is meant): each uses one of cli.params' types."""
    from scalai.cli import params

    shared = {getattr(params, name) for name in params.__all__}
    loose = [f"{path} {param.name}" for path, param in _all_params()
             if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType))
             and param.type not in shared]
    assert loose == []


def test_output_inside_the_input_is_refused(capsys, tmp_path, ckpt):
    src = tmp_path / "src"
    shutil.copytree(ckpt, src)
    before = tree_digest(src)
    for out in (src / "inside", src / "a" / "b", tmp_path / "link" / "x"):
        if out.parent.name == "link":
            os.symlink(src, out.parent)  # the same directory through a symbolic link
        r = run(capsys, "reshard", src, out, "--to", "tp=1,pp=1,dp=1")
        assert r.code == 2 and "lies inside the input" in r.err and len(r.err.splitlines()) == 1, r.err
        assert tree_digest(src) == before
        assert sorted(os.listdir(src)) == sorted(os.listdir(ckpt))


def test_a_pseudo_filesystem_is_named_as_such(capsys, tmp_path):
    r = run(capsys, "synth", "gpt-tiny", "/proc/scalai-test-out", "--layout", "tp=1,pp=1,dp=1")
    assert r.code == 2, r.err
    assert "/proc is not on a disk: its filesystem reports no capacity" in r.err, r.err
    assert "0.0 GiB" not in r.err


def test_too_little_space_names_both_sizes(capsys, tmp_path, ckpt, monkeypatch):
    real = os.statvfs

    class Full:
        def __init__(self, st):
            self.f_flag, self.f_blocks, self.f_frsize, self.f_bavail = st.f_flag, st.f_blocks, 4096, 256

    monkeypatch.setattr(os, "statvfs", lambda p: Full(real(p)))
    r = run(capsys, "reshard", ckpt, tmp_path / "out", "--to", "tp=1,pp=1,dp=1")
    assert r.code == 2 and re.search(r"needs 3\.\d\d MiB but only 1\.00 MiB are free under", r.err), r.err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("code, fragment", [
    (errno.ENOSPC, r"No space left on device while (creating a file of \d+ bytes|writing [\w.]+) "
                   r"\(/.*/rank-00000.safetensors\); the disk is full: free some space or write elsewhere"),
    (errno.EROFS, r"Read-only file system .*; the filesystem is read-only: write elsewhere"),
    (errno.EIO, r"Input/output error .*; an I/O error: check the disk"),
])
@pytest.mark.parametrize("when", ["creating", "writing"])
def test_filesystem_errors_mid_write_are_one_line_and_leave_nothing(capsys, tmp_path, ckpt, monkeypatch,
                                                                    code, fragment, when):
    """Space that runs out (or a disk that fails) after the checks passed, as a rank file is
    created or as tensors are written into it (files are sparse: blocks are allocated as
    they are written): the error reaches the user as one line naming the file; the staging
    directory is gone."""
    real_pwrite, calls = os.pwrite, []

    def fail(*args):
        raise OSError(code, os.strerror(code))

    def pwrite(fd, data, offset):
        calls.append(offset)
        if when == "writing" and len(calls) == 1:  # the header
            return real_pwrite(fd, data, offset)
        return fail()

    if when == "creating":
        monkeypatch.setattr(os, "ftruncate", fail)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "copy_file_range", fail)
    monkeypatch.setattr(os, "posix_fallocate", fail)
    r = run(capsys, "reshard", ckpt, tmp_path / "out", "--to", "tp=1,pp=1,dp=1")
    assert r.code == 1, r.err
    assert len(r.err.strip().splitlines()) == 1 and re.search(fragment, r.err), r.err
    assert os.listdir(tmp_path) == []


def _can_mount() -> str | None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs root and unshare(1) for a private mount namespace"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs scalai-test /mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount in a private namespace: {probe.stderr.strip()}"


@pytest.mark.skipif(_can_mount() is not None, reason=str(_can_mount()))
@pytest.mark.parametrize("options, fragment", [
    ("size=1m", r"needs 3\.\d\d MiB but only 1\.00 MiB are free under"),
    ("ro", "is on a read-only filesystem; choose another output directory"),
])
def test_real_full_and_read_only_filesystems(tmp_path, ckpt, options, fragment):
    """``reshard`` into a real 1 MiB tmpfs and a read-only one, mounted in a private mount
    namespace (nothing is visible outside the test)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o {options} scalai-test {mnt} && exec {sys.executable} -c "
              f"'import sys; from scalai.cli.main import main; sys.exit(main(sys.argv[1:]))' "
              f"reshard {ckpt} {mnt}/out --to tp=1,pp=1,dp=1")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and re.search(fragment, proc.stderr), \
        proc.stderr


@pytest.mark.timeout(120)
def test_store_serve_on_a_busy_port_creates_nothing(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        proc = subprocess.run([sys.executable, "-c", "import sys; from scalai.cli.main import main; "
                               "sys.exit(main(sys.argv[1:]))", "store", "serve", "--root", str(tmp_path / "root"),
                               "--port", str(port)], capture_output=True, text=True, timeout=100)
    finally:
        busy.close()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"scalai: error: cannot listen on 127.0.0.1:{port}: the port is in use "
                                   f"(another store or program); choose another --port, or --port 0 for any free one")
    assert not (tmp_path / "root").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["fifo", "zero", "dir"])
@pytest.mark.parametrize("args", [
    ["store", "ls", "--stores", "http://127.0.0.1:9", "--token-file", "{file}"],
    ["run", "--steps", "4", "--out", "{out}", "--schedule", "{file}"],
    ["plot", "{file}", "-o", "{out}.png"],
    ["data", "plan", "--index", "{idx}", "--state", "{file}", "--dp", "1"],
], ids=["token-file", "schedule", "metrics", "state"])
def test_files_given_as_options_are_read_within_bounds(capsys, tmp_path, kind, args):
    """A FIFO (would block forever), /dev/zero (would read without end) or a directory
    where a file is expected: one line, nothing created."""
    path = tmp_path / "input"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        os.symlink("/dev/zero", path)
    else:
        path.mkdir()
    made = ["input"]
    if "{idx}" in args:
        from scalai.data import build_index

        (tmp_path / "corpus.txt").write_bytes(b"scalai " * 100)
        build_index([tmp_path / "corpus.txt"], tmp_path / "idx", 8)
        made += ["corpus.txt", "idx"]
    r = run(capsys, *[a.format(file=path, out=tmp_path / "out", idx=tmp_path / "idx") for a in args])
    assert r.code == 2, r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, r.err
    assert str(path) in r.err or "Invalid value" in r.err, r.err
    assert sorted(os.listdir(tmp_path)) == sorted(made)
