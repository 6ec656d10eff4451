"""The global sample order: a pure function of (seed, epoch, number of samples).

Every replica, whatever the data-parallel degree, computes the same order, so the order
is part of the dataset state only through its seed. An epoch is one permutation of
``range(num_samples)``; the global order is epoch 0's permutation, then epoch 1's, and so
on, and *position* ``p`` (the ``p``-th sample ever consumed, counting from 0) is sample
``perm(seed, p // n)[p % n]``.

Algorithms are chosen by name from :data:`ORDERS`:

``"feistel"`` (default)
    A keyed pseudo-random permutation: a 6-round balanced Feistel network on the smallest
    even number of bits that covers ``n``, with cycle walking to stay inside ``[0, n)``.
    Any slice of the order is computed in O(len) time and memory, without materializing
    the whole permutation, and the result depends only on integer arithmetic (not on a
    NumPy random generator, whose streams may change between releases), so an order is
    reproducible forever.
``"sequential"``
    The identity, every epoch: for debugging and for tests that want to see the order.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["ORDERS", "MAX_POSITION", "permute", "sample_ids", "global_order", "epoch_order"]

#: Largest position in the global order: positions are int64, and a window of up to
#: 2**62 more samples after the largest one still fits.
MAX_POSITION = 2**62
_M64 = (1 << 64) - 1
_ROUNDS = 6


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on a uint64 array: a bijective avalanche hash."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _round_keys(seed: int, epoch: int) -> np.ndarray:
    """uint64[_ROUNDS]: one key per Feistel round, derived from (seed, epoch)."""
    with np.errstate(over="ignore"):
        base = _mix64(np.array([seed & _M64], dtype=np.uint64))
        base = _mix64(base ^ np.uint64((epoch * 0x9E3779B97F4A7C15) & _M64))
        rounds = np.arange(1, _ROUNDS + 1, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93)
        return _mix64(base ^ rounds)


def _feistel(x: np.ndarray, keys: np.ndarray, half: int) -> np.ndarray:
    """One pass of the Feistel network on uint64 values below ``2**(2*half)``."""
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    left, right = x >> shift, x & mask
    with np.errstate(over="ignore"):
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & mask)
    return (left << shift) | right


def _feistel_permute(within: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    if n == 1:
        return np.zeros_like(within)
    bits = max(2, int(n - 1).bit_length())
    half = (bits + 1) // 2  # domain 2**(2*half) < 4n, so cycle walking takes < 4 passes on average
    keys = _round_keys(seed, epoch)
    y = _feistel(within.astype(np.uint64), keys, half)
    # Cycle walking: a value that lands outside [0, n) is encrypted again until it is inside.
    # The network is a bijection of the domain, so this is a bijection of [0, n).
    outside = y >= np.uint64(n)
    while outside.any():
        y[outside] = _feistel(y[outside], keys, half)
        outside = y >= np.uint64(n)
    return y.astype(np.int64)


def _sequential_permute(within: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    return within.astype(np.int64, copy=True)


#: Order algorithms by name: ``f(within int64[k], n, seed, epoch) -> sample ids int64[k]``.
ORDERS: dict[str, Callable[[np.ndarray, int, int, int], np.ndarray]] = {
    "feistel": _feistel_permute,
    "sequential": _sequential_permute,
}


def _check(n: int, seed: int, order: str) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_samples={n!r} must be a positive integer; the index holds no sample")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**63)")
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not known; use one of {sorted(ORDERS)}")


def permute(within: np.ndarray, n: int, seed: int, epoch: int, order: str = "feistel") -> np.ndarray:
    """Sample ids at positions ``within`` (int[k], each in ``[0, n)``) of epoch ``epoch``."""
    _check(n, seed, order)
    within = np.asarray(within, dtype=np.int64)
    if within.size and (within.min() < 0 or within.max() >= n):
        raise ValueError(f"positions must lie in [0, {n}); got [{within.min()}, {within.max()}]")
    return ORDERS[order](within, int(n), int(seed), int(epoch))


def sample_ids(positions: np.ndarray, n: int, seed: int, order: str = "feistel") -> np.ndarray:
    """Sample ids (int64[k]) at absolute positions (int[k], >= 0) of the global order.

    A position counts samples consumed since the start of epoch 0, so positions that cross
    an epoch boundary take their ids from the next epoch's permutation.
    """
    _check(n, seed, order)
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and positions.min() < 0:
        raise ValueError(f"positions must be >= 0; got {positions.min()}")
    epochs = positions // n  # int64[k]
    within = positions - epochs * n  # int64[k], in [0, n)
    out = np.empty_like(positions)
    # A slice of the order spans few epochs; one vectorized call per epoch.
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        out[mask] = ORDERS[order](within[mask], int(n), int(seed), int(epoch))
    return out


def global_order(start: int, count: int, n: int, seed: int, order: str = "feistel") -> np.ndarray:
    """Ids (int64[count]) at positions ``start, start+1, ..., start+count-1`` of the order."""
    if count < 0 or start < 0:
        raise ValueError(f"start={start} and count={count} must be >= 0")
    if start > MAX_POSITION or count > MAX_POSITION:
        raise ValueError(f"start={start} and count={count} must be at most {MAX_POSITION} (positions of "
                         f"the global order are counted in 64 bits)")
    return sample_ids(np.arange(start, start + count, dtype=np.int64), n, seed, order)


def epoch_order(n: int, seed: int, epoch: int, order: str = "feistel") -> np.ndarray:
    """The whole permutation of one epoch: int64[n]."""
    return permute(np.arange(n, dtype=np.int64), n, seed, epoch, order)
