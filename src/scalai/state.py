"""Non-tensor job state: step, LR scheduler, per-rank RNG, data position.

It travels in the checkpoint manifest as one JSON object::

    {"step": 1200,
     "lr_scheduler": {...},                       # the scheduler's state_dict (JSON-able)
     "rng": {"seed": 1234, "layout": "tp=2,pp=2,dp=2",
             "ranks": {"0": {...}, "1": {...}}},  # per-rank generator states
     "data": {...}}                               # scalai.data.DataState.to_json()

**The RNG rule.** Generator states belong to ranks, and ranks only mean the same thing
under the same layout. So:

- layout unchanged (same tp, pp, dp; ``zero`` and placement do not matter): every rank
  gets its own saved states back, and the run continues bit for bit;
- layout changed: the saved per-rank states are dropped and every rank of the new layout
  seeds its generators with :func:`rank_seed` ``(seed, step, tp_rank, dp_rank, pp_rank)``:
  deterministic, different for every rank and step, independent of the old layout.
  Random streams (dropout masks) after a change therefore differ from those of an
  unchanged run; with dropout off, training is unaffected.

Everything else (step, scheduler, data position) is layout-independent and carried as is.
"""

from __future__ import annotations

import base64
import hashlib
import random
from typing import Any

from .config import ParallelConfig

__all__ = ["carry_state", "rank_seed", "capture_rng", "restore_rng", "rng_action", "seed_all",
           "seeded_rng_states", "effective_rng"]


def rank_seed(seed: int, step: int, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
    """A 63-bit seed for one rank after a change of layout (stable across Python versions)."""
    digest = hashlib.blake2b(f"scalai-rng:{seed}:{step}:{tp_rank}:{dp_rank}:{pp_rank}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _same_degrees(a: ParallelConfig, b: ParallelConfig) -> bool:
    return (a.tp, a.pp, a.dp) == (b.tp, b.pp, b.dp)


def carry_state(state: dict[str, Any] | None, old: ParallelConfig, new: ParallelConfig) -> dict[str, Any]:
    """The non-tensor state for a job moving from layout ``old`` to ``new`` (see module doc)."""
    out = dict(state or {})
    rng = out.get("rng")
    if isinstance(rng, dict):
        rng = dict(rng)
        if not _same_degrees(old, new):
            rng.pop("ranks", None)
            rng["reseeded_at_step"] = out.get("step", 0)
        rng["layout"] = str(new)
        out["rng"] = rng
    return out


def rng_action(state: dict[str, Any], config: ParallelConfig, rank: int) -> tuple[str, Any]:
    """What rank ``rank`` of ``config`` does with its generators on load.

    Returns ``("restore", states)`` with the rank's saved states, ``("seed", n)`` with the
    seed to use, or ``("none", None)`` when the state records no RNG.
    """
    rng = state.get("rng")
    if not isinstance(rng, dict):
        return ("none", None)
    ranks = rng.get("ranks")
    saved_layout = rng.get("layout")
    if ranks and saved_layout and _same_degrees(ParallelConfig.parse(saved_layout), config):
        if str(rank) in ranks:
            return ("restore", ranks[str(rank)])
    c = config.coords(rank)
    return ("seed", rank_seed(int(rng.get("seed", 0)), int(state.get("step", 0)), c.tp, c.dp, c.pp))


def effective_rng(state: dict[str, Any], config: ParallelConfig) -> dict[int, Any] | None:
    """Every rank's generator states on load (restored or seeded), or ``None`` without RNG."""
    if not isinstance(state.get("rng"), dict):
        return None
    out = {}
    for rank in range(config.world_size):
        action, value = rng_action(state, config, rank)
        out[rank] = value if action == "restore" else seeded_rng_states(value)
    return out


def capture_rng() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU, and CUDA if present) generator states."""
    import numpy as np
    import torch

    np_state = np.random.get_state()
    out = {
        "python": _b64(repr(random.getstate()).encode()),
        "numpy": {"key": _b64(np_state[1].tobytes()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
    }
    if torch.cuda.is_available():
        out["cuda"] = _b64(torch.cuda.get_rng_state().numpy().tobytes())
    return out


def restore_rng(states: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    import ast

    import numpy as np
    import torch

    random.setstate(ast.literal_eval(base64.b64decode(states["python"]).decode()))
    n = states["numpy"]
    key = np.frombuffer(base64.b64decode(n["key"]), dtype=np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(states["torch"])), dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(states["cuda"])), dtype=torch.uint8))


def seeded_rng_states(seed: int) -> dict[str, Any]:
    """Generator states, in :func:`capture_rng`'s format, of generators seeded with ``seed``."""
    import numpy as np
    import torch

    np_state = np.random.RandomState(seed % 2**32).get_state()
    return {
        "python": _b64(repr(random.Random(seed).getstate()).encode()),
        "numpy": {"key": _b64(np_state[1].tobytes()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": _b64(torch.Generator().manual_seed(seed).get_state().numpy().tobytes()),
    }


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch generators of this process."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
