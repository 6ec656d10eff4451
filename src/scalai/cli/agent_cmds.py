"""``scalai agent``: the per-machine agent of elastic runs (see scalai.elastic.agent)."""

from __future__ import annotations

import click

from .group import cli
from .params import COUNT, NON_NEGATIVE, POSITIVE_NUMBER
from .tls_options import make_tls, tls_server_options


@cli.command("agent")
@click.option("--join", "join", required=True, help="the coordinator: HOST:PORT (scalai run --listen)")
@click.option("--name", required=True, help="this machine's name in the job (unique per machine)")
@click.option("--root", required=True, type=click.Path(file_okay=False),
              help="this agent's directory: its workers' files, logs, data copy (and store, see --store-root)")
@click.option("--devices", "-n", default=None, type=COUNT,
              help="devices this machine offers [default: 1 for cpu; every GPU torch sees for cuda]")
@click.option("--device", "kind", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="the kind of device (reported to the coordinator)")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="the run's token (required off loopback; or SCALAI_TOKEN)")
@tls_server_options
@click.option("--address", default=None, help="this machine's address for its peers [default: the one routing "
                                              "to the coordinator]")
@click.option("--store-root", type=click.Path(file_okay=False), default=None,
              help="where the store keeps shards [default: ROOT/store]; put it on tmpfs (/dev/shm)")
@click.option("--standby", type=NON_NEGATIVE, default=None,
              help="started workers kept waiting [default: one per device]")
@click.option("--link", default=None, help="limit this store's traffic with other stores, e.g. 1gbit "
                                           "(simulating machines on one)")
@click.option("--leave-timeout", default=300.0, show_default=True, type=POSITIVE_NUMBER,
              help="after SIGTERM, seconds to wait for the coordinator to move the job off this machine")
def agent_cmd(join, name, root, devices, kind, token_file, tls_cert, tls_key, tls_ca, address, store_root, standby, link, leave_timeout):
    """Run this machine's agent: its store and, on the coordinator's command, its workers.

    With --tls-cert/--tls-key its store serves HTTPS; with any --tls-* option, --join
    HOST:PORT means https://HOST:PORT, and the coordinator and peer stores are verified
    against --tls-ca.

    \b
    scalai agent --join 10.0.0.1:7000 --name node3 --root /dev/shm/scalai --devices 8 --device cuda \\
                 --token-file /etc/scalai/token
    """
    from ..elastic.agent import Agent
    from ..store.client import load_token

    token = load_token(token_file)
    tls = make_tls(tls_cert, tls_key, tls_ca)
    agent = Agent(join, name, root, devices, kind, token, address, store_root, standby, link=link, tls=tls,
                  leave_timeout=leave_timeout, say=lambda text: click.echo(text, err=True))
    agent.run()
