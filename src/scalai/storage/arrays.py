"""Conversion between typed arrays (numpy, torch) and the raw bit arrays that I/O moves.

Storage and copies see every tensor as an array of unsigned integers of its element width
(:func:`scalai.dtypes.raw_numpy`): bits move unchanged, bfloat16 included, and numpy never
converts values.
"""

from __future__ import annotations

import numpy as np

from ..dtypes import itemsize, raw_numpy, torch_dtype

__all__ = ["as_raw", "to_torch"]

_SIGNED = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def as_raw(array, dtype: str, what: str = "array") -> np.ndarray:
    """A raw view (no copy when possible) of ``array`` holding values of dtype ``dtype``.

    ``array`` is a torch tensor of exactly ``dtype``, or a numpy array whose dtype is
    ``dtype`` or already the raw unsigned type of its width (bfloat16 bits as uint16).

    Raises:
        ValueError: the dtype does not match (``what`` names the array in the message).
    """
    raw = raw_numpy(dtype)
    if isinstance(array, np.ndarray):
        if array.dtype == raw or array.dtype.name == dtype:
            return array.view(raw)
        raise ValueError(f"{what} has numpy dtype {array.dtype}, expected {dtype} "
                         f"(or its raw bits as {raw}); convert it before saving")
    import torch

    if not isinstance(array, torch.Tensor):
        raise ValueError(f"{what} is a {type(array).__name__}; give a numpy array or torch tensor")
    if array.dtype != torch_dtype(dtype):
        raise ValueError(f"{what} has dtype {array.dtype}, expected torch.{dtype}; "
                         f"convert it with .to(torch.{dtype}) before saving")
    tensor = array.detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.view(torch.int16)
    return tensor.numpy().view(raw)


def to_torch(raw: np.ndarray, dtype: str):
    """A torch tensor of ``dtype`` that copies the bits of ``raw`` (writable, owns its memory)."""
    import torch

    assert raw.dtype.itemsize == itemsize(dtype)
    signed = np.ascontiguousarray(raw).view(_SIGNED[raw.dtype.itemsize]).copy()
    return torch.from_numpy(signed).view(torch_dtype(dtype))
