"""Reading ``torch.save`` files (``.pt``) without ever running code from them.

A pickle can name any importable function and have the unpickler call it; a checkpoint
from elsewhere must not be able to. :func:`load_pt` reads with ``torch.load``'s
``weights_only`` unpickler, which builds only tensors (torch's own rebuild functions,
storages, dtypes, ``torch.Size``, devices) and plain containers (dict, list, tuple, set,
``OrderedDict``), plus an explicit few inert data types that Megatron-LM checkpoints hold
around their tensors:

- ``argparse.Namespace`` (the run's arguments: its attributes are set, no method of the
  file's choosing runs);
- numpy arrays, dtypes and scalars (the saved numpy RNG state): numpy's own constructors
  for its data, never a function the file names beyond them.

Anything else (``os.system``, ``builtins.eval``, a class of some package) is refused with
one line naming it; nothing it names is imported or called. Files in the zip format
(``torch.save`` since torch 1.6) are memory-mapped, so a tensor's bytes are read when used.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from typing import Any

from ..errors import CheckpointError

__all__ = ["load_pt", "UnsafePickleError"]


class UnsafePickleError(CheckpointError):
    """A ``.pt`` file needs more than tensors and plain data to load."""


def _extra_globals() -> list:
    """The inert data types allowed beyond ``weights_only``'s own, under every name that
    numpy 1 and 2 pickle them by."""
    import argparse

    import numpy as np

    out: list = [argparse.Namespace, np.ndarray, np.dtype]
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    for name in dir(np.dtypes):  # numpy 2 pickles dtypes of arrays by their class
        cls = getattr(np.dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            out.append((cls, f"numpy.dtypes.{name}"))
    return out


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|unrecognized function (\S+)|but got <class '([\w.]+)'>")
_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)")


def load_pt(path: str | os.PathLike) -> Any:
    """The object saved in ``path`` by ``torch.save``, tensors on the CPU.

    Raises:
        UnsafePickleError: the file needs a function or class beyond tensors and plain data
            (the message names it); nothing of it was run.
        CheckpointError: the file is missing or is not a readable ``torch.save`` file.
    """
    import torch

    path = os.fspath(path)
    try:
        mmap = zipfile.is_zipfile(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc.strerror or exc})") from None
    try:
        with torch.serialization.safe_globals(_extra_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        m = _GLOBAL.search(str(exc))
        if m is None:
            detail = _DETAIL.search(str(exc))
            raise CheckpointError(f"{path} is not a readable torch.save file "
                                  f"({detail.group(1).strip() if detail else 'bad pickle'}); it is damaged "
                                  f"or not a checkpoint") from None
        raise UnsafePickleError(
            f"{path} needs {next(g for g in m.groups() if g)} to load, and scalai never runs code from a "
            f"checkpoint (it reads tensors, plain containers, argparse.Namespace and numpy arrays only); "
            f"refused, nothing of it was run") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable torch.save file ({first}); it is damaged or "
                              f"not a checkpoint") from None
