"""The tree of virtual files a data mount shows, independent of FUSE.

For a state, a division and a window of ``steps`` steps::

    /state.json              the state, dp and window (read); write a JSON object of
                             changes to regenerate the view (see :meth:`View.apply`)
    /rank-R/                 one directory per data-parallel rank R in 0..dp-1
        index.json           columnar: sample_id, step, micro_batch, offset of each sample
        samples.bin          the rank's samples of the window, concatenated in reading order
        000000.bin ...       the same samples, one file each (name = position in the rank's order)

Every file is generated from the state on demand: sample files are byte ranges of the
source files (read in place, nothing is copied to disk), the JSON files are rendered when
first read. A :class:`View` is immutable; a change makes a new one, so a file opened
before a change keeps reading the view it was opened in.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .division import MAX_WINDOW, Division, RankPlan, rank_plan
from .index import SampleIndex
from .reader import SampleReader
from .state import DataState

__all__ = ["MountConfig", "View", "Node", "STATE_FILE"]

STATE_FILE = "state.json"
_UPDATABLE = ("seed", "epoch", "consumed", "global_batch", "dp", "steps", "micro_batch_size",
              "num_micro_batches", "advance")


@dataclass(frozen=True)
class MountConfig:
    """What a mount shows: the global state, its division and the window of steps."""

    state: DataState
    division: Division
    steps: int

    def __post_init__(self) -> None:
        if self.division.global_batch != self.state.global_batch:
            raise ValueError(f"division global_batch={self.division.global_batch} differs from the "
                             f"state's {self.state.global_batch}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 1_000_000:
            raise ValueError(f"steps={self.steps!r} must be an integer in 1..1000000 (steps shown per rank)")
        if self.steps * self.state.global_batch > MAX_WINDOW:
            raise ValueError(f"{self.steps} steps of {self.state.global_batch} samples are more than the "
                             f"{MAX_WINDOW:,} samples a view shows; show fewer steps")

    def to_json(self) -> dict[str, Any]:
        d = self.division
        return {**self.state.to_json(), "dp": d.dp, "steps": self.steps,
                "micro_batch_size": d.micro_batch_size, "num_micro_batches": d.num_micro_batches}

    def apply(self, changes: dict[str, Any]) -> MountConfig:
        """A new config with ``changes`` (keys of ``state.json``, plus ``advance``: steps finished).

        Changing ``dp`` or the micro-batching keeps the position; ``advance: k`` moves the
        position by ``k`` global batches; ``epoch``/``consumed`` set it.
        """
        if not isinstance(changes, dict):
            raise ValueError("write a JSON object to state.json, e.g. {\"dp\": 4}")
        unknown = sorted(set(changes) - set(_UPDATABLE))
        if unknown:
            raise ValueError(f"state.json does not take {unknown}; it takes {list(_UPDATABLE)}")
        state, d = self.state, self.division
        if any(k in changes for k in ("seed", "global_batch")):
            state = replace(state, seed=changes.get("seed", state.seed),
                            global_batch=changes.get("global_batch", state.global_batch))
        if "epoch" in changes or "consumed" in changes:
            epoch, consumed = changes.get("epoch", state.epoch), changes.get("consumed", state.consumed)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, consumed)):
                raise ValueError(f"epoch={epoch!r} and consumed={consumed!r} must be integers >= 0")
            state = state.with_position(epoch * state.num_samples + consumed)
        if "advance" in changes:
            steps = changes["advance"]
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise ValueError(f"advance={steps!r} must be a non-negative number of finished steps")
            state = state.advance(steps)
        micro = {k: changes[k] for k in ("micro_batch_size", "num_micro_batches") if k in changes}
        if micro and len(micro) == 1:  # setting one of the two clears the other
            micro = {"micro_batch_size": None, "num_micro_batches": None, **micro}
        division = Division(state.global_batch, changes.get("dp", d.dp),
                            micro.get("micro_batch_size", d.micro_batch_size),
                            micro.get("num_micro_batches", d.num_micro_batches))
        return MountConfig(state, division, changes.get("steps", self.steps))


@dataclass(frozen=True)
class Node:
    """A directory (``size`` is None) or a file of ``size`` bytes."""

    size: int | None
    writable: bool = False

    @property
    def is_dir(self) -> bool:
        return self.size is None


class View:
    """One generation of the tree: path lookups, listings and reads (thread-safe)."""

    def __init__(self, index: SampleIndex, reader: SampleReader, config: MountConfig, generation: int = 0) -> None:
        self.index, self.reader, self.config, self.generation = index, reader, config, generation
        self._plans: dict[int, RankPlan] = {}
        self._rendered: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._width = max(6, len(str(config.steps * int(config.division.part_sizes()[0]) - 1)))

    # -- contents --------------------------------------------------------------------
    def plan(self, rank: int) -> RankPlan:
        with self._lock:
            if rank not in self._plans:
                self._plans[rank] = rank_plan(self.config.state, self.config.division, rank, self.config.steps)
            return self._plans[rank]

    def _render(self, key: str, make) -> bytes:
        with self._lock:
            data = self._rendered.get(key)
        if data is None:
            data = (json.dumps(make(), indent=1) + "\n").encode()
            with self._lock:
                self._rendered[key] = data
        return data

    def _state_json(self) -> bytes:
        return self._render("state", lambda: {**self.config.to_json(), "generation": self.generation})

    def _index_json(self, rank: int) -> bytes:
        def make() -> dict[str, Any]:
            p, sb = self.plan(rank), self.index.sample_bytes
            return {"rank": rank, "dp": self.config.division.dp, "steps": self.config.steps,
                    "generation": self.generation, "seq_len": self.index.seq_len, "dtype": self.index.dtype,
                    "sample_bytes": sb, "state": self.config.state.to_json(),
                    "sample_id": p.sample_ids.tolist(), "step": p.step.tolist(),
                    "micro_batch": p.micro_batch.tolist(), "offset": (np.arange(len(p)) * sb).tolist()}
        return self._render(f"index-{rank}", make)

    # -- tree ------------------------------------------------------------------------
    def _parse(self, path: str) -> tuple[int | None, str | None]:
        """``(rank, name)`` of a path; ``(None, None)`` for the root; raises KeyError if absent."""
        parts = [p for p in path.split("/") if p]
        if not parts:
            return None, None
        if len(parts) == 1 and parts[0] == STATE_FILE:
            return None, STATE_FILE
        if not parts[0].startswith("rank-") or not parts[0][5:].isdigit() or len(parts) > 2:
            raise KeyError(path)
        rank = int(parts[0][5:])
        if rank >= self.config.division.dp or parts[0] != f"rank-{rank}":
            raise KeyError(path)
        return rank, (parts[1] if len(parts) == 2 else None)

    def _sample_position(self, rank: int, name: str) -> int:
        stem = name[:-4] if name.endswith(".bin") else ""
        if len(stem) != self._width or not stem.isdigit() or int(stem) >= len(self.plan(rank)):
            raise KeyError(name)
        return int(stem)

    def lookup(self, path: str) -> Node:
        """The node at ``path``; raises KeyError if there is none."""
        rank, name = self._parse(path)
        if name == STATE_FILE:
            return Node(len(self._state_json()), writable=True)
        if name is None:
            return Node(None)
        if name == "index.json":
            return Node(len(self._index_json(rank)))
        if name == "samples.bin":
            return Node(len(self.plan(rank)) * self.index.sample_bytes)
        self._sample_position(rank, name)
        return Node(self.index.sample_bytes)

    def listdir(self, path: str) -> list[str]:
        rank, name = self._parse(path)
        if name is not None:
            raise NotADirectoryError(path)
        if rank is None:
            return [STATE_FILE] + [f"rank-{r}" for r in range(self.config.division.dp)]
        return ["index.json", "samples.bin"] + [f"{j:0{self._width}d}.bin" for j in range(len(self.plan(rank)))]

    def read(self, path: str, offset: int, size: int) -> bytes:
        rank, name = self._parse(path)
        if name is None:
            raise IsADirectoryError(path)
        if name == STATE_FILE:
            return self._state_json()[offset: offset + size]
        if name == "index.json":
            return self._index_json(rank)[offset: offset + size]
        ids = self.plan(rank).sample_ids
        if name == "samples.bin":
            return self.reader.read_range(ids, offset, size)
        j = self._sample_position(rank, name)
        return self.reader.read(int(ids[j]), offset, offset + size)

    def apply(self, changes: dict[str, Any]) -> View:
        """The next generation of the view, with ``changes`` applied to the config."""
        return View(self.index, self.reader, self.config.apply(changes), self.generation + 1)
