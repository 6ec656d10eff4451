"""A token bucket that limits a store's link in the transport itself (the fallback of the
link simulation when network namespaces and ``tc`` are not available, see ``simnet.py``).

One :class:`Link` per store limits two directions separately, as a full-duplex NIC does:
``up`` (bytes this host sends to other hosts: region reads it serves) and ``down`` (bytes
it receives from other hosts: the ranged reads it makes during a transformation). Only
traffic between stores is limited: requests from clients (push, pull, the coordinator)
and a store's copies within its own host are not. The limit is in bytes per second;
bursts are at most :data:`BURST_S` seconds of traffic.
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["TokenBucket", "Link", "BURST_S"]

BURST_S = 0.05


class TokenBucket:
    """Waits so that the bytes passed through :meth:`take` average ``rate`` bytes/s."""

    def __init__(self, rate: float):
        if rate <= 0:
            raise ValueError(f"rate {rate} must be positive (bytes per second)")
        self.rate = float(rate)
        self.capacity = max(self.rate * BURST_S, 64 * 1024)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, nbytes: int) -> None:
        """Return once ``nbytes`` may pass (FIFO among waiters; may go into debt)."""
        async with self._lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= nbytes
            if self.tokens < 0:
                await asyncio.sleep(-self.tokens / self.rate)


class Link:
    """Limits of one host's link; ``None`` rates mean unlimited."""

    def __init__(self, up_bps: float | None = None, down_bps: float | None = None):
        self.up = TokenBucket(up_bps) if up_bps else None
        self.down = TokenBucket(down_bps) if down_bps else None

    async def send(self, nbytes: int) -> None:
        if self.up is not None:
            await self.up.take(nbytes)

    async def receive(self, nbytes: int) -> None:
        if self.down is not None:
            await self.down.take(nbytes)
