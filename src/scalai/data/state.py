"""The dataset state: the handful of integers that say where training is in the data.

The state does not mention the data-parallel degree: it describes the *global* stream
(the seeded order and how much of it the finished steps consumed), and any number of
replicas derives its share from it (see :mod:`scalai.data.division`). It is saved in
the checkpoint manifest under the key ``"data"``::

    {"version": 1, "seed": 1234, "epoch": 2, "consumed": 4096, "global_batch": 512,
     "num_samples": 1000000, "order": "feistel"}

``consumed`` counts samples of ``epoch`` already consumed (``0 <= consumed <
num_samples``); the absolute position in the global order is ``epoch * num_samples +
consumed``, at most :data:`MAX_POSITION` (2**62: positions are int64 in the order's arrays,
with room for any window after them). ``num_samples`` is the size of the index the order runs over: a state loaded
against an index of another size is refused, since its order would differ.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from .order import MAX_POSITION, ORDERS

__all__ = ["DataState", "STATE_VERSION", "MAX_POSITION"]

STATE_VERSION = 1
_KEYS = ("version", "seed", "epoch", "consumed", "global_batch", "num_samples", "order")


def _check_int(name: str, value: object, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}; {hint}")


@dataclass(frozen=True)
class DataState:
    """Where training stands in the global sample order, validated on construction.

    Args:
        seed: seed of the order, in ``[0, 2**63)``.
        global_batch: samples per optimizer step, summed over all data-parallel replicas.
        num_samples: samples in the index (one epoch).
        epoch: current epoch, from 0.
        consumed: samples of ``epoch`` consumed by finished steps, in ``[0, num_samples)``.
        order: name of the order algorithm (see :data:`scalai.data.order.ORDERS`).
    """

    seed: int
    global_batch: int
    num_samples: int
    epoch: int = 0
    consumed: int = 0
    order: str = "feistel"

    def __post_init__(self) -> None:
        _check_int("seed", self.seed, 0, "pass the seed the job started with")
        if self.seed >= 2**63:
            raise ValueError(f"seed={self.seed} must be below 2**63")
        _check_int("global_batch", self.global_batch, 1, "it is the samples per optimizer step")
        _check_int("num_samples", self.num_samples, 1, "the index holds no sample; index more data")
        _check_int("epoch", self.epoch, 0, "epochs count from 0")
        _check_int("consumed", self.consumed, 0, "it counts samples already consumed")
        if self.consumed >= self.num_samples:
            raise ValueError(
                f"consumed={self.consumed} is not below num_samples={self.num_samples}; "
                f"use DataState.at_position(...) to roll whole epochs into epoch "
                f"(here epoch={self.epoch + self.consumed // self.num_samples}, "
                f"consumed={self.consumed % self.num_samples})"
            )
        if self.order not in ORDERS:
            raise ValueError(f"order={self.order!r} is not known; use one of {sorted(ORDERS)}")
        if self.position > MAX_POSITION:
            raise ValueError(f"epoch={self.epoch} with consumed={self.consumed} is position {self.position} "
                             f"of the global order, past the {MAX_POSITION} samples scalai counts; pass the "
                             f"epoch and count the job really reached")

    # -- positions -------------------------------------------------------------------
    @classmethod
    def at_position(cls, position: int, *, seed: int, global_batch: int, num_samples: int,
                    order: str = "feistel") -> DataState:
        """The state whose absolute position in the global order is ``position``."""
        _check_int("position", position, 0, "it counts samples consumed since epoch 0 began")
        _check_int("num_samples", num_samples, 1, "the index holds no sample; index more data")
        if position > MAX_POSITION:
            raise ValueError(f"position {position} of the global order is past the {MAX_POSITION} samples "
                             f"scalai counts; pass the epoch and count the job really reached")
        return cls(seed=seed, global_batch=global_batch, num_samples=num_samples,
                   epoch=position // num_samples, consumed=position % num_samples, order=order)

    @property
    def position(self) -> int:
        """Samples consumed since the start of epoch 0: the next step's first position."""
        return self.epoch * self.num_samples + self.consumed

    def step_start(self, step: int = 0) -> int:
        """Absolute position of the first sample of the ``step``-th step from now."""
        _check_int("step", step, 0, "steps count from 0 (the next step)")
        return self.position + step * self.global_batch

    def advance(self, steps: int = 1) -> DataState:
        """The state after ``steps`` more finished optimizer steps (epochs roll over)."""
        return self.with_position(self.step_start(steps))

    def with_position(self, position: int) -> DataState:
        _check_int("position", position, 0, "it counts samples consumed since epoch 0 began")
        return replace(self, epoch=position // self.num_samples, consumed=position % self.num_samples)

    def with_global_batch(self, global_batch: int) -> DataState:
        """The same position under another global batch (changes the trajectory from here)."""
        return replace(self, global_batch=global_batch)

    # -- serialization ---------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A plain dict for the checkpoint manifest (key ``"data"``)."""
        return {"version": STATE_VERSION, "seed": self.seed, "epoch": self.epoch,
                "consumed": self.consumed, "global_batch": self.global_batch,
                "num_samples": self.num_samples, "order": self.order}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, num_samples: int | None = None) -> DataState:
        """Parse :meth:`to_json`'s dict strictly; refuse newer versions and unknown keys.

        ``num_samples``, when given, is the size of the index the state will run over;
        a state recorded against another size is refused.
        """
        if not isinstance(obj, Mapping):
            raise ValueError(f"a data state must be a JSON object, not {type(obj).__name__}")
        version = obj.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError("data state has no integer 'version'; it was not written by scalai")
        if version > STATE_VERSION:
            raise ValueError(f"data state version {version} is newer than this scalai reads "
                             f"({STATE_VERSION}); upgrade scalai")
        unknown = sorted(set(obj) - set(_KEYS))
        missing = [k for k in _KEYS if k not in obj and k != "order"]
        if unknown or missing:
            raise ValueError(f"data state keys do not match version {version}: "
                             f"missing {missing}, unknown {unknown}")
        state = cls(seed=obj["seed"], global_batch=obj["global_batch"], num_samples=obj["num_samples"],
                    epoch=obj["epoch"], consumed=obj["consumed"], order=obj.get("order", "feistel"))
        if num_samples is not None and num_samples != state.num_samples:
            raise ValueError(
                f"the data state was recorded for an index of {state.num_samples} samples but this "
                f"index holds {num_samples}; resume with the index the job trained on"
            )
        return state
