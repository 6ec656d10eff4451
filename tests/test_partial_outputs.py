"""Killed ``synth`` and ``reshard`` runs (issue 11, item 3): SIGTERM and SIGINT clean up on
the way out; what SIGKILL leaves is removed by the next run when its writer is provably
gone, and named with the command that removes it when that cannot be known."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cli_helpers import run
from scalai.checkpoint.staging import OWNER_FILE, owner_record

# Runs the real CLI, but stops inside the writer's commit, once every rank file is written
# at full size, and says where: the moment a kill hurts most.
_STOPPED_CLI = textwrap.dedent("""
    import sys, time
    from scalai.checkpoint import writer

    def commit(self, workers=None):
        print("staged " + self.staging, flush=True)
        time.sleep(300)

    writer.CheckpointWriter.commit = commit
    from scalai.cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from scalai.config import ParallelConfig
    from scalai.models.synth import write_synthetic_checkpoint

    path = tmp_path_factory.mktemp("partial-src") / "gpt"
    write_synthetic_checkpoint("gpt-tiny", path, ParallelConfig.parse("tp=2,pp=2,dp=1"), seed=5)
    return path


def _args(command: str, source, out) -> list[str]:
    if command == "synth":
        return ["synth", "gpt-tiny", str(out), "--layout", "tp=2,pp=1,dp=2"]
    return ["reshard", str(source), str(out), "--to", "tp=1,pp=2,dp=2"]


def _stopped(command: str, source, out):
    """A CLI process stopped mid-write, and its staging directory (full size by now)."""
    # SIGINT as a terminal sends it: a test run started in the background inherits it ignored
    proc = subprocess.Popen([sys.executable, "-c", _STOPPED_CLI, *_args(command, source, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline()
    assert line.startswith("staged "), (line, proc.stderr.read() if proc.poll() is not None else "")
    staging = line.split(" ", 1)[1].strip()
    assert os.path.basename(staging) == f".{out.name}.partial-{proc.pid}"
    assert sum(os.path.getsize(os.path.join(staging, f)) for f in os.listdir(staging)) > 1 << 20
    return proc, staging


# synth starts torch (its RNG states) in the subprocess: slower, so its variants are "slow"
# except one; reshard runs in about a second.
_SYNTH = pytest.param("synth", marks=pytest.mark.slow)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"),
                                             (signal.SIGINT, 130, "interrupted")])
@pytest.mark.parametrize("command", [_SYNTH, "reshard"])
def test_sigterm_cleans_up_like_sigint(tmp_path, source, command, sig, code, word):
    out = tmp_path / "out"
    proc, staging = _stopped(command, source, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"scalai: {word}" and "Traceback" not in err, err
    assert not os.path.exists(staging) and not out.exists()
    assert os.listdir(tmp_path) == []


def test_sigterm_stops_synth_like_sigint(tmp_path, source):
    test_sigterm_cleans_up_like_sigint(tmp_path, source, "synth", signal.SIGTERM, 143, "terminated")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", [_SYNTH, "reshard"])
def test_what_sigkill_leaves_the_next_run_removes(capsys, tmp_path, source, command):
    out = tmp_path / "out"
    proc, staging = _stopped(command, source, out)
    proc.kill()
    proc.wait(timeout=60)
    assert os.path.isdir(staging), "SIGKILL cannot be cleaned up after by the process itself"
    size = sum(os.path.getsize(os.path.join(staging, f)) for f in os.listdir(staging))

    r = run(capsys, *_args(command, source, tmp_path / "next"))
    assert r.code == 0, r.err
    assert not os.path.exists(staging)
    assert f"scalai: removed {staging} (" in r.err and f"its writer, pid {proc.pid}, is gone" in r.err, r.err
    assert size > 1 << 20
    assert sorted(os.listdir(tmp_path)) == ["next"]


def _fake_stale(parent, name: str, **owner_changes):
    path = parent / f".{name}.partial-4242"
    path.mkdir()
    (path / "rank-00000.safetensors").write_bytes(b"\0" * 100_000)
    if owner_changes.pop("no_record", False):
        return path
    record = {**owner_record(), **owner_changes}
    (path / OWNER_FILE).write_text(json.dumps(record))
    return path


@pytest.mark.parametrize("owner, reason", [
    ({"boot": "another-boot-or-machine", "host": "node17"}, "on node17, ran on another machine"),
    ({"pidns": "0:1"}, "ran on another machine, in another container"),
    ({"no_record": True}, "it has no owner record"),
])
def test_a_staging_directory_that_may_be_alive_is_named_not_removed(capsys, tmp_path, source, owner, reason):
    stale = _fake_stale(tmp_path, "elsewhere", pid=os.getpid(), **owner)
    r = run(capsys, "synth", "gpt-tiny", tmp_path / "next", "--layout", "tp=1,pp=1,dp=1")
    assert r.code == 0, r.err
    assert stale.is_dir(), "a staging directory whose writer may be alive was removed"
    lines = [line for line in r.err.splitlines() if str(stale) in line]
    assert len(lines) == 1 and reason in lines[0], r.err
    command = lines[0].rsplit(": ", 1)[1]
    assert command == f"rm -rf -- {stale}"
    subprocess.run(command, shell=True, check=True)  # the command given does remove it
    assert not stale.exists()


def test_a_running_writer_is_left_alone(capsys, tmp_path):
    live = _fake_stale(tmp_path, "live")  # this very process: alive
    r = run(capsys, "synth", "gpt-tiny", tmp_path / "next", "--layout", "tp=1,pp=1,dp=1")
    assert r.code == 0 and live.is_dir() and str(live) not in r.err, r.err


def test_a_reused_pid_is_not_taken_for_the_writer(capsys, tmp_path):
    """The record's PID is alive (this process) but started at another time: the writer
    is gone and the PID was reused."""
    stale = _fake_stale(tmp_path, "reused", pid=os.getpid(), start=owner_record()["start"] - 1)
    r = run(capsys, "synth", "gpt-tiny", tmp_path / "next", "--layout", "tp=1,pp=1,dp=1")
    assert r.code == 0 and not stale.exists() and f"removed {stale}" in r.err, r.err


def test_the_committed_checkpoint_holds_no_owner_record(tmp_path, source):
    assert OWNER_FILE not in os.listdir(source)
