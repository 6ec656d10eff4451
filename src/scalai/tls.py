"""Transport security: one validated TLS setting for every server and client of scalai.

:class:`Tls` is what ``--tls-cert FILE --tls-key FILE`` (serve HTTPS) and ``--tls-ca FILE``
(verify peers against this CA bundle) make. It checks itself on construction (both files
of a pair given, every file a regular file that loads), so a typo fails before anything
starts, and it is passed down to each server and client that needs it: the coordinator's
and agents' JSON server and clients (:mod:`scalai.elastic.wire`), the stores' aiohttp
server and their peer reads, and the stores' urllib3 clients. Workers started by an agent
find the CA bundle in ``$SCALAI_TLS_CA`` (:meth:`Tls.env`, :meth:`Tls.from_env`), as they
find the token in ``$SCALAI_TOKEN``: nothing else is global.

:func:`tls_failure` turns what a TLS client sees go wrong (a certificate that does not
verify, a peer that does not speak TLS) into one line saying what to do.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Mapping

from .errors import ScalaiError

__all__ = ["Tls", "TlsError", "TLS_CA_ENV", "client_context", "plain_warning", "tls_failure", "find_ssl_error", "PLAIN_HINT"]

#: Where a worker finds the CA bundle its agent verifies peers with.
TLS_CA_ENV = "SCALAI_TLS_CA"
#: Said when a plain-HTTP request found nothing that answers HTTP.
MAX_PEM = 16 << 20  # bytes; a system's whole CA bundle is a few hundred KiB
PLAIN_HINT = "if it serves HTTPS (--tls-cert), use https:// and --tls-ca"


class TlsError(ScalaiError):
    """A TLS connection could not be made safely: the peer's certificate does not verify
    against the CA bundle, or the peer does not speak TLS. Not retried: it will not heal."""


def _no_password() -> bytes:
    raise ValueError("encrypted")


def _regular(path: str, flag: str) -> str:
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise ValueError(f"{flag} {path}: no such file; give a PEM file")
    if not os.path.isfile(full):
        raise ValueError(f"{flag} {path} is not a regular file; give a PEM file")
    if os.path.getsize(full) > MAX_PEM:
        raise ValueError(f"{flag} {path} holds more than {MAX_PEM >> 20} MiB; give a PEM file")
    return full


@dataclass(frozen=True)
class Tls:
    """TLS for servers (``cert`` and ``key``: serve HTTPS) and clients (``ca``: the CA
    bundle peers' certificates must verify against; None: this system's CA store).

    Paths are made absolute (agents hand them to their store and workers, which run in
    other directories). Files are PEM; a key must not be encrypted (nobody would type its
    passphrase in a long-running agent).

    Raises:
        ValueError: a cert without its key (or the reverse), a missing or unreadable file,
            a certificate and key that do not load or do not match, a CA bundle that does
            not load; one line naming the option.
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            given, missing = ("--tls-cert", "--tls-key") if self.key is None else ("--tls-key", "--tls-cert")
            raise ValueError(f"{given} needs {missing}: a server presents its certificate and proves it with "
                             f"the certificate's private key; give both")
        if self.cert is not None:
            object.__setattr__(self, "cert", _regular(self.cert, "--tls-cert"))
            object.__setattr__(self, "key", _regular(self.key, "--tls-key"))
            self.server_context()
        if self.ca is not None:
            object.__setattr__(self, "ca", _regular(self.ca, "--tls-ca"))
            self.client_context()

    @classmethod
    def from_options(cls, cert: str | None = None, key: str | None = None, ca: str | None = None) -> Tls | None:
        """The setting of ``--tls-cert/--tls-key/--tls-ca`` (None when none is given)."""
        if cert is None and key is None and ca is None:
            return None
        return cls(cert, key, ca)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Tls | None:
        """What a worker's agent gave it: the CA bundle in ``$SCALAI_TLS_CA`` (None: none)."""
        ca = (os.environ if environ is None else environ).get(TLS_CA_ENV)
        return cls(ca=ca) if ca else None

    @property
    def serves(self) -> bool:
        """Whether a server with this setting speaks HTTPS."""
        return self.cert is not None

    def env(self) -> dict[str, str]:
        """The environment that gives a child process this setting's client side."""
        return {TLS_CA_ENV: self.ca} if self.ca else {}

    def options(self, server: bool = True) -> list[str]:
        """This setting as command-line options (``server``: the cert and key too)."""
        out = ["--tls-cert", self.cert, "--tls-key", self.key] if server and self.serves else []
        return out + (["--tls-ca", self.ca] if self.ca else [])

    def server_context(self) -> ssl.SSLContext:
        if not self.serves:
            raise ValueError("serving HTTPS needs --tls-cert and --tls-key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key, password=_no_password)
        except ValueError:
            raise ValueError(f"--tls-key {self.key} is encrypted; give the key without a passphrase "
                             f"(openssl pkey -in KEY -out PLAIN.key), readable only by its owner") from None
        except ssl.SSLError as exc:
            raise ValueError(f"--tls-cert {self.cert} and --tls-key {self.key} do not load as a PEM certificate "
                             f"and its private key ({_reason(exc)}); give the server's certificate and the key it "
                             f"was made with") from None
        except OSError as exc:
            raise ValueError(f"cannot read --tls-cert {self.cert} / --tls-key {self.key}: "
                             f"{exc.strerror or exc}") from None
        return context

    def client_context(self) -> ssl.SSLContext:
        """Verifies the server's certificate and that it names the address connected to."""
        try:
            return ssl.create_default_context(cafile=self.ca)
        except ssl.SSLError as exc:
            raise ValueError(f"--tls-ca {self.ca} does not load as a PEM bundle of CA certificates "
                             f"({_reason(exc)}); give the CA certificate that signed the servers' "
                             f"certificates") from None
        except OSError as exc:
            raise ValueError(f"cannot read --tls-ca {self.ca}: {exc.strerror or exc}") from None


def plain_warning(what: str, host: str, tls: Tls | None) -> str | None:
    """The warning a server off loopback without TLS prints (None: loopback, or TLS on)."""
    from .net import is_loopback

    if (tls is not None and tls.serves) or is_loopback(host):
        return None
    return (f"warning: {what} serves plain HTTP on {host}: anyone on that network can read the token in every "
            f"request (and with it control the job), every tensor byte and the metrics; give --tls-cert/--tls-key "
            f"(docs/elastic.md, 'Transport security')")


def client_context(tls: Tls | None) -> ssl.SSLContext:
    """The context an HTTPS client uses: ``tls``'s CA bundle, or this system's."""
    return (tls or Tls()).client_context()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and getattr(exc, "verify_message", None):
        return f"certificate verify failed: {exc.verify_message}"
    return str(getattr(exc, "reason", None) or exc).strip()


def find_ssl_error(exc: BaseException | None) -> ssl.SSLError | None:
    """The :class:`ssl.SSLError` inside ``exc`` (urllib3 and aiohttp wrap it), or None."""
    seen = 0
    stack = [exc]
    while stack and seen < 16:
        e = stack.pop()
        seen += 1
        inner = getattr(e, "certificate_error", None)  # aiohttp's wrapper is an ssl error itself
        if isinstance(e, ssl.SSLError) and not isinstance(inner, BaseException):
            return e
        if isinstance(e, BaseException):
            stack.extend(x for x in (*e.args, e.__cause__, e.__context__, getattr(e, "certificate_error", None),
                                     getattr(e, "os_error", None)) if isinstance(x, BaseException))
    return None


def tls_failure(exc: BaseException, url: str, tls: Tls | None, what: str = "") -> TlsError | None:
    """A :class:`TlsError` saying what to do, if ``exc`` (from a client talking to ``url``)
    is a TLS failure; None otherwise. ``what`` names the peer (``"store host1"``)."""
    found = find_ssl_error(exc)
    if found is None:
        return None
    peer = f"{what} ({url})" if what else url
    if isinstance(found, ssl.SSLCertVerificationError):
        against = f"the CA bundle --tls-ca {tls.ca}" if tls and tls.ca else "this system's CAs (no --tls-ca given)"
        return TlsError(f"the certificate of {peer} does not verify against {against}: {_reason(found)}; give "
                        f"--tls-ca FILE with the CA that signed it (its subjectAltName must name the address used)")
    return TlsError(f"no TLS connection to {peer} ({_reason(found)}); if it does not serve HTTPS, use http:// "
                    f"(or start it with --tls-cert/--tls-key)")
