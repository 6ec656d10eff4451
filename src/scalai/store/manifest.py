"""The manifest of a stored version: what makes a set of uploaded shards a committed state.

Written by :meth:`Catalog.commit` into ``<root>/<job>/<version>/manifest.json`` on every
store of the cluster (the same JSON everywhere)::

    {"format": "scalai-store-version", "format_version": 1,
     "job": "gpt", "version": "v1", "sequence": 1, "parent": "v0",
     "ptc": {...},                                     # the layout (PTC.to_json)
     "placement": {"gpus_per_host": 4, "hosts": ["host0", "host1"]},
     "state": {...},                                   # step, RNG, data position
     "created_by": "scalai 0.1.0",
     "scratch": false,                                 # true: an intermediate (central mode)
     "lost_ranks": [3],                                # optional: ranks whose shards are gone
     "replicas": "per_host"}                           # optional: replicas kept once per host

Rank ``r``'s shards live on the store named ``placement.host(r)``, except the
``lost_ranks``: a version saved by the survivors of a failure (each surviving rank dumped
its own shards) lacks the shards of the ranks that died; it is committed without them and
can only be transformed with those ranks unavailable (their bytes read from replicas).
With ``replicas: per_host``, a replica that several ranks of one host share (data-parallel
copies, replicated norms) is stored once on that host, by the rank
:meth:`PTC.stored_replicas` names; ``ptc`` is then that view.

``sequence`` orders the
versions of a job: the latest one committed on every store is the job's current state
(scratch versions, the consolidated copy of central mode, never are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import Placement
from ..layout.ptc import PTC
from ..limits import LimitError
from .names import check_name, check_tensor_name

__all__ = ["VersionManifest", "FORMAT", "FORMAT_VERSION", "placement_to_json", "placement_from_json", "parse_ptc",
           "untrusted_layout"]

FORMAT = "scalai-store-version"
FORMAT_VERSION = 1
#: What a version stores of replicas: every rank's copy, or one copy per host.
REPLICAS = ("all", "per_host")


def placement_to_json(placement: Placement) -> dict:
    if placement.hosts is None:
        raise ValueError("a stored version needs named hosts: Placement(gpus_per_host, hosts=(...))")
    return {"gpus_per_host": placement.gpus_per_host, "hosts": list(placement.hosts)}


def placement_from_json(obj: Any) -> Placement:
    if not isinstance(obj, dict) or set(obj) != {"gpus_per_host", "hosts"} \
            or not isinstance(obj["hosts"], list) or not obj["hosts"]:
        raise ValueError("placement must be {gpus_per_host: int, hosts: [name, ...]}")
    return Placement(obj["gpus_per_host"], tuple(check_name(h, "host") for h in obj["hosts"]))


def parse_ptc(obj: Any, what: str) -> PTC:
    """A PTC a client sent: any malformed shape of it is bad input (ValueError naming
    ``what``), never a crash; sizes past :mod:`scalai.limits` stay a LimitError (HTTP 422)."""
    try:
        ptc = PTC.from_json(obj)
    except LimitError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed JSON shape is bad input
        raise ValueError(f"{what} does not parse ({type(exc).__name__}: {exc})") from None
    for name in ptc.names:  # tensor names become file names in the stores
        check_tensor_name(name)
    return ptc


def untrusted_layout(fn, *args, what: str = "the request's layout"):
    """``fn(*args)`` over a layout a client sent (shards, plans): a failure that is not
    scalai's own (a split rule whose arithmetic fails) is that layout's fault, a ValueError."""
    from ..errors import ScalaiError

    try:
        return fn(*args)
    except (ScalaiError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - bad input, never a crash
        raise ValueError(f"{what} cannot be laid out ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class VersionManifest:
    """A committed version of a job: its layout, where its ranks are, its non-tensor state."""

    job: str
    version: str
    sequence: int
    ptc: PTC
    placement: Placement
    state: dict
    parent: str | None = None
    created_by: str = "scalai"
    scratch: bool = False
    lost_ranks: tuple[int, ...] = ()
    replicas: str = "all"

    def __post_init__(self) -> None:
        if self.replicas not in REPLICAS:
            raise ValueError(f"replicas {self.replicas!r} is not one of {REPLICAS}")
        full = self.ptc.full
        object.__setattr__(self, "ptc", full.stored_replicas(self.placement.host) if self.replicas == "per_host"
                           else full)
        check_name(self.job, "job")
        check_name(self.version, "version")
        if self.parent is not None:
            check_name(self.parent, "parent version")
        if isinstance(self.sequence, bool) or not isinstance(self.sequence, int) or self.sequence < 0:
            raise ValueError(f"sequence {self.sequence!r} must be a non-negative integer")
        world = self.ptc.config.world_size
        lost = tuple(self.lost_ranks)
        if any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < world for r in lost) \
                or list(lost) != sorted(set(lost)):
            raise ValueError(f"lost_ranks {list(lost)} must be distinct ranks of the layout (0..{world - 1}), "
                             f"in increasing order")
        object.__setattr__(self, "lost_ranks", lost)
        slots = self.placement.gpus_per_host * len(self.placement.hosts or ())
        if slots < world:
            raise ValueError(f"layout {self.ptc.config} has {world} ranks but the placement has "
                             f"{slots} devices ({self.placement.gpus_per_host} on each of "
                             f"{len(self.placement.hosts or ())} hosts); add stores or raise gpus_per_host")

    @property
    def hosts(self) -> list[str]:
        """The hosts that hold at least one rank, in order."""
        return self.placement.hosts_for(self.ptc.config.world_size)

    def ranks_on(self, host: str) -> list[int]:
        return [r for r in range(self.ptc.config.world_size) if self.placement.host(r) == host]

    def expected(self, host: str) -> dict[tuple[int, str], tuple[str, tuple[int, ...]]]:
        """``{(rank, tensor): (dtype, local shape)}`` that the store ``host`` must hold."""
        return {(r, name): (self.ptc.spec(name).dtype, shard.shape)
                for r in self.ranks_on(host) if r not in self.lost_ranks
                for name, shard in self.ptc.rank_shards(r)}

    def to_json(self) -> dict:
        out = {"format": FORMAT, "format_version": FORMAT_VERSION, "job": self.job,
               "version": self.version, "sequence": self.sequence, "parent": self.parent,
               "ptc": self.ptc.to_json(), "placement": placement_to_json(self.placement),
               "state": self.state, "created_by": self.created_by, "scratch": self.scratch}
        if self.lost_ranks:
            out["lost_ranks"] = list(self.lost_ranks)
        if self.replicas != "all":
            out["replicas"] = self.replicas
        return out

    @classmethod
    def from_json(cls, obj: Any) -> VersionManifest:
        """Parse strictly; raises ValueError saying what is wrong."""
        keys = {"format", "format_version", "job", "version", "sequence", "parent", "ptc",
                "placement", "state", "created_by", "scratch"}
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest")
        if not isinstance(obj.get("format_version"), int) or obj["format_version"] > FORMAT_VERSION:
            raise ValueError(f"manifest format_version {obj.get('format_version')!r} is not one this "
                             f"scalai reads ({FORMAT_VERSION}); upgrade scalai")
        optional = {"lost_ranks", "replicas"}
        if set(obj) - optional != keys:
            raise ValueError(f"manifest keys {sorted((set(obj) - optional) ^ keys)} are unexpected or missing")
        lost = obj.get("lost_ranks", [])
        if not isinstance(lost, list):
            raise ValueError("manifest lost_ranks must be a list of ranks")
        if not isinstance(obj["state"], dict):
            raise ValueError("manifest state must be a JSON object")
        ptc = parse_ptc(obj["ptc"], "manifest ptc")
        return cls(obj["job"], obj["version"], obj["sequence"], ptc,
                   placement_from_json(obj["placement"]), obj["state"], obj["parent"],
                   str(obj["created_by"]), bool(obj["scratch"]), tuple(lost), obj.get("replicas", "all"))
