"""``scalai run`` with TLS on every server, as an operator switches it on: the coordinator,
both agents' stores and the workers' saves and loads speak HTTPS and verify certificates
against the CA; ``scalai scale`` over HTTPS makes the one reconfiguration (peer stores read
each other over TLS). Clients without the CA, or speaking plain HTTP, are refused in one
line; neither the run's token nor the agents' appears in the run directory, the logs, the
outputs or any process's arguments."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import pytest

from elastic_helpers import Coordinator, read_rows, run_cli
from scalai.elastic.timeline import read_timeline
from tls_certs import make_pki

HERE = Path(__file__).resolve().parent


def _one_line(result, code: int, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and fragment in lines[0], result.stderr


def _argv_with(secret: str) -> list[str]:
    """The command lines of this machine's processes that hold ``secret``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if secret.encode() in (proc / "cmdline").read_bytes():
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_a_run_with_tls_on_every_server_scales_over_https_and_never_shows_its_token(tmp_path, corpus_index):
    pki = make_pki(tmp_path / "pki")
    token = secrets.token_urlsafe(24)
    (tmp_path / "token").write_text(token)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "SCALAI_CACHE": str(tmp_path / "cache"), "SCALAI_KEEP_AGENTS": "1"}  # kept: their logs are searched
    env.pop("SCALAI_TOKEN", None)
    args = ["--hosts", 2, "--gpus-per-host", 1, "--steps", 10, "--layout", "tp=1,pp=1,dp=1", "--job", "tls-test",
            "--token-file", tmp_path / "token", "--tls-cert", pki.cert, "--tls-key", pki.key, "--tls-ca", pki.ca,
            "--commit-every", 0, "--out", out, "--module", "paced_trainer", "--", "--pace", "0.3", "--data",
            corpus_index]
    run, outputs, agents_root = Coordinator(args, env, tmp_path / "coordinator.log"), [], None
    proc = run.proc
    try:
        run.wait_for("generation 0: tp=1,pp=1,dp=1")
        control = json.loads((out / "control.json").read_text())
        agents_root = Path(control["agents_root"])
        agent_token = (agents_root / "token").read_text().strip()
        url = control["url"]
        assert url.startswith("https://127.0.0.1:")
        for extra, code, fragment in [
            ((), 1, "does not verify against this system's CAs (no --tls-ca given)"),
            (("--tls-ca", pki.other_ca), 1, f"does not verify against the CA bundle --tls-ca {pki.other_ca}"),
            (("--url", url.replace("https:", "http:")), 2, f"the coordinator serves HTTPS: use {url}"),
        ]:
            refused = run_cli("scale", "tls-test", 2, "--token-file", tmp_path / "token", *extra, env=env, timeout=120)
            _one_line(refused, code, fragment)
            outputs.append(refused.stdout + refused.stderr)
        scaled = run_cli("scale", "tls-test", 2, "--token-file", tmp_path / "token", "--tls-ca", pki.ca, env=env,
                         timeout=120)
        assert scaled.returncode == 0, scaled.stderr
        outputs.append(scaled.stdout + scaled.stderr)
        run.wait_for("back at step", "tp=1,pp=1,dp=2")
        assert not _argv_with(token) and not _argv_with(agent_token)
        assert proc.wait(180) == 0, "".join(run.text[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        try:
            texts = [p for p in (agents_root.rglob("*") if agents_root else ()) if p.is_file()
                     and p.name not in ("token", ".token")]  # the files that hold the tokens, 0600
            texts = [p.read_bytes() for p in [*texts, *(p for p in out.rglob("*") if p.is_file())]]
        finally:
            if agents_root is not None:
                shutil.rmtree(agents_root, ignore_errors=True)

    rows = read_rows(out / "metrics.jsonl")
    assert {r["step"] for r in rows} == set(range(1, 11))
    (change,) = read_timeline(out / "timeline.json")
    assert (change.to_layout, change.to_hosts) == ("tp=1,pp=1,dp=2", ["host0", "host1"])
    assert change.cross_host_bytes > 0  # host1's replica came from host0's store, over TLS
    everything = b"\n".join([*texts, "".join(run.text).encode(), *(o.encode() for o in outputs)])
    assert len(texts) > 10 and b"https://127.0.0.1:" in everything  # the logs were searched, and they say https
    assert token.encode() not in everything and agent_token.encode() not in everything
