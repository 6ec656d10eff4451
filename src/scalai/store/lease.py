"""Owners and leases of uncommitted versions, as writers hold them.

Every writer of a version (``store push``, ``store reshard``, a training save, the elastic
runner) names itself with an *owner* id (:func:`new_owner`) on every upload, commit,
transformation and cleanup, so that a store never lets it write, commit or delete another
writer's version. While it works it holds a :class:`Lease` on its uncommitted versions:
a thread that renews them on every store every ``seconds / 4``. When the writer dies
(killed, frozen, cut off), renewals stop and each store deletes the version ``seconds``
after the last one, cancelling a transformation that was writing it: a killed writer
leaves nothing behind for longer than its lease.

Lease length: ``$SCALAI_STORE_LEASE`` seconds (default 60, between 1 and 3600): long enough
that three renewals in a row can be late on a loaded machine, short enough that an
orphan's memory returns within a minute. A store's own ``--lease`` is what it gives a
writer that names no lease (e.g. a plain ``curl`` upload).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from typing import Iterable, Sequence

from .errors import StoreError, StoreRequestError

__all__ = ["Lease", "new_owner", "owner_generation", "lease_seconds", "DEFAULT_LEASE_S", "MIN_LEASE_S", "MAX_LEASE_S",
           "LEASE_ENV", "OWNER_HEADER", "LEASE_HEADER"]

log = logging.getLogger("scalai.store")

DEFAULT_LEASE_S = 60.0
MIN_LEASE_S = 1.0
MAX_LEASE_S = 3600.0
LEASE_ENV = "SCALAI_STORE_LEASE"
OWNER_HEADER = "X-Scalai-Owner"   # who writes (every upload, commit, transformation, owner-scoped delete)
LEASE_HEADER = "X-Scalai-Lease"   # seconds an uncommitted version lives without renewal


def lease_seconds(value: float | str | None = None, what: str = LEASE_ENV) -> float:
    """``value``, else ``$SCALAI_STORE_LEASE``, else 60 s; checked to lie in [1, 3600].

    Raises:
        ValueError: not a number in range (the message names where it came from).
    """
    from ..validate import finite

    if value is None:
        value = os.environ.get(LEASE_ENV) or DEFAULT_LEASE_S
    hint = f" (the lease, in seconds; e.g. {what}={DEFAULT_LEASE_S:g})"
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={str(value)[:40]!r} is not a number{hint}") from None
    return finite(what, seconds, MIN_LEASE_S, MAX_LEASE_S, hint=hint)


def new_owner(kind: str) -> str:
    """A fresh owner id, e.g. ``reshard-3f9c0a2b7d1e``: ``kind`` says who writes (shown in
    the stores' listings and errors), the random part makes it unique."""
    return f"{kind}-{secrets.token_hex(6)}"


def owner_generation(owner: str | None) -> int | None:
    """The generation an elastic run's writer belongs to, from its owner id (``g12-save-...``,
    made by ``new_owner("g12-save")``), or None for any other owner. A store fenced at
    generation G refuses writers of generations below G (:meth:`Catalog.fence`)."""
    import re

    m = re.match(r"g(\d+)-", owner or "")
    return int(m.group(1)) if m else None


class Lease:
    """Keeps ``owner``'s uncommitted versions of ``job`` alive on their stores until closed.

    Use as a context manager around the work::

        with Lease(cluster, job, owner) as lease:
            lease.claim(target, hosts)      # create the version on every host, or fail (409)
            ...                             # uploads, transformations, commit (owner=owner)

    :meth:`claim` creates the versions, one host after the other in a fixed order, so that
    of two writers claiming the same version one wins everywhere (the other gets 409 at
    the first host they share and has written nothing). :meth:`hold` renews versions that
    others (the workers of a job) create. A renewal that finds a version committed stops
    renewing it; one that finds it gone or taken records the reason (:meth:`check`).

    Args:
        cluster: a :class:`~scalai.store.cluster.StoreCluster`.
        seconds: the lease (default :func:`lease_seconds`); renewed every ``seconds / 4``.
    """

    def __init__(self, cluster, job: str, owner: str, seconds: float | None = None):
        self.cluster, self.job, self.owner = cluster, job, owner
        self.seconds = lease_seconds(seconds)
        self._held: dict[tuple[str, str], bool] = {}  # (version, host) -> must exist (claimed)
        self._lost: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- what is held -----------------------------------------------------------------
    def claim(self, version: str, hosts: Sequence[str]) -> None:
        """Create ``version`` for this owner on each of ``hosts`` (in a fixed order) and keep
        it alive. Raises StoreRequestError (409: another owner has it) at the first host that
        refuses; the versions claimed before stay held (the caller drops them)."""
        for host in sorted(set(hosts)):
            self.cluster.client(host).lease(self.job, version, self.owner, self.seconds, create=True)
            with self._lock:
                self._held[(version, host)] = True
        self._start()

    def hold(self, version: str, hosts: Iterable[str]) -> None:
        """Keep ``version`` alive on ``hosts`` where it exists (created by other processes
        with this owner); where it does not exist yet, renewals do nothing."""
        with self._lock:
            for host in hosts:
                self._held.setdefault((version, host), False)
        self._start()

    def release(self, version: str) -> None:
        """Stop renewing ``version`` (committed or dropped)."""
        with self._lock:
            for key in [k for k in self._held if k[0] == version]:
                del self._held[key]

    def check(self) -> None:
        """Raise StoreError if a renewal found a claimed version deleted or taken."""
        with self._lock:
            lost = list(self._lost)
        if lost:
            raise StoreError(f"the lease of {self.owner} on job {self.job} was lost: {lost[0]}")

    # -- the renewing thread ----------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"lease-{self.owner}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            self.renew()

    def renew(self) -> None:
        """Renew every held version once (the thread calls this every ``seconds / 4``)."""
        with self._lock:
            held = list(self._held.items())
        for (version, host), claimed in held:
            try:  # an answer later than a quarter of the lease is of no use: the next round retries
                out = self.cluster.client(host).lease(self.job, version, self.owner, self.seconds,
                                                      timeout=self.seconds / 4)
            except StoreRequestError as exc:
                if exc.status == 404 and not claimed:
                    continue  # not created yet
                with self._lock:
                    self._held.pop((version, host), None)
                    self._lost.append(f"{version} on {host}: {exc}")
                continue
            except StoreError as exc:  # unreachable: try again next time, the store may come back
                log.warning("lease %s: cannot renew %s/%s on %s: %s", self.owner, self.job, version, host, exc)
                continue
            if out.get("committed"):
                with self._lock:
                    self._held.pop((version, host), None)

    def close(self) -> None:
        """Stop renewing (the versions expire unless committed)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.seconds / 4)  # a renewal in flight may still land: harmless

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
