"""The manifest of a checkpoint directory: what is stored where, with checksums.

``manifest.json`` is written last and atomically; its presence is what makes a directory
a checkpoint. Layout (version 3)::

    {
      "format": "scalai-checkpoint",
      "version": 3,
      "created_by": "scalai 0.1.0",
      "checksum_algorithm": "crc32",
      "ptc": {"config": "tp=2,pp=1,dp=1", "num_layers": 2, "tensors": [...]},
      "ranks": [
        {"rank": 0, "file": "rank-00000.safetensors", "bytes": 8392,
         "tensors": {"embedding.weight": {"dtype": "bfloat16", "shape": [512, 64],
                                          "checksum": "9a3c01ff"}, ...}},
        ...
      ],
      "state": {"step": 100, ...}
    }

``ranks[r].tensors`` lists, in file order, exactly the local tensors that
``ptc.rank_shards(r)`` names, with their local shapes; ``checksum`` is the CRC-32 of the
tensor's raw bytes as 8 hex digits. A replica (the same shard held by several
data-parallel ranks, or a tied embedding's two copies) is stored once, in the file of one
rank holding it (``PTC.replica_owner``: chosen to balance bytes across files); the others
record ``"stored_in": <that rank>`` instead of a checksum (version 2; version 1 stored every
replica). A rank whose local shard is all padding (a padded vocabulary's last
tensor-parallel ranks) lists it, zero-filled, as Megatron-LM does (version 3; versions 1 and
2 left it out, and are read with a PTC that does the same); ``state`` is the caller's JSON (step, schedulers, RNG,
data position). The parser is strict: unknown keys, wrong types or a layout that
disagrees with the tensors listed make the manifest invalid; a newer version is refused.
"""

from __future__ import annotations

import json
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from ..bounded import loads, read_regular
from ..errors import CheckpointError
from ..layout.ptc import PTC
from ..storage.checksum import ALGORITHM

__all__ = ["FORMAT", "VERSION", "MANIFEST_NAME", "MAX_MANIFEST_BYTES", "TensorRecord", "RankRecord",
           "Manifest", "rank_file_name", "read_manifest", "parse_manifest", "write_manifest", "manifest_bytes",
           "atomic_write", "replacing"]

_HEX8 = re.compile("[0-9a-f]{8}")  # a recorded CRC-32: eight lowercase hex digits

FORMAT = "scalai-checkpoint"
VERSION = 3
MANIFEST_NAME = "manifest.json"
#: Largest manifest read: about 40 KB per rank of GPT-3 175B, so some 25,000 ranks.
MAX_MANIFEST_BYTES = 1 << 30


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


@dataclass(frozen=True, slots=True)
class TensorRecord:
    """One local tensor: dtype name, local shape, and either the CRC-32 of its raw bytes
    (stored in this rank's file) or ``stored_in``: the rank whose file holds the identical
    replica (data-parallel replicas are stored once)."""

    dtype: str
    shape: tuple[int, ...]
    checksum: int | None
    stored_in: int | None = None

    def __post_init__(self) -> None:
        if (self.checksum is None) == (self.stored_in is None):
            raise ValueError("a tensor record has either a checksum or stored_in, not both")

    def to_json(self) -> dict:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape)}
        if self.stored_in is None:
            out["checksum"] = f"{self.checksum:08x}"
        else:
            out["stored_in"] = self.stored_in
        return out


@dataclass(frozen=True, slots=True)
class RankRecord:
    """One rank's file: its name, its size in bytes and its tensors (in file order)."""

    rank: int
    file: str
    nbytes: int
    tensors: dict[str, TensorRecord]

    def holds(self, entries) -> bool:
        """Whether a rank file's header ``entries`` (name -> entry with ``dtype`` and
        ``shape``) are exactly the tensors this record says the file stores."""
        return sorted((n, e.dtype, tuple(e.shape)) for n, e in entries.items()) == sorted(
            (n, t.dtype, t.shape) for n, t in self.tensors.items() if t.stored_in is None)


