"""Failures of stores as clients and coordinators see them. Each names the store (host
name and URL) so that a message says which machine to look at."""

from __future__ import annotations

from ..errors import ScalaiError

__all__ = ["StoreError", "StoreUnavailable", "StoreRequestError", "PeerError"]


class StoreError(ScalaiError):
    """Base of the store's failures. ``host``: the store's name or URL."""

    def __init__(self, message: str, host: str | None = None):
        super().__init__(message)
        self.host = host


class StoreUnavailable(StoreError):
    """A store could not be reached (after retries with backoff)."""


class StoreRequestError(StoreError):
    """A store refused a request: ``status`` (HTTP), ``code`` and the store's reason."""

    def __init__(self, message: str, host: str | None, status: int, code: str):
        super().__init__(message, host)
        self.status, self.code = status, code


class PeerError(StoreError):
    """A peer store failed or was unreachable while a store pulled from it (HTTP 502)."""

    def __init__(self, host: str, message: str):
        super().__init__(message, host)
