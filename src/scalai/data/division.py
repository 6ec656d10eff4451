"""Re-division of the global stream under a data-parallel degree: pure, no I/O.

Step ``s`` (counted from the state) consumes the ``global_batch`` samples at positions
``[state.position + s * B, state.position + (s + 1) * B)`` of the global order, whatever
``dp`` is. Replica ``r`` of ``dp`` gets a contiguous part of them::

    part sizes  = B // dp + (r < B % dp)     # the first B % dp replicas get one more
    part of r   = [sum(sizes[:r]), sum(sizes[:r + 1]))  # offsets within the global batch

and splits its part into micro-batches of near-equal size (they differ by at most one).
Since the state advances by whole global batches, a change of ``dp`` between two steps
(up, down, to a non-divisor of ``B``) continues exactly where the last step stopped, and
the global batch of every step is the one an unchanged job would have drawn.

Uneven parts and micro-batches need a loss weight to keep the step's gradient equal to the
gradient of the mean loss over the global batch; see :meth:`Division.loss_scale`.

Tensor- and pipeline-parallel ranks of one replica read the same samples: index the
division by the data-parallel rank (:func:`dp_rank`), not the global rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .order import sample_ids
from .state import DataState

__all__ = ["Division", "RankPlan", "rank_plan", "step_ids", "plan_table", "dp_rank", "MAX_WINDOW"]

#: Most samples (steps x global batch) a plan or a mounted view lists at once: its arrays
#: are built in memory (about 40 bytes per sample).
MAX_WINDOW = 10_000_000


def _split(n: int, parts: int) -> np.ndarray:
    """Sizes (int64[parts]) of ``n`` items in ``parts`` near-equal parts, larger first."""
    sizes = np.full(parts, n // parts, dtype=np.int64)
    sizes[: n % parts] += 1
    return sizes


@dataclass(frozen=True)
class Division:
    """How one global batch is divided among ``dp`` replicas and into micro-batches.

    Args:
        global_batch: samples per optimizer step, over all replicas (``B``).
        dp: data-parallel degree.
        micro_batch_size: largest micro-batch; each replica splits its part into
            ``ceil(part / micro_batch_size)`` near-equal micro-batches (replicas with one
            sample less may then run one micro-batch less).
        num_micro_batches: alternatively, the same count of micro-batches on every
            replica (lockstep schedules, per-micro-batch collectives).
        Neither given: one micro-batch per replica, holding its whole part.
    """

    global_batch: int
    dp: int
    micro_batch_size: int | None = None
    num_micro_batches: int | None = None
    _sizes: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("global_batch", "dp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.global_batch < self.dp:
            raise ValueError(
                f"global_batch={self.global_batch} is smaller than dp={self.dp}; every replica needs "
                f"at least one sample per step: use dp <= {self.global_batch} or a larger global batch"
            )
        if self.micro_batch_size is not None and self.num_micro_batches is not None:
            raise ValueError("give micro_batch_size or num_micro_batches, not both")
        for name in ("micro_batch_size", "num_micro_batches"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer or None")
        sizes = _split(int(self.global_batch), int(self.dp))
        smallest = int(sizes[-1])
        if self.num_micro_batches is not None and self.num_micro_batches > smallest:
            raise ValueError(
                f"num_micro_batches={self.num_micro_batches} is more than the {smallest} samples the "
                f"smallest replica gets (global_batch={self.global_batch}, dp={self.dp}); use "
                f"num_micro_batches <= {smallest}, a smaller dp or a larger global batch"
            )
        object.__setattr__(self, "_sizes", sizes)

    # -- parts -----------------------------------------------------------------------
    def part_sizes(self) -> np.ndarray:
        """Samples of each replica per step: int64[dp], summing to ``global_batch``."""
        return self._sizes.copy()

    def part(self, rank: int) -> tuple[int, int]:
        """``(start, stop)`` offsets of replica ``rank``'s part within the global batch."""
        self._check_rank(rank)
        start = int(self._sizes[:rank].sum())
        return start, start + int(self._sizes[rank])

    def micro_batch_sizes(self, rank: int) -> np.ndarray:
        """Sizes (int64[m]) of replica ``rank``'s micro-batches, in reading order."""
        self._check_rank(rank)
        part = int(self._sizes[rank])
        if self.num_micro_batches is not None:
            count = self.num_micro_batches
        elif self.micro_batch_size is not None:
            count = -(-part // self.micro_batch_size)
        else:
            count = 1
        return _split(part, count)

    def micro_batches(self, rank: int) -> list[tuple[int, int]]:
        """``(start, stop)`` offsets within the global batch of each micro-batch of ``rank``."""
        start, _ = self.part(rank)
        bounds = start + np.concatenate([[0], np.cumsum(self.micro_batch_sizes(rank))])
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    # -- loss weighting --------------------------------------------------------------
    def loss_scale(self, samples: int, reduce: str = "mean") -> float:
        """Factor for the loss of one micro-batch of ``samples`` samples.

        With ``loss = mean of per-sample losses over the micro-batch``, multiplying it by
        this factor before ``backward()`` makes the accumulated, all-reduced gradient the
        gradient of the mean loss over the whole global batch, even when parts and
        micro-batches are uneven:

        - ``reduce="mean"`` (DDP, FSDP and ZeRO average gradients over replicas):
          ``samples * dp / global_batch``;
        - ``reduce="sum"`` (gradients summed over replicas): ``samples / global_batch``.

        With even parts and ``m`` equal micro-batches, ``"mean"`` gives the familiar ``1/m``.
        For a token-level loss, the same holds when every sample has the same number of
        counted tokens (true for fixed-length samples without masking).
        """
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 0:
            raise ValueError(f"samples={samples!r} must be a non-negative integer")
        if reduce == "mean":
            return samples * self.dp / self.global_batch
        if reduce == "sum":
            return samples / self.global_batch
        raise ValueError(f"reduce={reduce!r} must be 'mean' (replicas average gradients) or 'sum'")

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.dp:
            raise ValueError(f"rank={rank!r} is not a data-parallel rank of dp={self.dp}; use 0..{self.dp - 1}")


@dataclass(frozen=True, eq=False)
class RankPlan:
    """The samples one replica reads in the next ``steps`` steps, in reading order.

    All arrays have shape ``[k]`` with ``k = steps * part size``.
    """

    rank: int
    division: Division
    steps: int
    sample_ids: np.ndarray  # int64[k]: id of each sample in the index
    positions: np.ndarray  # int64[k]: absolute position of each sample in the global order
    step: np.ndarray  # int64[k]: step of each sample, 0 = the next step
    micro_batch: np.ndarray  # int64[k]: micro-batch of each sample within its step

    def __len__(self) -> int:
        return int(self.sample_ids.size)


def step_ids(state: DataState, steps: int) -> np.ndarray:
    """Ids of the next ``steps`` global batches: int64[steps, global_batch]."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps={steps!r} must be a non-negative integer")
    start = state.position
    positions = np.arange(start, start + steps * state.global_batch, dtype=np.int64)
    ids = sample_ids(positions, state.num_samples, state.seed, state.order)
    return ids.reshape(steps, state.global_batch)


def rank_plan(state: DataState, division: Division, rank: int, steps: int) -> RankPlan:
    """What replica ``rank`` reads in the next ``steps`` steps, micro-batch by micro-batch."""
    if division.global_batch != state.global_batch:
        raise ValueError(f"the division is for global_batch={division.global_batch} but the state "
                         f"has global_batch={state.global_batch}; build both from the same value")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps={steps!r} must be a non-negative integer")
    start, stop = division.part(rank)
    part = stop - start
    step = np.repeat(np.arange(steps, dtype=np.int64), part)  # [steps * part]
    offset = np.tile(np.arange(start, stop, dtype=np.int64), steps)  # [steps * part]
    positions = state.position + step * state.global_batch + offset
    micro = np.repeat(np.arange(len(division.micro_batch_sizes(rank)), dtype=np.int64),
                      division.micro_batch_sizes(rank))  # [part]
    ids = sample_ids(positions, state.num_samples, state.seed, state.order)
    return RankPlan(rank=rank, division=division, steps=steps, sample_ids=ids, positions=positions,
                    step=step, micro_batch=np.tile(micro, steps))


def plan_table(state: DataState, division: Division, steps: int) -> list[list[list[int]]]:
    """``[step][rank] -> sample ids`` for the next ``steps`` steps (the CLI's ``plan``)."""
    ids = step_ids(state, steps)  # [steps, B]
    bounds = np.concatenate([[0], np.cumsum(division.part_sizes())])
    return [[row[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])] for row in ids]


def dp_rank(layout, rank: int) -> int:
    """Data-parallel rank of global ``rank`` under a :class:`~scalai.config.ParallelConfig`.

    Ranks that differ only in their tensor- or pipeline-parallel index share it, so they
    read the same samples.
    """
    return layout.coords(rank).dp