@dataclass(frozen=True)
class Manifest:
    ptc: PTC
    ranks: tuple[RankRecord, ...]
    state: dict[str, Any]
    created_by: str = ""

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "created_by": self.created_by,
            "checksum_algorithm": ALGORITHM, "ptc": self.ptc.to_json(),
            "ranks": [{"rank": r.rank, "file": r.file, "bytes": r.nbytes,
                       "tensors": {n: t.to_json() for n, t in r.tensors.items()}} for r in self.ranks],
            "state": self.state,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str = "manifest.json") -> Manifest:
        """Parse strictly; raises :class:`CheckpointError` naming ``where`` and the problem."""
        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"{where} is invalid: {why}")

        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise bad(f"not a {FORMAT} manifest")
        version = obj.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise bad(f"version {version!r} is not a positive integer")
        if version > VERSION:
            raise CheckpointError(
                f"{where} has format version {version}, newer than the {VERSION} this scalai "
                f"reads; upgrade scalai (pip install -U scalai) to read this checkpoint")
        expected = {"format", "version", "created_by", "checksum_algorithm", "ptc", "ranks", "state"}
        if set(obj) != expected:
            raise bad(f"keys {sorted(set(obj) ^ expected)} are unexpected or missing")
        if obj["checksum_algorithm"] != ALGORITHM:
            raise bad(f"unknown checksum algorithm {obj['checksum_algorithm']!r}")
        if not isinstance(obj["state"], dict):
            raise bad("state is not a JSON object")
        step = obj["state"].get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise bad(f"state.step {step!r:.40} is not a non-negative integer")
        if not isinstance(obj["state"].get("data", {}), dict):
            raise bad("state.data (the data position) is not a JSON object")
        try:
            ptc = PTC.from_json(obj["ptc"], padding_shards=version >= 3)
        except (ValueError, KeyError, TypeError) as exc:
            raise bad(f"the layout does not parse ({exc})") from None
        ranks = obj["ranks"]
        if not isinstance(ranks, list) or len(ranks) != ptc.config.world_size:
            raise bad(f"layout {ptc.config} has {ptc.config.world_size} ranks, "
                      f"the manifest lists {len(ranks) if isinstance(ranks, list) else 'none'}")
        records = tuple(_rank_record(r, i, ptc, bad) for i, r in enumerate(ranks))
        _check_replicas(records, ptc, bad)
        return cls(ptc, records, obj["state"], str(obj["created_by"]))


def _rank_record(obj: Any, rank: int, ptc: PTC, bad) -> RankRecord:
    if not isinstance(obj, dict) or set(obj) != {"rank", "file", "bytes", "tensors"}:
        raise bad(f"entry {rank} of ranks is not {{rank, file, bytes, tensors}}")
    if obj["rank"] != rank or obj["file"] != rank_file_name(rank):
        raise bad(f"entry {rank} of ranks names rank {obj['rank']!r}, file {obj['file']!r}")
    if not isinstance(obj["bytes"], int) or obj["bytes"] < 8 or not isinstance(obj["tensors"], dict):
        raise bad(f"rank {rank} has a bad byte count or tensor table")
    expected = ptc.rank_shards(rank)
    if list(obj["tensors"]) != [name for name, _ in expected]:
        raise bad(f"rank {rank} lists other tensors than layout {ptc.config} gives it")
    tensors = {}
    for name, shard in expected:
        t = obj["tensors"][name]
        try:
            if isinstance(t, dict) and "stored_in" in t:
                ok = set(t) == {"dtype", "shape", "stored_in"} and isinstance(t["stored_in"], int) \
                    and not isinstance(t["stored_in"], bool)
                record = TensorRecord(t["dtype"], tuple(t["shape"]), None, t["stored_in"])
            else:
                ok = set(t) == {"dtype", "shape", "checksum"} and _HEX8.fullmatch(t["checksum"]) is not None
                record = TensorRecord(t["dtype"], tuple(t["shape"]), int(t["checksum"], 16))
            ok = ok and all(isinstance(s, int) for s in t["shape"])
        except (TypeError, ValueError, KeyError):
            ok = False
        if not ok or record.shape != shard.shape or record.dtype != ptc.spec(name).dtype:
            raise bad(f"rank {rank} tensor {name}: {t!r} does not match the layout "
                      f"(dtype {ptc.spec(name).dtype}, local shape {list(shard.shape)})")
        tensors[name] = record
    return RankRecord(rank, obj["file"], obj["bytes"], tensors)


def _check_replicas(records: tuple[RankRecord, ...], ptc: PTC, bad) -> None:
    """Every ``stored_in`` names another holder of the very same shard that stores it."""
    for record in records:
        for name, t in record.tensors.items():
            if t.stored_in is None:
                continue
            holding = next(h for h in ptc.holdings(name) if record.rank in h.ranks)
            owner = t.stored_in
            if owner == record.rank or owner not in holding.ranks \
                    or records[owner].tensors[name].stored_in is not None:
                raise bad(f"rank {record.rank} tensor {name} is said to be stored by rank {owner}, "
                          f"which does not store an identical replica")


