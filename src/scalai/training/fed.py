"""The samples a step really fed to the model, reported by the ranks that fed them.

Exactly-once data is a claim about what the data-parallel replicas *read*, so it is checked
on what they read, not on the ids the data order says they should have read: every rank
passes :func:`gather_fed` the sample ids of the rows it put into its micro-batches this
step (the ids travel with the rows, e.g. ``ElasticDataLoader``'s ``sample_ids``), and rank 0
gets them all. A rank that read a sample twice, skipped one, or read another replica's
shows up in what rank 0 records (the reference trainer writes it into its metrics rows,
``sample_ids``), and the exactly-once checks count those (:mod:`scalai.elastic.check`).

Who feeds what: every rank of a replica feeds the replica's rows, except the pipeline
stages between the first and the last (their input is the previous stage's activations):
they report ``[]``. The replica's rows are those of its first rank (``tp=0`` on the first
stage, which feeds the inputs); every other rank of the replica that must feed rows (the
first and last stages) must report the same ids in the same order, or it is listed in
``mismatched``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..config import ParallelConfig
from .collective import gather, world

__all__ = ["FedSamples", "gather_fed", "fed_samples"]


@dataclass(frozen=True)
class FedSamples:
    """What one step fed, as rank 0 saw it.

    Attributes:
        ids: the sample ids of every replica's rows, replicas in data-parallel order, each
            as its first rank fed them (``int[global batch]`` when nothing went wrong).
        mismatched: ranks whose fed ids differ from their replica's (or that fed none
            where they must feed), in rank order; empty when every rank agreed.
    """

    ids: list[int]
    mismatched: list[int]

    def to_json(self) -> dict[str, Any]:
        """The fields of a metrics row: ``sample_ids`` and, when not empty, ``fed_mismatch``."""
        out: dict[str, Any] = {"sample_ids": self.ids}
        if self.mismatched:
            out["fed_mismatch"] = self.mismatched
        return out


def fed_samples(per_rank: Sequence[Sequence[int]], config: ParallelConfig) -> FedSamples:
    """Every rank's fed ids (``per_rank[r]``) -> the step's :class:`FedSamples` (pure)."""
    if len(per_rank) != config.world_size:
        raise ValueError(f"{len(per_rank)} ranks reported fed samples; layout {config} has "
                         f"{config.world_size}")
    ids: list[int] = []
    mismatched: list[int] = []
    for dp in range(config.dp):
        first = [int(i) for i in per_rank[config.rank(0, dp, 0)]]
        ids.extend(first)
        for pp in range(config.pp):
            must_feed = pp in (0, config.pp - 1)
            for tp in range(config.tp):
                r = config.rank(tp, dp, pp)
                fed = [int(i) for i in per_rank[r]]
                if (must_feed or fed) and fed != first:
                    mismatched.append(r)
    return FedSamples(ids, sorted(mismatched))


def gather_fed(ids: Sequence[int] | Any, config: ParallelConfig, group: Any = None) -> FedSamples | None:
    """Collective, once per step, before the step's last collective (so a peer that dies
    here leaves the weights of the previous step, like any other collective of the step).

    Args:
        ids: the sample ids of the rows this rank fed to its model this step, in the order
            it fed them (a list or an ``int64`` tensor; ``[]`` on a middle pipeline stage).
        config: the running layout (which ranks form which replica).

    Returns:
        on rank 0 of ``group``, the step's :class:`FedSamples`; ``None`` elsewhere.
    """
    mine = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
    everyone = gather(mine, group)  # one all_gather_object: a few ints per rank
    return fed_samples(everyone, config) if world(group)[0] == 0 else None
