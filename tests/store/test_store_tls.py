"""Stores over HTTPS as an operator runs them: push, a distributed reshard whose peer reads
verify the other stores' certificates, pull, compare; and the failures, each in one line
without the token: a client without the CA, a plain-HTTP client, a store whose CA bundle
does not verify its peers."""

from __future__ import annotations

import json

import pytest

from store_helpers import TOKEN, assert_pulled_the_lower_bound, deployment
from store_helpers import run_cli as run
from tls_certs import make_pki


@pytest.mark.slow
def test_stores_over_https_reshard_and_refuse_what_does_not_verify(stores, tiny_ckpt, tmp_path, capsys):
    pki = make_pki(tmp_path / "pki")
    serve = ("--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    a, b = stores(2, token=TOKEN, extra=(*serve, "--tls-ca", str(pki.ca)))
    (c,) = stores(1, token=TOKEN, extra=(*serve, "--tls-ca", str(pki.other_ca)))  # trusts none of its peers
    assert a.url.startswith("https://") and c.url.startswith("https://")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    urls = f"{a.url},{b.url}"
    client = ("--token-file", token_file, "--tls-ca", pki.ca)

    r = run(capsys, "store", "push", tiny_ckpt, "--job", "gpt", "--stores", urls, "-g", 4, *client)
    assert r.code == 0, r.err
    r = run(capsys, "store", "reshard", "--job", "gpt", "--to", "tp=2,pp=1,dp=4,zero=1", "--stores", urls, *client,
            "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    hosts = ["host0", "host1"]  # each host lacks the other's pipeline stage: read from the peer, over TLS
    assert_pulled_the_lower_bound(out, deployment("tp=2,pp=2,dp=2", 4, hosts),
                                  deployment("tp=2,pp=1,dp=4,zero=1", 4, hosts))
    assert out["cross_host_bytes"] > 0
    r = run(capsys, "store", "pull", tmp_path / "pulled", "--job", "gpt", "--stores", urls, *client)
    assert r.code == 0, r.err
    assert run(capsys, "reshard", tiny_ckpt, tmp_path / "local", "--to", "tp=2,pp=1,dp=4,zero=1").code == 0
    assert run(capsys, "compare", tmp_path / "pulled", tmp_path / "local").code == 0

    failures = [
        # no CA: this system's CAs do not know the test CA
        (("store", "ls", "--stores", urls, "--token-file", token_file), 1,
         "does not verify against this system's CAs (no --tls-ca given)"),
        (("store", "ls", "--stores", urls, "--token-file", token_file, "--tls-ca", pki.other_ca), 1,
         f"does not verify against the CA bundle --tls-ca {pki.other_ca}"),
        (("store", "ls", "--stores", a.url.replace("https:", "http:"), "--token-file", token_file), 1,
         "if it serves HTTPS (--tls-cert), use https:// and --tls-ca"),
        (("store", "ls", "--stores", urls, "--token-file", token_file, "--tls-ca", pki.key), 2,
         f"--tls-ca {pki.key} does not load as a PEM bundle of CA certificates"),
        # store host2 reads the version from host0 and host1, whose certificates its CA bundle does not verify
        (("store", "reshard", "--job", "gpt", "--to", "tp=2,pp=1,dp=4,zero=1", "--stores", f"{urls},{c.url}",
          "--hosts", "host2", "-g", 8, *client), 1, f"does not verify against the CA bundle --tls-ca {pki.other_ca}"),
    ]
    for args, code, fragment in failures:
        r = run(capsys, *args)
        assert r.code == code and len(r.err.strip().splitlines()) == 1 and fragment in r.err, (args, r.err)
        assert TOKEN not in r.err + r.out
    # the failed reshard changed nothing: the job is still readable at its version
    r = run(capsys, "store", "ls", "--stores", urls, *client, "--json")
    assert r.code == 0 and "gpt" in r.out, r.err
