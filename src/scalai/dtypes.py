"""Element types by name: sizes, safetensors codes, torch and numpy equivalents.

The core names dtypes by torch's spelling (``"bfloat16"``) so that layouts and plans stay
free of torch imports. Copies move raw bytes, so numpy needs only an unsigned integer of
the same width for every dtype (bfloat16 included).
"""

from __future__ import annotations

import numpy as np

__all__ = ["itemsize", "safetensors_code", "from_safetensors_code", "raw_numpy", "torch_dtype",
           "name_of", "DTYPES"]

# name -> (bytes per element, safetensors code)
DTYPES: dict[str, tuple[int, str]] = {
    "float64": (8, "F64"),
    "float32": (4, "F32"),
    "float16": (2, "F16"),
    "bfloat16": (2, "BF16"),
    "int64": (8, "I64"),
    "int32": (4, "I32"),
    "int16": (2, "I16"),
    "int8": (1, "I8"),
    "uint8": (1, "U8"),
    "bool": (1, "BOOL"),
}
_BY_CODE = {code: name for name, (_, code) in DTYPES.items()}
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _check(name: str) -> None:
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; supported: {', '.join(DTYPES)}")


def itemsize(name: str) -> int:
    entry = DTYPES.get(name)
    if entry is None:
        _check(name)  # raises, naming the supported dtypes
    return entry[0]


def safetensors_code(name: str) -> str:
    _check(name)
    return DTYPES[name][1]


def from_safetensors_code(code: str) -> str:
    if code not in _BY_CODE:
        raise ValueError(f"unsupported safetensors dtype {code!r}")
    return _BY_CODE[code]


def raw_numpy(name: str) -> np.dtype:
    """An unsigned integer numpy dtype as wide as ``name``: copies move bits unchanged."""
    return np.dtype(_RAW[itemsize(name)])


def torch_dtype(name: str):
    import torch

    _check(name)
    return getattr(torch, name)


def name_of(dtype) -> str:
    """The name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    name = str(dtype).removeprefix("torch.")
    _check(name)
    return name
