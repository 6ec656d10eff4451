"""Deterministic synthetic job state: values that depend on the global position only.

Every element's value is a hash of (seed, tensor, global index), so the same model
synthesized under two layouts holds the same global tensors: a reshard of one can be
compared with the other bit for bit. fp32 master weights hold the exact values whose
bf16 rounding the parameters hold, as in mixed-precision training.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..dtypes import raw_numpy
from ..layout.spec import TensorSpec
from ..regions import Region

__all__ = ["synth_region", "fill_local", "synthetic_state", "write_synthetic_checkpoint",
           "stored_nbytes"]

_CHUNK = 1 << 22  # elements per hashing pass: bounds temporaries to ~64 MiB


def _key(seed: int, name: str) -> np.uint64:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _value_stream(spec: TensorSpec) -> tuple[str, float, bool]:
    """(hash name, scale, non-negative) for a tensor: masters share their parameter's values."""
    if spec.state in (None, "master"):
        name = spec.param or spec.name
        return name, (1.0 if "norm" in name else 0.02), False
    return f"{spec.state}.{spec.param}", (1e-3 if spec.state == "exp_avg" else 1e-6), spec.state == "exp_avg_sq"


def _indices(shape: tuple[int, ...], region: Region, rows: slice) -> np.ndarray:
    """Global row-major indices (uint64) of ``region`` restricted to ``rows`` of its dim 0."""
    strides = [int(np.prod(shape[d + 1:], dtype=np.int64)) for d in range(len(shape))]
    idx = np.zeros((), dtype=np.uint64)
    for d, (off, size) in enumerate(zip(region.offsets, region.sizes)):
        axis = np.arange(off, off + size, dtype=np.uint64)
        if d == 0:
            axis = axis[rows]
        idx = idx[..., None] + axis * np.uint64(strides[d])
    return idx


def synth_region(spec: TensorSpec, region: Region, seed: int) -> np.ndarray:
    """Raw values (bits as unsigned ints of the dtype's width) of ``region`` of ``spec``."""
    name, scale, positive = _value_stream(spec)
    key = _key(seed, name)
    out = np.empty(region.sizes, dtype=raw_numpy(spec.dtype))
    if region.ndim == 0:
        return _to_dtype(_floats(np.zeros((), np.uint64), key, scale, positive), spec.dtype)
    row = int(np.prod(region.sizes[1:], dtype=np.int64)) or 1
    step = max(1, _CHUNK // row)
    for start in range(0, region.sizes[0], step):
        rows = slice(start, min(start + step, region.sizes[0]))
        vals = _floats(_indices(spec.shape, region, rows), key, scale, positive)
        out[rows] = _to_dtype(vals, spec.dtype)
    return out


def _floats(idx: np.ndarray, key: np.uint64, scale: float, positive: bool) -> np.ndarray:
    bits = _splitmix64(idx ^ key) >> np.uint64(40)  # 24 random bits
    u = bits.astype(np.float32) * np.float32(1.0 / (1 << 24))  # [0, 1)
    vals = u if positive else u * np.float32(2.0) - np.float32(1.0)
    return vals * np.float32(scale)


def _to_dtype(vals: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return vals.astype(np.float32).view(np.uint32)
    if dtype == "bfloat16":  # round to nearest even on the upper 16 bits
        u = vals.astype(np.float32).view(np.uint32).astype(np.uint64)
        return ((u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)).astype(np.uint16)
    if dtype == "float16":
        return vals.astype(np.float16).view(np.uint16)
    if dtype == "float64":
        return vals.astype(np.float64).view(np.uint64)
    raise ValueError(f"cannot synthesize values of dtype {dtype}")


def fill_local(spec: TensorSpec, shard, out: np.ndarray, seed: int) -> None:
    """Write the synthetic values of every piece of ``shard`` into its local array ``out``."""
    for piece in shard.pieces:
        vals = synth_region(spec, piece.global_region, seed)
        out[piece.local_region.to_slices()] = vals.reshape(piece.local_region.sizes)


def stored_nbytes(ptc) -> int:
    """Bytes a checkpoint of ``ptc`` stores: local tensors, padding included, replicas once."""
    return ptc.stored_replicas().total_nbytes()


def synthetic_state(model: str, config, seed: int, step: int = 1000, global_batch: int = 64) -> dict:
    """Non-tensor state of a synthetic job at ``step``: scheduler, per-rank RNG, data position."""
    from ..data.state import DataState
    from ..state import rank_seed, seeded_rng_states

    ranks = {}
    for r in range(config.world_size):
        c = config.coords(r)
        ranks[str(r)] = seeded_rng_states(rank_seed(seed, step, c.tp, c.dp, c.pp))
    num_samples = 1_000_003
    data = DataState.at_position(step * global_batch, seed=seed, global_batch=global_batch,
                                 num_samples=num_samples)
    return {
        "model": model,
        "step": step,
        "lr_scheduler": {"last_epoch": step, "base_lrs": [3e-4], "warmup_steps": 100,
                         "schedule": "cosine", "total_steps": 100_000},
        "rng": {"seed": seed, "layout": str(config), "ranks": ranks},
        "data": data.to_json(),
    }


def write_synthetic_checkpoint(model: str, out_dir, config, seed: int = 0, progress=None,
                               workers: int | None = None) -> None:
    """Write a checkpoint of the named model in ``config`` with deterministic values at
    ``out_dir`` (a directory or any checkpoint location, :mod:`scalai.locations`).

    Raises:
        ValueError: unknown model or impossible layout; not enough free disk space.
        FileExistsError: ``out_dir`` exists.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..checkpoint import default_workers
    from ..checkpoint.staging import check_output
    from ..locations import create_sink, exists, is_directory
    from ..storage.base import ArraySink
    from . import model_ptc

    from ..checkpoint.limits import reserve_descriptors
    from ..config import ParallelConfig

    config = ParallelConfig.parse(config)
    reserve_descriptors(config.world_size, "a checkpoint")
    ptc = model_ptc(model, config)
    if is_directory(out_dir):
        check_output(out_dir, stored_nbytes(ptc), f"{model} in {config}")
    elif exists(out_dir):
        raise FileExistsError(f"output {out_dir} already exists; choose another location or delete it first")
    state = synthetic_state(model, config, seed)
    with create_sink(out_dir, ptc, state) as writer:
        def fill(rank: int) -> None:
            for name, shard in ptc.rank_shards(rank):
                if not writer.stores(rank, name):
                    continue  # a replica stored once, by a lower rank
                if isinstance(writer, ArraySink):  # in place
                    fill_local(ptc.spec(name), shard, writer.array(rank, name), seed)
                else:  # one local tensor at a time, written whole
                    local = np.zeros(shard.shape, raw_numpy(ptc.spec(name).dtype))
                    fill_local(ptc.spec(name), shard, local, seed)
                    writer.write(rank, name, 0, local.reshape(-1))
                    writer.complete(rank, name)
                if progress:
                    progress(int(np.prod(shard.shape)) * raw_numpy(ptc.spec(name).dtype).itemsize)

        pool = ThreadPoolExecutor(workers or default_workers())
        try:
            list(pool.map(fill, range(config.world_size)))
        finally:  # on an interrupt, start no further rank: the abort comes sooner
            pool.shutdown(wait=True, cancel_futures=True)
        writer.commit()
