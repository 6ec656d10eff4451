"""Transport security, pure and in-process: the validated TLS setting, and the one JSON/HTTP
layer of the coordinator, agents and ``scalai scale`` speaking HTTPS (a verified client
works; an unverified one, a plain-HTTP one and an HTTPS one to a plain server each fail in
one line that says what to do, without the token)."""

from __future__ import annotations

import queue
import socket

import pytest

from scalai.elastic.coordinator import AgentService
from scalai.elastic.wire import JsonClient, JsonServer, WireError
from scalai.tls import TLS_CA_ENV, Tls, TlsError, plain_warning
from tls_certs import make_pki

TOKEN = "secret-token-" + "k" * 24


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _ping_server(pki, **kw) -> JsonServer:
    return JsonServer({("GET", "/v1/ping"): (lambda r: (200, {"pong": True}), True)}, token=TOKEN, **kw)


def test_a_tls_setting_checks_its_files_and_says_which_option_is_wrong(pki, tmp_path):
    ok = Tls(str(pki.cert), str(pki.key), str(pki.ca))
    assert ok.serves and ok.options() == ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--tls-ca",
                                          str(pki.ca)]
    assert Tls(ca=str(pki.ca)).options() == ["--tls-ca", str(pki.ca)] and not Tls(ca=str(pki.ca)).serves
    assert ok.options(server=False) == ["--tls-ca", str(pki.ca)]
    assert Tls.from_options() is None and Tls.from_options(tls := None) is tls
    assert ok.env() == {TLS_CA_ENV: str(pki.ca)} and Tls.from_env({TLS_CA_ENV: str(pki.ca)}) == Tls(ca=str(pki.ca))
    assert Tls.from_env({}) is None
    encrypted = tmp_path / "encrypted.key"
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.key.read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    for kwargs, fragment in [
        ({"cert": str(pki.cert)}, "--tls-cert needs --tls-key"),
        ({"key": str(pki.key)}, "--tls-key needs --tls-cert"),
        ({"cert": str(tmp_path / "none.pem"), "key": str(pki.key)}, "--tls-cert"),
        ({"cert": str(pki.cert), "key": str(tmp_path)}, "is not a regular file"),
        ({"cert": str(pki.ca), "key": str(pki.key)}, "do not load as a PEM certificate and its private key"),
        ({"cert": str(pki.cert), "key": str(encrypted)}, "is encrypted"),
        ({"ca": str(pki.key)}, "--tls-ca"),
        ({"ca": "/dev/null"}, "is not a regular file"),
    ]:
        with pytest.raises(ValueError) as info:
            Tls(**kwargs)
        assert fragment in str(info.value) and "\n" not in str(info.value), (kwargs, str(info.value))


