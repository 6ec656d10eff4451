"""The store commands as a new user runs them: two stores, push, reshard (distributed and
central), pull, compare against a local reshard; errors as one line naming the store."""

from __future__ import annotations

import json

from store_helpers import run_cli as run
from store_helpers import TOKEN, assert_pulled_the_lower_bound, deployment  # noqa: E402


def test_new_user_flow(stores, tiny_ckpt, tmp_path, capsys, monkeypatch):
    a, b = stores(2, token=TOKEN)
    urls = f"{a.url},{b.url}"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    r = run(capsys, "store", "push", tiny_ckpt, "--job", "gpt", "--stores", urls, "-g", "4",
            "--token-file", token_file)
    assert r.code == 0, r.err
    assert "pushed" in r.out and "gpt/v0" in r.out and "host0, host1" in r.out
    monkeypatch.setenv("SCALAI_TOKEN", TOKEN)  # the other way to give the token
    r = run(capsys, "store", "reshard", "--job", "gpt", "--to", "tp=2,pp=1,dp=4,zero=1", "--stores", urls,
            "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["mode"] == "distributed" and (out["source"], out["target"]) == ("v0", "v1")
    hosts = ["host0", "host1"]  # the README's example: each host lacks the other's pipeline stage
    assert_pulled_the_lower_bound(out, deployment("tp=2,pp=2,dp=2", 4, hosts),
                                  deployment("tp=2,pp=1,dp=4,zero=1", 4, hosts))
    assert out["cross_host_bytes"] > 0
    r = run(capsys, "store", "ls", "--stores", urls)
    assert r.code == 0 and "gpt/v1: tp=2,pp=1,dp=4,zero=1 committed" in r.out and "gpt/v0" not in r.out
    r = run(capsys, "store", "pull", tmp_path / "pulled", "--job", "gpt", "--stores", urls)
    assert r.code == 0 and "wrote" in r.out, r.err
    r = run(capsys, "reshard", tiny_ckpt, tmp_path / "local", "--to", "tp=2,pp=1,dp=4,zero=1")
    assert r.code == 0, r.err
    r = run(capsys, "compare", tmp_path / "pulled", tmp_path / "local")
    assert r.code == 0 and r.out.startswith("equal"), r.out + r.err
    # central mode, back to the original layout; then the pulled state equals the original
    r = run(capsys, "store", "reshard", "--job", "gpt", "--to", "tp=2,pp=2,dp=2", "--stores", urls, "--central")
    assert r.code == 0 and "central" in r.out, r.err
    r = run(capsys, "store", "pull", tmp_path / "back", "--job", "gpt", "--stores", urls)
    r = run(capsys, "compare", tmp_path / "back", tiny_ckpt)
    assert r.code == 0, r.out + r.err
    r = run(capsys, "store", "rm", "--job", "gpt", "--stores", urls)
    assert r.code == 0 and "from 2 of 2 stores" in r.out


def test_openapi_command_prints_the_document(capsys):
    from scalai.store.openapi import SPEC

    r = run(capsys, "store", "openapi")
    assert r.code == 0 and json.loads(r.out) == json.loads(json.dumps(SPEC))


def test_errors_are_one_line(stores, tiny_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SCALAI_TOKEN", raising=False)
    (a,) = stores(1, token=TOKEN)
    r = run(capsys, "store", "ls", "--stores", a.url)  # no token
    assert r.code == 1 and r.err.count("\n") == 1 and "requires a token" in r.err
    monkeypatch.setenv("SCALAI_TOKEN", TOKEN)
    r = run(capsys, "store", "push", tiny_ckpt, "--job", "gpt", "--stores", a.url, "-g", "4")
    assert r.code == 2 and "has 8 ranks but the placement has 4 devices" in r.err, r.err
    a.kill()
    r = run(capsys, "store", "pull", tmp_path / "x", "--job", "gpt", "--stores", a.url)
    assert r.code == 1 and r.err.count("\n") == 1
    assert f"store {a.url} is unreachable" in r.err and "scalai store serve" in r.err
    r = run(capsys, "store", "reshard", "--job", "../x", "--to", "tp=1", "--stores", "ftp://nope")
    assert r.code == 2 and "is not like http://HOST:PORT" in r.err
    monkeypatch.delenv("SCALAI_TOKEN")
    r = run(capsys, "store", "serve", "--root", tmp_path / "r", "--host", "0.0.0.0")
    assert r.code == 2 and "refusing to listen on 0.0.0.0 without a token" in r.err
