"""The TLS options every server and client command shares (one spelling, one help text).

Servers (``scalai run``, ``scalai agent``, ``scalai store serve``) take
``--tls-cert FILE --tls-key FILE`` (serve HTTPS) and ``--tls-ca FILE`` (verify peers);
clients (``scalai scale``, ``scalai store push|reshard|pull|ls|rm``) take ``--tls-ca``.
The command turns them into one :class:`scalai.tls.Tls` (:func:`make_tls`), which checks
the files before anything starts.
"""

from __future__ import annotations

import click

__all__ = ["tls_server_options", "tls_client_option", "make_tls"]

_FILE = click.Path(dir_okay=False)
_CA_HELP = ("CA bundle (PEM) that https:// peers' certificates must verify against [default: this system's "
            "CAs]")


def tls_client_option(f):
    return click.option("--tls-ca", type=_FILE, default=None, help=_CA_HELP)(f)


def tls_server_options(f):
    f = tls_client_option(f)
    f = click.option("--tls-key", type=_FILE, default=None, help="the private key of --tls-cert (PEM, unencrypted)")(f)
    return click.option("--tls-cert", type=_FILE, default=None,
                        help="serve HTTPS with this certificate (PEM; its subjectAltName names the addresses "
                             "peers use); with --tls-key")(f)


def make_tls(tls_cert: str | None = None, tls_key: str | None = None, tls_ca: str | None = None):
    """The :class:`~scalai.tls.Tls` of the options (None when none is given).

    Raises:
        ValueError: see :class:`~scalai.tls.Tls`.
    """
    from ..tls import Tls

    return Tls.from_options(tls_cert, tls_key, tls_ca)