def test_files_are_made_absolute_for_the_processes_an_agent_starts(pki, tmp_path, monkeypatch):
    (tmp_path / "ca.pem").write_bytes(pki.ca.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert Tls(ca="ca.pem").ca == str(tmp_path / "ca.pem")


def test_a_verified_client_talks_https_and_the_others_fail_in_one_line(pki):
    server = _ping_server(pki, tls=Tls(str(pki.cert), str(pki.key)))
    try:
        assert server.url.startswith("https://127.0.0.1:")
        assert JsonClient(server.url, TOKEN, tls=Tls(ca=str(pki.ca))).get("/v1/ping") == {"pong": True}
        # by name too: the certificate's subjectAltName holds localhost
        by_name = server.url.replace("127.0.0.1", "localhost")
        assert JsonClient(by_name, TOKEN, tls=Tls(ca=str(pki.ca))).get("/v1/ping") == {"pong": True}
        with pytest.raises(TlsError) as no_ca:
            JsonClient(server.url, TOKEN, timeout=5).get("/v1/ping")
        assert "does not verify against this system's CAs (no --tls-ca given)" in str(no_ca.value)
        with pytest.raises(TlsError) as wrong_ca:
            JsonClient(server.url, TOKEN, timeout=5, tls=Tls(ca=str(pki.other_ca))).get("/v1/ping")
        assert f"--tls-ca {pki.other_ca}" in str(wrong_ca.value) and "certificate verify failed" in str(wrong_ca.value)
        with pytest.raises(WireError) as plain:  # plain HTTP to the HTTPS port: told where to go
            JsonClient(server.url.replace("https:", "http:"), TOKEN, timeout=5).get("/v1/ping")
        assert plain.value.status == 400 and f"serves HTTPS: use {server.url}" in plain.value.message
        for exc in (no_ca.value, wrong_ca.value, plain.value):
            assert TOKEN not in str(exc) and TOKEN not in repr(exc)
    finally:
        server.close()


def test_an_https_client_of_a_plain_server_is_told_it_does_not_serve_https(pki):
    server = _ping_server(pki)
    try:
        with pytest.raises(TlsError, match="if it does not serve HTTPS, use http://"):
            JsonClient(server.url.replace("http:", "https:"), TOKEN, timeout=5, tls=Tls(ca=str(pki.ca))).get("/v1/ping")
    finally:
        server.close()


def test_a_client_that_connects_and_says_nothing_does_not_stall_the_server(pki):
    """The TLS handshake runs on each request's thread: it used to run in ``accept`` on the
    serving thread, where one silent connection held every later client off."""
    server = _ping_server(pki, tls=Tls(str(pki.cert), str(pki.key)))
    try:
        with socket.create_connection((server.host, server.port)):
            assert JsonClient(server.url, TOKEN, timeout=5, tls=Tls(ca=str(pki.ca))).get("/v1/ping") == {"pong": True}
    finally:
        server.close()


def test_a_coordinator_serving_https_refuses_an_agent_whose_store_serves_plain_http(pki):
    service = AgentService(queue.Queue().put, {"job": "j", "trainer": {"module": "m"}}, dict, dict, token=TOKEN,
                           tls=Tls(str(pki.cert), str(pki.key)))
    body = {"name": "a", "incarnation": "i", "address": "10.0.0.5", "store": "http://10.0.0.5:7070",
            "devices": {"count": 1, "kind": "cpu"}}
    try:
        client = JsonClient(service.url, TOKEN, tls=Tls(ca=str(pki.ca)))
        with pytest.raises(WireError, match="serves plain HTTP: start the agent with --tls-cert/--tls-key"):
            client.post("/v1/agents/join", body)
        assert client.post("/v1/agents/join", {**body, "store": "https://10.0.0.5:7070"})["epoch"]
    finally:
        service.close()


def test_servers_off_loopback_without_tls_warn_what_an_eavesdropper_sees(pki):
    warning = plain_warning("the coordinator", "10.0.0.1", None)
    assert "the token in every request" in warning and "--tls-cert" in warning
    assert plain_warning("the coordinator", "127.0.0.1", None) is None
    assert plain_warning("the coordinator", "10.0.0.1", Tls(str(pki.cert), str(pki.key))) is None
    assert plain_warning("the coordinator", "10.0.0.1", Tls(ca=str(pki.ca))) is not None


def test_every_command_refuses_a_bad_tls_option_in_one_line_before_it_starts(pki, tmp_path, capsys):
    from scalai.cli.main import main

    for args, fragment in [
        (["store", "serve", "--root", tmp_path / "s", "--tls-cert", pki.cert], "--tls-cert needs --tls-key"),
        (["store", "ls", "--stores", "https://127.0.0.1:9", "--tls-ca", tmp_path / "none.pem"], "no such file"),
        (["agent", "--join", "127.0.0.1:9", "--name", "a", "--root", tmp_path / "a", "--tls-key", pki.key],
         "--tls-key needs --tls-cert"),
        (["run", "--steps", 2, "--out", tmp_path / "run", "--tls-cert", pki.ca, "--tls-key", pki.key],
         "do not load as a PEM certificate and its private key"),
        (["scale", "job", 2, "--url", "https://127.0.0.1:9", "--tls-ca", pki.key], "does not load as a PEM bundle"),
    ]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, (args, err)
    assert not any((tmp_path / d).exists() for d in ("s", "a", "run"))