@contextmanager
def replacing(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A temporary name next to ``path`` to write the new file under (ending in ``suffix``);
    renamed to ``path`` when the block ends, removed if it raises (all or nothing). Threads
    may replace the same path at once: each has its own temporary file (pid and thread id),
    the last rename wins."""
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}-{threading.get_ident()}{suffix}"
    try:
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write(path: str, data: bytes, sync: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename (:func:`replacing`)."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


_LINE = json.JSONEncoder(separators=(", ", ": "), allow_nan=False)  # one encoder, not one per line


def _dumps(obj: dict) -> str:
    """JSON with one line per top-level key, per tensor spec and per rank (readable, compact).

    Strict JSON (``NaN`` and infinities refused), as :func:`parse_manifest` reads it.
    """
    line = _LINE.encode

    ptc = obj["ptc"]
    ptc_text = ("{" + ", ".join(f"{line(k)}: {line(v)}" for k, v in ptc.items() if k != "tensors")
                + ', "tensors": [\n   ' + ",\n   ".join(line(t) for t in ptc["tensors"]) + "]}")
    ranks_text = "[\n  " + ",\n  ".join(line(r) for r in obj["ranks"]) + "]"
    parts = {k: ptc_text if k == "ptc" else ranks_text if k == "ranks" else line(v) for k, v in obj.items()}
    return "{\n" + ",\n".join(f" {line(k)}: {v}" for k, v in parts.items()) + "\n}\n"


def manifest_bytes(manifest: Manifest) -> bytes:
    """The text of ``manifest.json`` (UTF-8), as every backend writes it."""
    return _dumps(manifest.to_json()).encode()


def write_manifest(directory: str, manifest: Manifest, sync: bool = True) -> None:
    atomic_write(os.path.join(directory, MANIFEST_NAME), manifest_bytes(manifest), sync)


def read_manifest(directory: str) -> Manifest:
    """Read and parse ``directory/manifest.json``.

    Raises:
        CheckpointError: the directory or its manifest is missing or invalid.
    """
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist or is not a directory")
    path = os.path.join(directory, MANIFEST_NAME)
    try:
        text = read_regular(path, MAX_MANIFEST_BYTES, "manifest", CheckpointError,
                            "; the checkpoint is damaged: restore the file or use an earlier checkpoint")
    except FileNotFoundError:
        if _is_empty(directory):
            raise CheckpointError(f"{directory} is empty: it is not a checkpoint (a scalai checkpoint holds "
                                  f"{MANIFEST_NAME}, a PyTorch DCP checkpoint .metadata); give the checkpoint's "
                                  f"directory") from None
        raise CheckpointError(_foreign(directory) or f"{directory} has no {MANIFEST_NAME}: the save did not "
                              f"finish; use an earlier checkpoint") from None
    return parse_manifest(text, path)


def _is_empty(directory: str) -> bool:
    try:
        return not os.listdir(directory)
    except OSError:
        return False


#: Files that mark another framework's checkpoint, and how to bring it in.
_FOREIGN = ((".metadata", "a PyTorch DCP checkpoint", "scalai import dcp {0} OUT --layout L --rules FILE"),
            ("config.json", "a Hugging Face model directory", "scalai import hf {0} OUT --layout L"))


def _foreign(directory: str) -> str | None:
    """What to say about a directory without a manifest that another framework wrote."""
    for marker, what, how in _FOREIGN:
        if os.path.isfile(os.path.join(directory, marker)):
            return f"{directory} is {what}, not a scalai checkpoint; bring it in with: {how.format(directory)}"
    return None


def parse_manifest(text: bytes | str, where: str = MANIFEST_NAME) -> Manifest:
    """Parse the bytes of a manifest (bounded JSON, then :meth:`Manifest.from_json`).

    Raises:
        CheckpointError: naming ``where``: not JSON, nested too deep, ``NaN``, or invalid.
    """
    obj = loads(text, where, error=CheckpointError, max_bytes=MAX_MANIFEST_BYTES,
                hint="; the file is corrupt, use an earlier checkpoint")
    return Manifest.from_json(obj, where)
