"""Per-host tensor stores and distributed transformation of job state across hosts.

A store (``scalai store serve``) holds the shards of jobs and versions in memory-backed
files on its host and serves them over HTTP: uploads, N-d region reads sliced on the
server, atomic commits, and its part of a distributed transformation. See docs/store.md.

Client side:

- :class:`StoreClient`: one store (connection reuse, parallel range reads, retries).
- :class:`StoreCluster`: the stores of a job's hosts: versions, push of checkpoints.
- :func:`pull`: a committed version out of the stores into a checkpoint directory.
- :func:`reshard`: transform a job's state into another layout inside the stores,
  distributed (default) or central (the baseline).
- :mod:`scalai.store.training`: what a training job calls to save a rank's shards to its
  host's store and to load its shards through a plan.
"""

from .client import StoreClient, load_token
from .cluster import StoreCluster, StoredVersion
from .errors import PeerError, StoreError, StoreRequestError, StoreUnavailable
from .manifest import VersionManifest
from .pull import pull
from .reshard import ReshardResult, TransformError, reshard

__all__ = ["StoreClient", "StoreCluster", "StoredVersion", "VersionManifest", "pull", "reshard", "ReshardResult",
           "load_token", "StoreError", "StoreUnavailable", "StoreRequestError", "PeerError", "TransformError"]
