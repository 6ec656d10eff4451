"""The store's HTTP API as an OpenAPI 3.1 document, and validation of JSON bodies against it.

The server validates every JSON request body with the schemas below (so the document is
what the server enforces, not a description written beside it), serves the document at
``GET /v1/openapi.json``, and the tests check that the routes it registers are exactly
the operations listed here and that its answers match the response schemas.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from .lease import LEASE_HEADER, MAX_LEASE_S, MIN_LEASE_S, OWNER_HEADER
from .names import MAX_NAME, MAX_RANK, MAX_TENSOR_NAME

__all__ = ["SPEC", "API_VERSION", "validate_body", "BodyError", "schema"]

API_VERSION = 1

NAME = {"type": "string", "pattern": f"^[A-Za-z0-9][A-Za-z0-9_.\\-]{{0,{MAX_NAME - 1}}}$"}
TENSOR = {"type": "string", "pattern": f"^[A-Za-z0-9_][A-Za-z0-9_.\\-]{{0,{MAX_TENSOR_NAME - 1}}}$"}
BOX = {"type": "string", "pattern": r"^([0-9]+:[0-9]+(,[0-9]+:[0-9]+)*)?$",
       "description": "start:stop per dimension, comma-separated (local coordinates)"}
SHAPE = {"type": "string", "pattern": r"^([0-9]+(,[0-9]+)*)?$"}
CRC = {"type": ["string", "null"], "pattern": "^[0-9a-f]{8}$"}
COUNTS = {"type": "object", "additionalProperties": {"type": "integer"}}
PLACEMENT = {"type": "object", "required": ["gpus_per_host", "hosts"], "additionalProperties": False,
             "properties": {"gpus_per_host": {"type": "integer", "minimum": 1, "maximum": 4096},
                            "hosts": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 65536}}}
PTC = {"type": "object", "required": ["config", "num_layers", "tensors"],
       "properties": {"config": {"type": "string"}, "num_layers": {"type": "integer", "minimum": 0},
                      "tensors": {"type": "array", "items": {"type": "object"}}}}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                       "host": {"type": "string"}}}}},
    "Health": {"type": "object", "required": ["status", "name", "api", "scalai", "uptime_s"],
               "properties": {"status": {"const": "ok"}, "name": NAME, "api": {"type": "integer"},
                              "scalai": {"type": "string"}, "uptime_s": {"type": "number"},
                              "limited": {"type": "boolean"}}},
    "Usage": {"type": "object", "required": ["memory_bytes", "spill_bytes", "jobs", "traffic"],
              "properties": {"memory_bytes": {"type": "integer"}, "spill_bytes": {"type": "integer"},
                             "uploading_bytes": {"type": "integer",
                                                 "description": "memory reserved by uploads in progress"},
                             "memory_limit_bytes": {"type": ["integer", "null"]},
                             "root": {"type": "string"}, "spill": {"type": ["string", "null"]},
                             "jobs": {"type": "object"},
                             "traffic": {"type": "object", "required": ["sent", "received"],
                                         "properties": {"sent": COUNTS, "received": COUNTS,
                                                        "adopted": {**COUNTS, "description": "bytes of "
                                                                    "files adopted from clients on this "
                                                                    "machine (no HTTP body)"}}}}},
    "VersionSummary": {"type": "object", "required": ["version", "committed", "bytes", "tensors"],
                       "properties": {"version": NAME, "committed": {"type": "boolean"},
                                      "sequence": {"type": ["integer", "null"]},
                                      "layout": {"type": ["string", "null"]},
                                      "bytes": {"type": "integer"}, "tensors": {"type": "integer"},
                                      "owner": {"type": "string", "description": "the writer that created it"},
                                      "hosts": {"type": "array", "items": NAME, "description":
                                                "committed: the hosts of its placement that hold ranks"},
                                      "expires_in_s": {"type": "number", "description":
                                                       "uncommitted: seconds until its lease runs out"}}},
    "Job": {"type": "object", "required": ["job", "versions"],
            "properties": {"job": NAME, "versions": {"type": "array",
                                                     "items": {"$ref": "#/components/schemas/VersionSummary"}}}},
    "JobList": {"type": "object", "required": ["jobs"],
                "properties": {"jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}}},
    "TensorInfo": {"type": "object", "required": ["dtype", "shape", "bytes", "crc32"],
                   "properties": {"dtype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                                  "bytes": {"type": "integer"}, "crc32": CRC}},
    "Version": {"type": "object", "required": ["job", "version", "committed", "bytes", "manifest"],
                "properties": {"job": NAME, "version": NAME, "committed": {"type": "boolean"},
                               "bytes": {"type": "integer"},
                               "manifest": {"anyOf": [{"$ref": "#/components/schemas/Manifest"}, {"type": "null"}]},
                               "ranks": {"type": "object", "additionalProperties": {
                                   "type": "object", "additionalProperties": {"$ref": "#/components/schemas/TensorInfo"}}}}},
    "Manifest": {"type": "object", "additionalProperties": False,
                 "required": ["format", "format_version", "job", "version", "sequence", "parent", "ptc",
                              "placement", "state", "created_by", "scratch"],
                 "properties": {"format": {"const": "scalai-store-version"}, "format_version": {"type": "integer"},
                                "job": NAME, "version": NAME, "sequence": {"type": "integer", "minimum": 0},
                                "parent": {"anyOf": [NAME, {"type": "null"}]}, "ptc": PTC,
                                "placement": PLACEMENT, "state": {"type": "object"},
                                "created_by": {"type": "string"}, "scratch": {"type": "boolean"},
                                "lost_ranks": {"type": "array", "maxItems": 65536,
                                               "items": {"type": "integer", "minimum": 0, "maximum": MAX_RANK},
                                               "description": "ranks whose shards are gone (a version "
                                                              "dumped by the survivors of a failure)"},
                                "replicas": {"enum": ["all", "per_host"], "default": "all",
                                             "description": "per_host: each host stores one copy of a "
                                                            "replica its ranks share (PTC.stored_replicas)"}}},
    "CommitRequest": {"type": "object", "required": ["manifest"], "additionalProperties": False,
                      "properties": {"manifest": {"$ref": "#/components/schemas/Manifest"}}},
    "RankFiles": {"type": "object", "required": ["job", "version", "rank", "files"],
                  "properties": {"job": NAME, "version": NAME, "rank": {"type": "integer"},
                                 "files": {"type": "object", "additionalProperties": {
                                     "type": "object", "required": ["path", "offset", "dtype", "shape", "crc32"],
                                     "properties": {"path": {"type": "string"}, "offset": {"type": "integer"},
                                                    "dtype": {"type": "string"},
                                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                                    "bytes": {"type": "integer"}, "crc32": CRC}}}}},
    "UploadResult": {"type": "object", "required": ["job", "version", "rank", "tensor", "bytes", "crc32"],
                     "properties": {"job": NAME, "version": NAME, "rank": {"type": "integer"},
                                    "tensor": TENSOR, "bytes": {"type": "integer"}, "crc32": CRC,
                                    "spilled": {"type": "boolean"}}},
    "LocalInfo": {"type": "object", "required": ["name", "uploads", "key_file", "key"],
                  "properties": {"name": NAME, "uploads": {"type": "string"}, "key_file": {"type": "string"},
                                 "key": {"type": "string"}}},
    "Lease": {"type": "object", "required": ["job", "version", "owner", "committed", "created", "lease_s"],
              "properties": {"job": NAME, "version": NAME, "owner": {"type": "string"},
                             "committed": {"type": "boolean", "description": "committed: nothing to renew"},
                             "created": {"type": "boolean"}, "lease_s": {"type": "number"},
                             "expires_in_s": {"type": "number"}}},
    "FenceRequest": {"type": "object", "additionalProperties": False, "required": ["generation"],
                     "properties": {"generation": {"type": "integer", "minimum": 0, "maximum": 2**62}}},
    "Fence": {"type": "object", "required": ["job", "generation"],
              "properties": {"job": NAME, "generation": {"type": "integer"}}},
    "Deleted": {"type": "object", "required": ["job", "deleted"],
                "properties": {"job": NAME, "deleted": {"type": "array", "items": NAME}}},
    "WindowsRequest": {
        "type": "object", "additionalProperties": False, "required": ["reads"],
        "properties": {"reads": {
            "type": "array", "minItems": 1, "maxItems": 4096,
            "items": {"type": "object", "additionalProperties": False, "required": ["tensor"],
                      "properties": {"tensor": TENSOR, "region": BOX, "view": SHAPE, "sub": BOX}}}}},
    "TransformRequest": {
        "type": "object", "additionalProperties": False,
        "required": ["from_version", "to_version", "old", "new", "peers", "plan"],
        "properties": {
            "from_version": NAME, "to_version": NAME,
            "old": {"type": "object", "required": ["ptc", "placement"], "additionalProperties": False,
                    "properties": {"ptc": PTC, "placement": PLACEMENT,
                                   "replicas": {"enum": ["all", "per_host"], "default": "all"}}},
            "new": {"type": "object", "required": ["layout", "placement"], "additionalProperties": False,
                    "properties": {"layout": {"type": "string", "maxLength": 200}, "placement": PLACEMENT,
                                   "replicas": {"enum": ["all", "per_host"], "default": "all",
                                                "description": "per_host: write a replica that ranks of "
                                                               "one host share once on that host"},
                                   "ptc": {**PTC, "description": "the job's tensors under the new layout "
                                           "(default: the old PTC's split rules at the new degrees)"}}},
            "peers": {"type": "object", "maxProperties": 65536,
                      "additionalProperties": {"type": "string", "pattern": "^https?://[^\\s]+$"}},
            "plan": {"type": "object", "required": ["tensors", "copies"], "additionalProperties": False,
                     "description": "this host's part of the plan, made once by the coordinator: the "
                                    "copies into its ranks (scalai.planner.serial)",
                     "properties": {
                         "tensors": {"type": "array", "maxItems": 1 << 20,
                                     "items": {"type": "string", "maxLength": 255}},
                         "copies": {"type": "array", "maxItems": 1 << 24,
                                    "items": {"type": "array", "minItems": 6, "maxItems": 6,
                                              "description": "[tensor index, src rank, dst rank, src "
                                                             "window, dst window, from_new]"}}}},
            "checksum": {"type": "boolean", "default": True},
            "concurrency": {"type": "integer", "minimum": 1, "maximum": 64, "default": 8,
                            "description": "ranged reads of peers in flight"},
            "claimed": {"type": "boolean", "default": False,
                        "description": "the coordinator claimed to_version first (lease create=true): "
                                       "404 if that claim is gone instead of creating the version"}}},
    "TransformResult": {
        "type": "object", "required": ["host", "copies", "local_bytes", "fetched_bytes", "seconds"],
        "properties": {"host": NAME, "copies": {"type": "integer"},
                       "local_bytes": {"type": "integer", "description": "bytes copied within this store"},
                       "linked_bytes": {"type": "integer",
                                        "description": "bytes of new tensors that are hard links to the old "
                                                       "version's unchanged files here: not copied"},
                       "fetched_bytes": COUNTS, "requests": {"type": "integer"},
                       "seconds": {"type": "object", "additionalProperties": {"type": "number"}},
                       "parts": {"type": "object", "additionalProperties": {"type": "number"},
                                 "description": "the plan runner's parts (seconds summed over its threads)"},
                       "tensors": {"type": "integer"}, "bytes": {"type": "integer"}}},
}


def _p(name: str, schema: dict, where: str = "path", required: bool = True, doc: str = "") -> dict:
    return {"name": name, "in": where, "required": required, "schema": schema, "description": doc}


_JOB = _p("job", NAME)
_VERSION = _p("version", NAME)
_RANK = _p("rank", {"type": "integer", "minimum": 0, "maximum": MAX_RANK - 1})
_TENSOR = _p("tensor", TENSOR)
_OWNER = _p(OWNER_HEADER, NAME, "header", False,
            "the writer: a version belongs to the owner that created it; writing, committing or "
            "(owner-scoped) deleting another owner's version is refused with 409")
_LEASE = _p(LEASE_HEADER, {"type": "number", "minimum": MIN_LEASE_S, "maximum": MAX_LEASE_S}, "header", False,
            "seconds the uncommitted version lives without renewal (default: the store's --lease)")


def _json(ref: str, doc: str) -> dict:
    return {"description": doc, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


_ERRORS = {code: _json("Error", why) for code, why in {
    "400": "bad input: a name, rank, region, query or body is invalid (the message says which)",
    "401": "missing or wrong token", "403": "not allowed from this client's address",
    "404": "no such job, version, tensor or route",
    "408": "the client stopped sending in the middle of its request (the store's idle timeout)",
    "409": "conflicts with the version's state (committed, incomplete, being written, another owner's)",
    "413": "request body larger than the store accepts",
    "422": "the request exceeds a limit of scalai.limits (layers, ranks, tensors, nesting); the "
           "message names it and the environment variable that raises it",
    "502": "a peer store failed during a transformation (host names it)",
    "507": "no room in memory and no spill directory"}.items()}


def _op(summary: str, ok: str, ok_doc: str, params: list, status: str = "200", body: dict | None = None,
        errors: tuple[str, ...] = ("400", "401", "404")) -> dict:
    out = {"summary": summary, "parameters": params,
           "responses": {status: _json(ok, ok_doc) if ok else {"description": ok_doc},
                         **{e: _ERRORS[e] for e in errors}}}
    if body is not None:
        out["requestBody"] = body
    return out


_TENSOR_BYTES = {"description": "the selection's raw bytes, row-major (bfloat16 as its 16 bits)",
                 "headers": {"X-Scalai-Dtype": {"schema": {"type": "string"}},
                             "X-Scalai-Shape": {"schema": SHAPE}},
                 "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "scalai tensor store", "version": str(API_VERSION),
             "description": "Per-host store of the shards of training jobs: jobs / versions / ranks / "
                            "tensors, N-d region reads sliced on the server, atomic commits, and "
                            "distributed transformations between layouts. See docs/store.md."},
    "security": [{"bearer": []}],
    "components": {"schemas": SCHEMAS, "securitySchemes": {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "required on every request when the store has a token (always off loopback)"}}},
    "paths": {
        "/v1/health": {"get": _op("liveness and identity", "Health", "the store is up", [], errors=("401",))},
        "/v1/usage": {"get": _op("bytes held, per job and version; bytes sent and received", "Usage",
                                 "usage", [], errors=("401",))},
        "/v1/openapi.json": {"get": _op("this document", "", "the OpenAPI document", [], errors=("401",))},
        "/v1/jobs": {"get": _op("list jobs and their versions", "JobList", "jobs", [], errors=("401",))},
        "/v1/jobs/{job}": {
            "get": _op("one job's versions", "Job", "the job", [_JOB]),
            "delete": _op("delete every version of a job (no owner: an operator's delete)", "Deleted", "deleted",
                          [_JOB])},
        "/v1/jobs/{job}/versions/{version}": {
            "get": _op("a version: committed?, manifest, stored tensors", "Version", "the version",
                       [_JOB, _VERSION, _p("tensors", {"type": "boolean"}, "query", False,
                                           "list the stored tensors (default true)")]),
            "delete": _op("delete a version and cancel a transformation writing it; with X-Scalai-Owner, "
                          "only if that owner created it (409 otherwise): a writer's cleanup", "Deleted",
                          "deleted", [_JOB, _VERSION, _OWNER], errors=("400", "401", "404", "409"))},
        "/v1/jobs/{job}/versions/{version}/commit": {
            "post": _op("commit a version atomically (checks that this store holds its ranks' tensors and, "
                        "with X-Scalai-Owner, that the version is that owner's)",
                        "Version", "committed", [_JOB, _VERSION, _OWNER],
                        body={"required": True, "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/CommitRequest"}}}},
                        errors=("400", "401", "404", "408", "409", "413", "422"))},
        "/v1/jobs/{job}/versions/{version}/lease": {
            "post": _op("renew the caller's lease of an uncommitted version, or claim it (create=true: an "
                        "empty version owned by the caller); a version whose lease runs out is deleted and "
                        "a transformation writing it cancelled",
                        "Lease", "the lease", [_JOB, _VERSION, {**_OWNER, "required": True}, _LEASE,
                                               _p("create", {"type": "boolean"}, "query", False,
                                                  "create the version if absent (default false)")],
                        errors=("400", "401", "404", "409"))},
        "/v1/jobs/{job}/fence": {
            "post": _op("refuse writers of the job whose owner id names a generation below the one given "
                        "(g<N>-...: an elastic run's workers and coordinator); fences only rise",
                        "Fence", "the job's fence", [_JOB],
                        body={"required": True, "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/FenceRequest"}}}},
                        errors=("400", "401", "413"))},
        "/v1/jobs/{job}/versions/{version}/ranks/{rank}/files": {
            "get": _op("the files of a rank's committed tensors, to map on this machine (loopback "
                       "clients, and clients that show the key they read from the key file GET /v1/local "
                       "names; 403 elsewhere)", "RankFiles", "tensor name -> file",
                       [_JOB, _VERSION, _RANK, _p("X-Scalai-Local-Key", {"type": "string"}, "header", False,
                                                  "the store's key, as read from its key file")],
                       errors=("400", "401", "403", "404", "409"))},
        "/v1/jobs/{job}/versions/{version}/ranks/{rank}/windows": {
            "post": {**_op("read several tensors or N-d regions of one rank's tensors at once (each item as "
                           "the query of a tensor GET); their bytes one after the other, in order, at most "
                           "64 MiB in all (413 beyond)", "", "", [_JOB, _VERSION, _RANK],
                           body={"required": True, "content": {"application/json": {
                               "schema": {"$ref": "#/components/schemas/WindowsRequest"}}}},
                           errors=("400", "401", "404", "409", "413")),
                     "responses": {"200": {**_TENSOR_BYTES, "description": "the selections' raw bytes, "
                                           "row-major, concatenated in the request's order",
                                           "headers": {"X-Scalai-Count": {"schema": {"type": "integer"}}}},
                                   **{e: _ERRORS[e] for e in ("400", "401", "404", "409", "413")}}}},
        "/v1/jobs/{job}/versions/{version}/ranks/{rank}/tensors/{tensor}": {
            "get": {**_op("read a tensor or an N-d region of it (sliced on the server, streamed)", "",
                          "", [_JOB, _VERSION, _RANK, _TENSOR,
                               _p("region", BOX, "query", False, "box of the local tensor"),
                               _p("view", SHAPE, "query", False, "reshape the (1-d) region to this"),
                               _p("sub", BOX, "query", False, "box of the view")],
                          errors=("400", "401", "404", "409")),
                    "responses": {"200": _TENSOR_BYTES, **{e: _ERRORS[e] for e in ("400", "401", "404", "409")}}},
            "put": _op("upload a tensor (streamed; replaces an earlier upload of an uncommitted version; "
                       "creates the version, owned by X-Scalai-Owner, if absent)",
                       "UploadResult", "stored", [_JOB, _VERSION, _RANK, _TENSOR,
                                                  _p("dtype", {"type": "string"}, "query", True, "e.g. bfloat16"),
                                                  _p("shape", SHAPE, "query", True, "local shape, e.g. 768,3072"),
                                                  _OWNER, _LEASE],
                       status="201", errors=("400", "401", "404", "408", "409", "413", "422", "507"),
                       body={"required": True, "content": {"application/octet-stream": {
                           "schema": {"type": "string", "format": "binary"}}}})},
        "/v1/jobs/{job}/versions/{version}/ranks/{rank}/tensors/{tensor}/adopt": {
            "post": _op("adopt a tensor file that a client on this machine wrote into the upload directory "
                        "(GET /v1/local): the same checks as a PUT (owner, fence, uncommitted), plus a private "
                        "regular file of the declared dtype and shape with its CRC-32; renamed into the "
                        "version, or deleted if refused",
                        "UploadResult", "stored", [_JOB, _VERSION, _RANK, _TENSOR,
                                                   _p("file", {"type": "string", "pattern": "^local-[0-9a-f]{32}$"},
                                                      "query", True, "the file's name in the upload directory "
                                                      "(GET /v1/local)"),
                                                   _p("dtype", {"type": "string"}, "query", True, "e.g. bfloat16"),
                                                   _p("shape", SHAPE, "query", True, "local shape, e.g. 768,3072"),
                                                   _OWNER, _LEASE], status="201",
                        errors=("400", "401", "404", "409", "413", "422", "507"))},
        "/v1/local": {"get": _op("where a client on this machine writes tensor files to be adopted, and the "
                                 "random key in that directory (a client that reads it there shares the "
                                 "directory; elsewhere it uploads over HTTP)", "LocalInfo", "the upload "
                                 "directory", [], errors=("401",))},
        "/v1/jobs/{job}/transform": {
            "post": _op("run this host's part of a plan: build a new version from an old one, pulling "
                        "local slices by memory copy and remote ones by ranged reads from peer stores; the "
                        "new version belongs to X-Scalai-Owner (it may have claimed it first) and is cancelled "
                        "and deleted if its lease runs out",
                        "TransformResult", "this host's part is written (uncommitted)", [_JOB, _OWNER, _LEASE],
                        body={"required": True, "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/TransformRequest"}}}},
                        errors=("400", "401", "404", "408", "409", "413", "422", "502", "507"))},
    },
}


class BodyError(ValueError):
    """A JSON body that does not match its schema (HTTP 400)."""


def schema(name: str) -> dict:
    """A component schema with ``$ref`` resolvable (for jsonschema)."""
    return {"$ref": f"#/components/schemas/{name}", "components": {"schemas": SCHEMAS}}


@lru_cache(maxsize=None)
def _validator(name: str):
    import jsonschema

    return jsonschema.Draft202012Validator(schema(name))


def validate_body(obj: Any, name: str) -> None:
    """Raise :class:`BodyError` naming the first problem if ``obj`` does not match ``name``."""
    error = next(iter(_validator(name).iter_errors(obj)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "body"
        raise BodyError(f"{name}: {where}: {error.message[:300]}")
