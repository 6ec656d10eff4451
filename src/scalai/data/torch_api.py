"""PyTorch data API over a rank's view of the global order (no FUSE involved).

- :class:`TokenDataset`: map-style dataset, ``dataset[sample_id] -> LongTensor[seq_len+1]``
  (with a batched ``__getitems__`` that the DataLoader uses).
- :class:`ElasticSampler`: a batch sampler yielding this replica's micro-batches of ids,
  step after step, across epochs; ``state_dict()`` / ``load_state_dict()``.
- :class:`ElasticDataLoader`: a ``torch.utils.data.DataLoader`` with worker processes
  around both, whose ``state_dict()`` counts only micro-batches *delivered* to the
  training loop (prefetched ones do not count), so it is exact with any ``num_workers``.

Resuming: ``load_state_dict`` takes a state saved under any ``dp``. Under the same
division it continues mid-step if it was saved mid-step; under another one it restarts
the unfinished step, whose gradient was never applied, so no sample of a finished step is
read again and none is skipped.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .division import Division, rank_plan
from .index import SampleIndex
from .reader import SampleReader
from .state import DataState

__all__ = ["TokenDataset", "ElasticSampler", "ElasticDataLoader", "LOADER_STATE_VERSION"]

LOADER_STATE_VERSION = 1
_PLAN_STEPS = 64  # steps planned per vectorized call while iterating


class TokenDataset(Dataset):
    """Samples of an index as token tensors: ``dataset[i]`` is ``int64[seq_len + 1]``.

    Args:
        index: a :class:`SampleIndex` or the path of one.
        dtype: dtype of the returned tokens (``torch.long`` for embedding lookups).
    """

    def __init__(self, index: SampleIndex | str | os.PathLike, dtype: torch.dtype = torch.long) -> None:
        self.index = index if isinstance(index, SampleIndex) else SampleIndex.open(index)
        self.reader = SampleReader(self.index)
        self.dtype = dtype
        self._np_dtype = torch.empty(0, dtype=dtype).numpy().dtype

    def __len__(self) -> int:
        return self.index.num_samples

    def __getitem__(self, sample: int) -> torch.Tensor:
        if not -len(self) <= sample < len(self):
            raise IndexError(f"sample {sample} is outside the dataset of {len(self)} samples")
        return self.batch([sample % len(self)])[0]

    def __getitems__(self, samples: list[int]) -> list[torch.Tensor]:
        """Batched fetch for ``DataLoader``: rows of :meth:`batch` (views, one read)."""
        return list(self.batch(samples).unbind(0))

    def batch(self, samples: list[int] | np.ndarray) -> torch.Tensor:
        """Tokens of ``samples`` as one ``[k, seq_len + 1]`` tensor, read in one pass."""
        return self._widen(self.reader.tokens(np.asarray(samples, dtype=np.int64)))

    def _widen(self, tokens: np.ndarray) -> torch.Tensor:
        # In NumPy: torch's kernels for uint16 are slow generic fallbacks.
        return torch.from_numpy(tokens.astype(self._np_dtype, copy=False))

    def __getstate__(self) -> dict:
        return {"path": str(self.index.path), "dtype": self.dtype}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["dtype"])


class ElasticSampler:
    """Batch sampler of one data-parallel replica: micro-batches of sample ids, in order.

    Args:
        state: the global data state to start from.
        division: how each global batch is divided (``dp`` and micro-batches).
        rank: data-parallel rank of this replica (TP/PP peers pass the same one).
        steps: stop after this many steps; ``None`` runs on across epochs.

    Its ``state_dict()`` counts what it has *yielded*; behind a DataLoader with workers
    that includes prefetched batches, so use :class:`ElasticDataLoader` there.
    """

    def __init__(self, state: DataState, division: Division, rank: int, steps: int | None = None) -> None:
        if division.global_batch != state.global_batch:
            raise ValueError(f"division global_batch={division.global_batch} differs from the state's "
                             f"{state.global_batch}; build both from the same value")
        division._check_rank(rank)
        self.division, self.rank, self.steps = division, rank, steps
        self.state = state  # global state after the finished steps
        self.micro_batches_done = 0  # micro-batches of the unfinished step already yielded
        self._bounds = np.concatenate([[0], np.cumsum(division.micro_batch_sizes(rank))])

    @property
    def micro_batches_per_step(self) -> int:
        return len(self._bounds) - 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an ElasticSampler without steps= runs forever and has no length")
        return self.steps * self.micro_batches_per_step - self.micro_batches_done

    def __iter__(self) -> Iterator[list[int]]:
        for ids, micro in self._plan():
            self.micro_batches_done = micro + 1
            if self.micro_batches_done == self.micro_batches_per_step:
                self.state, self.micro_batches_done = self.state.advance(1), 0
            yield ids

    def _plan(self) -> Iterator[tuple[list[int], int]]:
        """(ids, micro-batch index) from the current position, planned in vectorized chunks."""
        state, skip, done = self.state, self.micro_batches_done, 0
        while self.steps is None or done < self.steps:
            count = _PLAN_STEPS if self.steps is None else min(_PLAN_STEPS, self.steps - done)
            ids = rank_plan(state, self.division, self.rank, count).sample_ids
            per_step = ids.reshape(count, -1)  # [count, part]
            for row in per_step:
                for m in range(skip, self.micro_batches_per_step):
                    yield row[self._bounds[m]: self._bounds[m + 1]].tolist(), m
                skip = 0
            state, done = state.advance(count), done + count

    def state_dict(self) -> dict[str, Any]:
        """``{"version", "data", "dp", "rank", "micro_batch_size", "num_micro_batches",
        "micro_batches_done"}``; ``"data"`` is :meth:`DataState.to_json` (finished steps)."""
        d = self.division
        return {"version": LOADER_STATE_VERSION, "data": self.state.to_json(), "dp": d.dp, "rank": self.rank,
                "micro_batch_size": d.micro_batch_size, "num_micro_batches": d.num_micro_batches,
                "micro_batches_done": self.micro_batches_done}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from a state saved under any division (see the module docstring)."""
        if "data" not in state_dict:  # a bare DataState dict, as kept in a checkpoint manifest
            state_dict = {"version": LOADER_STATE_VERSION, "data": state_dict}
        version = state_dict.get("version")
        if not isinstance(version, int) or version > LOADER_STATE_VERSION:
            raise ValueError(f"loader state version {version!r} is not one this scalai reads "
                             f"(<= {LOADER_STATE_VERSION}); upgrade scalai")
        state = DataState.from_json(state_dict["data"], num_samples=self.state.num_samples)
        if state.global_batch != self.division.global_batch:
            raise ValueError(f"the saved state has global_batch={state.global_batch} but this sampler "
                             f"divides {self.division.global_batch}; keep the global batch to keep the "
                             f"trajectory, or build the division from the saved state")
        d = self.division
        same = (state_dict.get("dp"), state_dict.get("rank"), state_dict.get("micro_batch_size"),
                state_dict.get("num_micro_batches")) == (d.dp, self.rank, d.micro_batch_size,
                                                         d.num_micro_batches)
        self.state = state
        self.micro_batches_done = int(state_dict.get("micro_batches_done", 0)) if same else 0


