"""Store commands: ``scalai store serve | push | reshard | pull | ls | rm | openapi``."""

from __future__ import annotations

import os

import click

from .group import cli
from .output import console, emit_json, human_bytes, layout_option, progress
from .params import COUNT, PORT, POSITIVE_NUMBER, RATE, SIZE
from .tls_options import make_tls, tls_client_option, tls_server_options

_STORES_HELP = "store URLs in host order, comma-separated (e.g. http://127.0.0.1:7070,http://127.0.0.1:7071)"


def _token_option(f):
    return click.option("--token-file", type=click.Path(dir_okay=False),
                        help="file holding the shared token (default: $SCALAI_TOKEN)")(f)


def _client_options(f):
    return _token_option(tls_client_option(f))


def _cluster(stores: str, token_file: str | None, tls_ca: str | None):
    from ..store import StoreCluster, load_token

    return StoreCluster([u.strip() for u in stores.split(",") if u.strip()], load_token(token_file),
                        tls=make_tls(tls_ca=tls_ca))


@cli.group()
def store() -> None:
    """Per-host tensor stores: serve one, push a checkpoint, reshard across hosts, pull it back."""


@store.command()
@click.option("--root", required=True, type=click.Path(file_okay=False),
              help="directory for the shards, memory-backed (e.g. /dev/shm/scalai-store)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (anything but loopback needs a token)")
@click.option("--port", default=7070, show_default=True, type=PORT, help="port (0: any free one)")
@click.option("--name", default=None, help="this host's name in placements (default: the machine's host name)")
@_token_option
@tls_server_options
@click.option("--spill", type=click.Path(file_okay=False), help="disk directory for what passes --memory-limit")
@click.option("--memory-limit", default=None, type=SIZE, help="bytes to hold in --root, e.g. 64G (default: no limit)")
@click.option("--max-upload", default="16G", show_default=True, type=SIZE, help="largest tensor upload accepted")
@click.option("--link", "link_rate", default=None, type=RATE,
              help="simulate this host's link in the transport: bytes/s each way to other hosts, e.g. 1gbit")
@click.option("--url-file", type=click.Path(dir_okay=False), help="write the store's URL here once listening")
@click.option("--lease", "lease_s", default=None,
              help="seconds an uncommitted version lives without renewal when its writer names no lease "
                   "[default: $SCALAI_STORE_LEASE or 60]")
@click.option("--idle-timeout", default=30.0, show_default=True, type=POSITIVE_NUMBER,
              help="seconds a connection may stay open without a request, or send nothing mid-request")
@click.option("--max-connections", default=1024, show_default=True, type=COUNT,
              help="most connections open at once (the quietest idle one is closed for a new one)")
def serve(root, host, port, name, token_file, tls_cert, tls_key, tls_ca, spill, memory_limit, max_upload, link_rate,
          url_file, lease_s, idle_timeout, max_connections) -> None:
    """Run a store on this host until SIGTERM or Ctrl-C (the shards stay in --root)."""
    from ..store.client import load_token
    from ..store.daemon import default_name, serve as run
    from ..store.lease import lease_seconds
    from ..store.server import StoreConfig

    config = StoreConfig(root=root, name=name or default_name(), token=load_token(token_file),
                         tls=make_tls(tls_cert, tls_key, tls_ca), spill=spill,
                         memory_limit=memory_limit, max_upload=max_upload,
                         link_up=link_rate, link_down=link_rate, lease_s=lease_seconds(lease_s, "--lease"),
                         idle_timeout=idle_timeout, max_connections=max_connections)
    run(config, host, port, url_file, announce=click.echo)


@store.command()
@click.argument("ckpt", type=click.Path())
@click.option("--job", required=True, help="job name")
@click.option("--stores", required=True, help=_STORES_HELP)
@click.option("--gpus-per-host", "-g", required=True, type=COUNT, help="ranks per host (rank r goes to host r // G)")
@click.option("--version", default=None, help="version name (default: the next v<n>)")
@_client_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def push(ckpt, job, stores, gpus_per_host, version, token_file, tls_ca, as_json) -> None:
    """Upload checkpoint CKPT into the stores: each rank's shards to the store of its host."""
    import time

    from ..checkpoint import Checkpoint

    with Checkpoint.open(ckpt) as c:
        total = sum(r.nbytes for r in c.manifest.ranks)
    cluster = _cluster(stores, token_file, tls_ca)
    t0 = time.perf_counter()
    with progress("push", total, enabled=not as_json) as advance:
        v = cluster.push(ckpt, job, gpus_per_host, version, progress=advance)
    seconds = time.perf_counter() - t0
    m = v.manifest
    out = {"job": job, "version": v.name, "layout": str(m.ptc.config), "hosts": m.hosts,
           "bytes": total, "seconds": round(seconds, 3)}
    if as_json:
        emit_json(out)
    else:
        click.echo(f"pushed {ckpt} as {job}/{v.name} ({m.ptc.config}) to {', '.join(m.hosts)}: "
                   f"{human_bytes(total)} in {seconds:.1f} s")


@store.command("reshard")
@click.option("--job", required=True, help="job name")
@layout_option("--to", "to_layout")
@click.option("--stores", required=True, help=_STORES_HELP)
@click.option("--gpus-per-host", "-g", type=COUNT, default=None, help="ranks per host after (default: as before)")
@click.option("--hosts", default=None,
              help="hosts of the new placement, comma-separated (default: all stores, in order); 'auto': "
                   "the hosts that make the busiest one receive the least")
