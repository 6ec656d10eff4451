"""The pickles of a DCP checkpoint, unpickled with an explicit allow-list.

DCP keeps its ``.metadata`` as a plain pickle of its own dataclasses (not a ``torch.save``
file, so ``torch.load``'s ``weights_only`` reader, :func:`scalai.interop.unpickle.load_pt`,
does not apply), and each chunk's ``torch.save`` blob starts with a ``data.pkl`` that scalai
reads without loading the tensor, to learn where its bytes are. A pickle can name any
importable callable and call it while loading, so a hostile file runs code the moment it is
opened with :func:`pickle.load`. Here a pickle may refer only to the globals of an explicit
allow-list (``(module, name) -> object``); any other reference stops the load before
anything is called, with one line naming what the file asked for.
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import Any, Callable, Mapping

from ...errors import CheckpointError
from ..unpickle import UnsafePickleError

__all__ = ["restricted_loads"]


class _Refused(Exception):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, allowed: Mapping[tuple[str, str], Any],
                 persistent_load: Callable[[Any], Any] | None):
        super().__init__(io.BytesIO(data))
        self._allowed = allowed
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(str(module), str(name)) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError("persistent references are not allowed here")
        return self._persistent(pid)


def restricted_loads(data: bytes, allowed: Mapping[tuple[str, str], Any], *, what: str,
                     persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Unpickle ``data``, building only the globals in ``allowed``.

    Args:
        data: the pickle's bytes.
        allowed: ``(module, name) -> object`` that a reference to ``module.name`` resolves
            to (the real class, or a stand-in that builds a plain value).
        what: the file (and part) for messages, e.g. ``"ckpt/.metadata"``.
        persistent_load: resolves persistent ids (``torch.save``'s storages); ``None``
            refuses them.

    Raises:
        UnsafePickleError: the pickle refers to a global outside ``allowed``.
        CheckpointError: the pickle is truncated or corrupt.
    """
    try:
        return _Unpickler(data, allowed, persistent_load).load()
    except _Refused as exc:
        raise UnsafePickleError(
            f"{what} refers to {exc.module}.{exc.name}, which this format never holds; refusing to "
            f"load it (scalai never runs code from a checkpoint: the file is damaged, hostile, or "
            f"from a version scalai does not know)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            RecursionError, OverflowError, MemoryError, struct.error, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} is truncated or corrupt ({type(exc).__name__}: {exc}); restore it "
                              f"or save the checkpoint again") from None
