"""Fixtures for the store tests: store processes and small checkpoints."""

from __future__ import annotations

import pytest

from store_helpers import TOKEN, StoreProc


@pytest.fixture
def stores(tmp_path):
    """A factory of store processes (each ``StoreProc``); all stopped after the test."""
    started: list[StoreProc] = []

    def make(n: int = 1, token: str | None = None, link: str | None = None, extra: tuple = ()) -> list[StoreProc]:
        out = []
        for i in range(n):
            name = f"host{len(started)}"
            proc = StoreProc(tmp_path / "stores" / name, name, token, link, extra).start()
            started.append(proc)
            out.append(proc)
        return out

    yield make
    for p in started:
        p.kill()


@pytest.fixture
def store(stores):
    """One store on loopback without a token."""
    return stores(1)[0]


@pytest.fixture
def secured(stores):
    """One store that requires the token ``TOKEN``."""
    return stores(1, token=TOKEN)[0]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """gpt-tiny with optimizer state in tp=2,pp=2,dp=2 (8 ranks, ~10 MB)."""
    from scalai.config import ParallelConfig
    from scalai.models.synth import write_synthetic_checkpoint

    path = tmp_path_factory.mktemp("store-ckpt") / "gpt"
    write_synthetic_checkpoint("gpt-tiny", path, ParallelConfig.parse("tp=2,pp=2,dp=2"), seed=3)
    return path