@click.option("--central", is_flag=True, help="consolidate-then-split through one host (the baseline)")
@click.option("--lost", default=None,
              help="hosts whose stores are gone, comma-separated: read their ranks' bytes from replicas")
@click.option("--keep-old", is_flag=True, help="keep the old version once the new one is committed")
@_client_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def reshard_cmd(job, to_layout, stores, gpus_per_host, hosts, central, lost, keep_old, token_file, tls_ca,
                as_json) -> None:
    """Transform the job's current version into layout --to, inside the stores.

    Distributed by default: every destination host pulls its slices in parallel, from its
    own store by memory copy and from peer stores by ranged reads. The new version is
    committed on every store only when every host finished; the old one is then dropped.
    """
    from ..store.reshard import reshard

    cluster = _cluster(stores, token_file, tls_ca)
    result = reshard(cluster, job, to_layout, gpus_per_host, hosts if hosts in (None, "auto") else hosts.split(","),
                     central=central, keep_old=keep_old, lost=lost.split(",") if lost else ())
    if as_json:
        emit_json(result.to_json())
        return
    s = result.stats
    out = console()
    out.print(f"{job}: {result.source} -> {result.target} ({to_layout} on {', '.join(result.placement)}, "
              f"{result.mode}) in {result.seconds:.2f} s "
              f"({', '.join(f'{k} {v:.2f} s' for k, v in result.phases.items())})")
    linked = f" ({human_bytes(result.linked_bytes)} more linked, not copied)" if result.linked_bytes else ""
    out.print(f"moved {human_bytes(result.copied_bytes)}{linked}; across hosts {human_bytes(result.cross_host_bytes)} counted "
              f"by the stores (plan {human_bytes(s.cross_host_bytes)}, lower bound "
              f"{human_bytes(s.cross_host_lower_bound_bytes)})")


@store.command()
@click.argument("out", type=click.Path())
@click.option("--job", required=True, help="job name")
@click.option("--stores", required=True, help=_STORES_HELP)
@click.option("--version", default=None, help="version (default: the current one)")
@_client_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def pull(out, job, stores, version, token_file, tls_ca, as_json) -> None:
    """Write the job's current version (or --version) from the stores as checkpoint OUT."""
    import time

    from ..store.pull import pull as pull_version

    if os.path.lexists(out):
        raise FileExistsError(f"output {out} already exists; choose another directory or remove it first")
    cluster = _cluster(stores, token_file, tls_ca)
    m = cluster.latest(job, version).manifest  # for the progress bar: the current version may change
    total = sum(m.ptc.rank_nbytes(r) for r in range(m.ptc.config.world_size))
    t0 = time.perf_counter()
    with progress("pull", total, enabled=not as_json) as advance:
        src = pull_version(cluster, job, out, version, progress=advance)
    seconds = time.perf_counter() - t0
    m = src.manifest
    total = sum(m.ptc.rank_nbytes(r) for r in range(m.ptc.config.world_size))
    if as_json:
        emit_json({"checkpoint": os.path.abspath(out), "job": job, "version": src.name,
                   "layout": str(m.ptc.config), "bytes": total, "seconds": round(seconds, 3)})
    else:
        click.echo(f"wrote {out}: {job}/{src.name} ({m.ptc.config}), {human_bytes(total)} in {seconds:.1f} s")


@store.command("ls")
@click.option("--stores", required=True, help=_STORES_HELP)
@_client_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def ls_cmd(stores, token_file, tls_ca, as_json) -> None:
    """List every store's jobs and versions, and its memory use."""
    from ..store.cluster import parallel

    cluster = _cluster(stores, token_file, tls_ca)
    info = dict(zip(cluster.hosts, parallel(lambda c: {"usage": c.usage(), "jobs": c.jobs()}, cluster.clients)))
    if as_json:
        emit_json(info)
        return
    for host, i in info.items():
        click.echo(f"{host} ({cluster.by_host[host].url}): {human_bytes(i['usage']['memory_bytes'])} in memory, "
                   f"{human_bytes(i['usage']['spill_bytes'])} spilled")
        for j in i["jobs"]:
            for v in j["versions"]:
                state = "committed" if v["committed"] else \
                    f"uncommitted (writer {v.get('owner') or '?'}, lease ends in {v.get('expires_in_s', 0):.0f} s)"
                click.echo(f"  {j['job']}/{v['version']}: {v['layout'] or '?'} {state}, "
                           f"{v['tensors']} tensors, {human_bytes(v['bytes'])}")


@store.command("rm")
@click.option("--job", required=True, help="job name")
@click.option("--version", default=None, help="one version (default: the whole job)")
@click.option("--stores", required=True, help=_STORES_HELP)
@_client_options
def rm_cmd(job, version, stores, token_file, tls_ca) -> None:
    """Delete a job (or one version of it) from every store."""
    from ..store.cluster import parallel
    from ..store.errors import StoreRequestError

    cluster = _cluster(stores, token_file, tls_ca)

    def one(c):
        try:
            return c.delete(job, version)["deleted"]
        except StoreRequestError as exc:
            if exc.status == 404:
                return []
            raise
    removed = parallel(one, cluster.clients)
    click.echo(f"deleted {job}{'/' + version if version else ''} from "
               f"{sum(1 for r in removed if r)} of {len(removed)} stores")


@store.command("openapi")
def openapi_cmd() -> None:
    """Print the stores' HTTP API as an OpenAPI 3.1 document (JSON)."""
    from ..store.openapi import SPEC

    emit_json(SPEC)