def _worker_init(worker_id: int) -> None:
    # Workers only copy bytes; one thread each keeps them from oversubscribing the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _identity(batch: Any) -> Any:
    return batch


class _IdsAndTokens(Dataset):
    def __init__(self, dataset: TokenDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, samples: list[int]) -> tuple[list[int], np.ndarray]:
        # Workers send the tokens as stored (uint16: a quarter of int64), pickled through
        # the worker's pipe; a tensor would travel as a shared-memory file descriptor, which
        # costs a socket round trip per batch. The loader widens them in the main process.
        return samples, self.dataset.reader.tokens(np.asarray(samples, dtype=np.int64))


class ElasticDataLoader:
    """This replica's micro-batches through a ``torch.utils.data.DataLoader``.

    Each item is a dict: ``tokens`` (``int64[k, seq_len + 1]``; inputs ``[:, :-1]``,
    targets ``[:, 1:]``), ``sample_ids`` (``int64[k]``), ``micro_batch`` (index in the
    step), ``last_in_step`` (bool: step the optimizer after this one) and ``loss_scale``
    (float: multiply the micro-batch's mean loss by it, see :meth:`Division.loss_scale`).

    Args:
        index: a :class:`SampleIndex`, a :class:`TokenDataset` or an index path.
        state: global data state to start from.
        dp, rank: data-parallel degree and this replica's data-parallel rank.
        micro_batch_size, num_micro_batches: see :class:`Division`.
        steps: stop after this many steps (``None``: run on across epochs).
        **loader_kwargs: passed to ``DataLoader`` (``num_workers``, ``pin_memory``,
            ``prefetch_factor``, ``persistent_workers``, ``multiprocessing_context``...).
    """

    def __init__(self, index: SampleIndex | TokenDataset | str | os.PathLike, state: DataState, dp: int,
                 rank: int, *, micro_batch_size: int | None = None, num_micro_batches: int | None = None,
                 steps: int | None = None, reduce: str = "mean", **loader_kwargs: Any) -> None:
        self.dataset = index if isinstance(index, TokenDataset) else TokenDataset(index)
        if state.num_samples != len(self.dataset):
            raise ValueError(f"the state is for {state.num_samples} samples but the index holds "
                             f"{len(self.dataset)}; use the index the state was made for")
        division = Division(state.global_batch, dp, micro_batch_size, num_micro_batches)
        self.sampler = ElasticSampler(state, division, rank, steps)
        self.reduce = reduce
        division.loss_scale(1, reduce)  # validates reduce
        for key in ("batch_size", "shuffle", "sampler", "batch_sampler", "collate_fn", "drop_last"):
            if key in loader_kwargs:
                raise TypeError(f"ElasticDataLoader sets {key} itself; remove it")
        if loader_kwargs.get("num_workers", 0) > 0:
            loader_kwargs.setdefault("worker_init_fn", _worker_init)
        self.loader_kwargs = loader_kwargs
        self._delivered = (state, 0)  # (finished-steps state, micro-batches of the next step)

    @property
    def division(self) -> Division:
        return self.sampler.division

    @property
    def state(self) -> DataState:
        """Global data state after the steps whose micro-batches were all delivered."""
        return self._delivered[0]

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # The sampler restarts from what was delivered: prefetched micro-batches of an
        # abandoned iteration are planned again, not lost.
        self.sampler.state, self.sampler.micro_batches_done = self._delivered
        per_step = self.sampler.micro_batches_per_step
        loader = DataLoader(_IdsAndTokens(self.dataset), batch_sampler=self.sampler,
                            collate_fn=_identity, **self.loader_kwargs)
        state, micro = self._delivered
        for ids, tokens in loader:
            last = micro + 1 == per_step
            item = {"tokens": self.dataset._widen(tokens), "sample_ids": torch.tensor(ids, dtype=torch.long),
                    "micro_batch": micro, "last_in_step": last,
                    "loss_scale": self.division.loss_scale(len(ids), self.reduce)}
            state, micro = (state.advance(1), 0) if last else (state, micro + 1)
            self._delivered = (state, micro)
            yield item

    def state_dict(self) -> dict[str, Any]:
        """Same keys as :meth:`ElasticSampler.state_dict`, counting delivered micro-batches."""
        saved = self.sampler.state, self.sampler.micro_batches_done
        self.sampler.state, self.sampler.micro_batches_done = self._delivered
        try:
            return self.sampler.state_dict()
        finally:
            self.sampler.state, self.sampler.micro_batches_done = saved

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state_dict)
        self._delivered = (self.sampler.state, self.sampler.micro_batches_done)
