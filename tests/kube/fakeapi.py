"""A faithful fake Kubernetes API server for the kube tests.

Real HTTP on 127.0.0.1 (stdlib ``http.server`` in a thread), JSON bodies, the
real URL layout, and the API machinery semantics the driver relies on:

* ``/api/v1/...`` and ``/apis/GROUP/VERSION/...`` paths, cluster-scoped and
  namespaced (``namespaces/NS/PLURAL[/NAME[/SUB]]``);
* one global ``resourceVersion`` counter; PUT with a stale resourceVersion is
  409 Conflict; custom resources refuse unconditional PUT (422), as
  ``customResourceStrategy.AllowUnconditionalUpdate`` does;
* 404 NotFound, 409 AlreadyExists on create, 400 on a name/kind mismatch;
* the status subresource: PUT/PATCH on ``/status`` changes only status, PUT on
  the main resource keeps the old status; create drops status;
  ``metadata.generation`` is bumped only when something outside metadata and
  status changes; a no-op write keeps the resourceVersion and sends no event;
* labels and ``labelSelector`` (=, ==, !=, in, notin, exists, !exists),
  ``fieldSelector`` on metadata.name/metadata.namespace;
* ``limit``/``continue`` pagination served from a snapshot at the first page's
  resourceVersion (410 Gone once the history no longer reaches it);
* finalizers: DELETE of an object with finalizers sets deletionTimestamp and
  keeps it until an update removes the last finalizer; no finalizer can be
  added once deletion started; DELETE preconditions (uid, resourceVersion);
* watches: ``?watch=true`` streams chunked JSON lines ADDED/MODIFIED/DELETED,
  resumes after ``resourceVersion`` (ERROR 410 when too old), honours
  ``timeoutSeconds`` and label selectors (objects moving in/out of the
  selector are ADDED/DELETED, as the watch cache does);
* merge-patch (RFC 7386) and JSON patch (RFC 6902); strategic merge patch is
  415 for custom resources, as on a real server;
* custom resources are defaulted and validated against the CRD's
  openAPIV3Schema (422 Invalid); unknown fields are pruned with a Warning
  header, or 400 BadRequest under ``fieldValidation=Strict``;
* metadata validation: DNS-1123 names, label and annotation syntax and size.

Built-in kinds served: Lease (coordination.k8s.io/v1), Event (v1 and
events.k8s.io/v1), Job (batch/v1, with status), Pod (v1, with status and a
``/log`` subresource whose text the test sets), PersistentVolumeClaim (v1) and
VolumeSnapshot (snapshot.storage.k8s.io/v1, schemaless).  Built-in bodies are checked
with kubernetes-validate's schemas when it is installed.

Tests drive what controllers would do (a Job's status, a Pod's log) through
the hooks at the bottom of `FakeApiServer`: also injected faults (`inject_fault`: a 5xx or 429
answer, or a connection closed unanswered, e.g. on pods/log), a Job retried under the same name
(`recreate_job`: a new uid, the old pods left), writes whose answer is lost (`inject_fault(lost=True)`),
open watches ended at once (`end_watches`: what an
API server restart or a proxy's timeout does; clients watch or list again), and pods/log's
tailLines/limitBytes.
the hooks at the bottom of `FakeApiServer`.  `inject_conflicts(rate)` plays
another writer racing the client: before a PUT or a DELETE of a custom
resource, with probability `rate`, the object is first changed by someone else
(an annotation, a new resourceVersion, a MODIFIED event), so the client's
resourceVersion is really stale and the server answers 409 as a real one would.

RBAC (`enforce_rbac`, fakerbac.py): with an authorizer, every request is authenticated by its
bearer token and authorized against the Roles, ClusterRoles and bindings it was given (the
rendered chart), and answered 401 or 403 Forbidden (kube-apiserver's Status) when not allowed.
"""
from __future__ import annotations

import base64
import bisect
import copy
import dataclasses
import datetime as dt
import http.server
import json
import re
import socket
import threading
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ANNOTATIONS_MAX = 256 * 1024


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> Obj:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "details": self.details,
                "code": self.code}


@dataclasses.dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status: bool                      # has a status subresource
    schema: Obj | None = None         # CRD openAPIV3Schema
    custom: bool = False
    unconditional_update: bool = True
    return_deleted: bool = False      # DELETE answers with the object, not a Status

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def gr(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


BUILTINS = (
    Resource("coordination.k8s.io", "v1", "leases", "Lease", True, False),
    Resource("", "v1", "events", "Event", True, False),
    Resource("events.k8s.io", "v1", "events", "Event", True, False),
    Resource("batch", "v1", "jobs", "Job", True, True),
    Resource("", "v1", "pods", "Pod", True, True, return_deleted=True),
    # what copy Events are about (their uid goes into `regarding`)
    Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, True),
    Resource("snapshot.storage.k8s.io", "v1", "volumesnapshots", "VolumeSnapshot", True, True, custom=True),
)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- selectors

@dataclasses.dataclass(frozen=True)
class _Req:
    key: str
    op: str           # = != in notin exists !exists
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        has = self.key in labels
        v = labels.get(self.key)
        if self.op == "exists":
            return has
        if self.op == "!exists":
            return not has
        if self.op in ("=", "in"):
            return has and v in self.values
        if self.op in ("!=", "notin"):
            return not has or v not in self.values
        raise AssertionError(self.op)


def parse_label_selector(text: str) -> list[_Req]:
    reqs: list[_Req] = []
    parts: list[str] = []
    depth, cur = 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    for raw in parts:
        p = raw.strip()
        m = re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", p)
        if m:
            vals = tuple(x.strip() for x in m.group(3).split(",") if x.strip())
            reqs.append(_Req(m.group(1), m.group(2), vals))
            continue
        m = re.fullmatch(r"([^=!\s]+)\s*(==|!=|=)\s*(\S*)", p)
        if m:
            op = "=" if m.group(2) in ("=", "==") else "!="
            reqs.append(_Req(m.group(1), op, (m.group(3),)))
            continue
        if p.startswith("!") and _valid_label_key(p[1:]):
            reqs.append(_Req(p[1:], "!exists"))
            continue
        if _valid_label_key(p):
            reqs.append(_Req(p, "exists"))
            continue
        raise ApiError(400, "BadRequest", f"unable to parse requirement: {p!r}")
    for r in reqs:
        if not _valid_label_key(r.key) or any(not _LABEL_VALUE.match(v) or len(v) > 63 for v in r.values):
            raise ApiError(400, "BadRequest", f"invalid label selector: {text!r}")
    return reqs


def _valid_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_QUALIFIED_NAME.match(name))


def _match(obj: Obj, labels: list[_Req], fields: list[tuple[str, str, str]]) -> bool:
    meta = obj.get("metadata", {})
    lab = meta.get("labels") or {}
    if not all(r.matches(lab) for r in labels):
        return False
    for path, op, want in fields:
        have = {"metadata.name": meta.get("name", ""),
                "metadata.namespace": meta.get("namespace", "")}.get(path)
        if have is None:
            raise ApiError(400, "BadRequest", f"field label not supported: {path}")
        if (have == want) != (op == "="):
            return False
    return True


def _parse_field_selector(text: str) -> list[tuple[str, str, str]]:
    out = []
    for p in filter(None, (x.strip() for x in text.split(","))):
        m = re.fullmatch(r"([^=!]+)(==|!=|=)(.*)", p)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector: {p!r}")
        out.append((m.group(1), "=" if m.group(2) != "!=" else "!=", m.group(3)))
    return out


# ---------------------------------------------------------------- patches

def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, ops: list[Obj]) -> Any:
    doc = copy.deepcopy(doc)

    def parent(tokens: list[str]) -> tuple[Any, str]:
        cur = doc
        for t in tokens[:-1]:
            cur = cur[int(t)] if isinstance(cur, list) else cur[t]
        return cur, tokens[-1]

    def get(tokens: list[str]) -> Any:
        cur = doc
        for t in tokens:
            cur = cur[int(t)] if isinstance(cur, list) else cur[t]
        return cur

    def add(tokens: list[str], value: Any) -> None:
        nonlocal doc
        if not tokens:
            doc = value
            return
        p, last = parent(tokens)
        if isinstance(p, list):
            idx = len(p) if last == "-" else int(last)
            if idx > len(p):
                raise IndexError(last)
            p.insert(idx, value)
        else:
            p[last] = value

    def remove(tokens: list[str]) -> Any:
        p, last = parent(tokens)
        if isinstance(p, list):
            return p.pop(int(last))
        return p.pop(last)

    for op in ops:
        try:
            kind, path = op["op"], _pointer(op["path"])
            if kind == "add":
                add(path, copy.deepcopy(op["value"]))
            elif kind == "remove":
                remove(path)
            elif kind == "replace":
                get(path)
                if path:
                    remove(path)
                add(path, copy.deepcopy(op["value"]))
            elif kind == "move":
                add(path, remove(_pointer(op["from"])))
            elif kind == "copy":
                add(path, copy.deepcopy(get(_pointer(op["from"]))))
            elif kind == "test":
                if get(path) != op["value"]:
                    raise ApiError(422, "Invalid", f"test operation failed at {op['path']}")
            else:
                raise ApiError(400, "BadRequest", f"unknown JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise ApiError(422, "Invalid", f"JSON patch {op!r} failed: {e!r}") from e
    return doc


# ---------------------------------------------------------------- schema

class SchemaErrors:
    def __init__(self) -> None:
        self.invalid: list[str] = []
        self.unknown: list[str] = []


_INT_FORMATS = {"int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1)}


def apply_defaults(schema: Obj, value: Any) -> Any:
    """Structural defaulting, as the apiserver does on write and read."""
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        for name, sub in props.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for k in list(value):
                if k not in props:
                    value[k] = apply_defaults(extra, value[k])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def validate_schema(schema: Obj, value: Any, path: str, errs: SchemaErrors, *, prune: bool) -> Any:
    """Check `value` against a structural schema; returns the pruned value."""
    if value is None:
        if not schema.get("nullable"):
            errs.invalid.append(f"{path}: Invalid value: \"null\": {path} in body must be of type "
                                f"{schema.get('type', 'any')}")
        return value
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            errs.invalid.append(f"{path}: Invalid value: must be an integer or a string")
        return value
    typ = schema.get("type")
    ok = {
        None: True,
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
    }.get(typ, False)
    if not ok:
        errs.invalid.append(f"{path}: Invalid value: {json.dumps(value)[:80]}: {path} in body must be of type {typ}")
        return value
    if "enum" in schema and value not in schema["enum"]:
        errs.invalid.append(f"{path}: Unsupported value: {json.dumps(value)[:80]}: supported values: "
                            + ", ".join(json.dumps(x) for x in schema["enum"]))
    if typ == "string":
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errs.invalid.append(f"{path}: Too long: may not be more than {schema['maxLength']} bytes")
        if "minLength" in schema and len(value) < schema["minLength"]:
            errs.invalid.append(f"{path}: Invalid value: should be at least {schema['minLength']} chars long")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errs.invalid.append(f"{path}: Invalid value: {value!r}: {path} in body should match "
                                f"'{schema['pattern']}'")
        if schema.get("format") == "date-time" and not re.fullmatch(
                r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value):
            errs.invalid.append(f"{path}: Invalid value: {value!r}: must be a date-time")
    if typ in ("integer", "number"):
        lo_hi = _INT_FORMATS.get(schema.get("format", ""))
        if lo_hi and typ == "integer" and not lo_hi[0] <= value <= lo_hi[1]:
            errs.invalid.append(f"{path}: Invalid value: {value}: out of {schema['format']} range")
        if "minimum" in schema and (value < schema["minimum"] or
                                    (schema.get("exclusiveMinimum") is True and value == schema["minimum"])):
            errs.invalid.append(f"{path}: Invalid value: {value}: {path} in body should be greater than "
                                f"or equal to {schema['minimum']}")
        if "maximum" in schema and (value > schema["maximum"] or
                                    (schema.get("exclusiveMaximum") is True and value == schema["maximum"])):
            errs.invalid.append(f"{path}: Invalid value: {value}: {path} in body should be less than "
                                f"or equal to {schema['maximum']}")
    if typ == "array":
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errs.invalid.append(f"{path}: Too many: {len(value)}: must have at most {schema['maxItems']} items")
        if "minItems" in schema and len(value) < schema["minItems"]:
            errs.invalid.append(f"{path}: Invalid value: {path} in body should have at least "
                                f"{schema['minItems']} items")
        items = schema.get("items")
        if isinstance(items, dict):
            value = [validate_schema(items, v, f"{path}[{i}]", errs, prune=prune) for i, v in enumerate(value)]
        if schema.get("x-kubernetes-list-type") == "set" and len({json.dumps(v, sort_keys=True) for v in value}) \
                != len(value):
            errs.invalid.append(f"{path}: Duplicate value")
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen = [tuple(v.get(k) for k in keys) for v in value if isinstance(v, dict)]
            if len(set(seen)) != len(seen):
                errs.invalid.append(f"{path}: Duplicate value: map keys {keys}")
    if typ == "object" or (typ is None and isinstance(value, dict)):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
        for req in schema.get("required") or []:
            if req not in value:
                errs.invalid.append(f"{path}.{req}: Required value")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            errs.invalid.append(f"{path}: Too many: {len(value)}: must have at most "
                                f"{schema['maxProperties']} properties")
        out: Obj = {}
        for k, v in value.items():
            sub = f"{path}.{k}"
            if props is not None and k in props:
                out[k] = validate_schema(props[k], v, sub, errs, prune=prune)
            elif isinstance(extra, dict):
                out[k] = validate_schema(extra, v, sub, errs, prune=prune)
            elif extra is True or preserve or (props is None and extra is None and typ is None):
                out[k] = v
            elif props is None and extra is None and preserve is False and typ == "object" and \
                    not schema.get("properties") and schema.get("x-kubernetes-embedded-resource"):
                out[k] = v
            else:
                errs.unknown.append(sub)
                if not prune:
                    out[k] = v
        return out
    return value


# ---------------------------------------------------------------- the store

@dataclasses.dataclass
class _Event:
    rv: int
    res: Resource
    type: str          # ADDED MODIFIED DELETED
    obj: Obj           # after (for DELETED: the last state, with the deletion's rv)
    before: Obj | None


class FakeApiServer:
    """A Kubernetes API server in a thread; use as a context manager."""

    def __init__(self, *, crd_dir: Path | str | None = None, history: int = 100_000,
                 validate_builtins: bool = True) -> None:
        self._lock = threading.Condition()
        self._rv = 1000
        self._objects: dict[tuple[str, str, str, str], Obj] = {}   # (group, plural, ns, name)
        self._history: list[_Event] = []
        self._history_max = history
        self._trimmed = 0      # the newest rv no longer in the history
        self._logs: dict[tuple[str, str], str] = {}
        self._faults: list[_Fault] = []
        self._stopping = False
        self.resources: list[Resource] = list(BUILTINS)
        self.requests: list[tuple[str, str]] = []   # (method, path) of every request
        self.warnings: list[str] = []               # Warning headers sent
        self.crds: list[Obj] = []
        self._validate_builtins = validate_builtins
        self._conflict_rate = 0.0
        self._conflict_rng: Any = None
        self._watch_epoch = 0                       # end_watches() ends the watches of earlier epochs
        self.injected = 0                           # conflicts caused by inject_conflicts
        if crd_dir is not None:
            for path in sorted(Path(crd_dir).glob("*.yaml")):
                for doc in yaml.safe_load_all(path.read_text()):
                    if doc and doc.get("kind") == "CustomResourceDefinition":
                        self.add_crd(doc)
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------

    def add_crd(self, crd: Obj) -> None:
        spec = crd["spec"]
        for ver in spec["versions"]:
            if not ver.get("served", True):
                continue
            schema = (ver.get("schema") or {}).get("openAPIV3Schema")
            self.resources.append(Resource(
                spec["group"], ver["name"], spec["names"]["plural"], spec["names"]["kind"],
                spec["scope"] == "Namespaced", "status" in (ver.get("subresources") or {}),
                schema=schema, custom=True, unconditional_update=False))
        self.crds.append(crd)

    def start(self) -> FakeApiServer:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=lambda: server.serve_forever(poll_interval=0.05), name="fakeapi", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- resolution -------------------------------------------------------

    def resource(self, group: str, version: str, plural: str) -> Resource:
        for r in self.resources:
            if r.group == group and r.version == version and r.plural == plural:
                return r
        raise ApiError(404, "NotFound", f"the server could not find the requested resource ({plural}.{group})")

    def _key(self, res: Resource, ns: str, name: str) -> tuple[str, str, str, str]:
        return (res.group, res.plural, ns if res.namespaced else "", name)

    def _not_found(self, res: Resource, name: str) -> ApiError:
        return ApiError(404, "NotFound", f'{res.gr} "{name}" not found',
                        {"name": name, "group": res.group, "kind": res.plural})

    def _conflict(self, res: Resource, name: str, why: str = "") -> ApiError:
        return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.gr} "{name}": '
                        + (why or "the object has been modified; please apply your changes to the "
                                  "latest version and try again"),
                        {"name": name, "group": res.group, "kind": res.plural})

    def _invalid(self, res: Resource, name: str, causes: list[str]) -> ApiError:
        return ApiError(422, "Invalid", f'{res.kind}.{res.group} "{name}" is invalid: ' + ", ".join(causes),
                        {"name": name, "group": res.group, "kind": res.kind,
                         "causes": [{"message": c} for c in causes]})

    # -- the verbs (called with the lock held) ------------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _record(self, res: Resource, type_: str, obj: Obj, before: Obj | None) -> None:
        self._history.append(_Event(int(obj["metadata"]["resourceVersion"]), res, type_,
                                    copy.deepcopy(obj), copy.deepcopy(before)))
        if len(self._history) > self._history_max:
            drop = len(self._history) - self._history_max
            self._trimmed = self._history[drop - 1].rv
            del self._history[:drop]
        self._lock.notify_all()

    def _check_body(self, res: Resource, body: Any, ns: str, path_name: str | None,
                    field_validation: str, warnings: list[str]) -> Obj:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was not a JSON object")
        if body.get("apiVersion", res.api_version) != res.api_version or body.get("kind", res.kind) != res.kind:
            raise ApiError(400, "BadRequest", f"the API version in the data ({body.get('apiVersion')}) "
                           f"and kind ({body.get('kind')}) do not match {res.api_version}/{res.kind}")
        body = copy.deepcopy(body)
        body["apiVersion"], body["kind"] = res.api_version, res.kind
        meta = body.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if path_name is not None and meta.get("name", path_name) != path_name:
            raise ApiError(400, "BadRequest", "the name of the object "
                           f"({meta.get('name')}) does not match the name on the URL ({path_name})")
        if path_name is not None:
            meta["name"] = path_name
        if res.namespaced:
            if meta.get("namespace", ns) != ns:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match "
                               "the namespace sent on the request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        name = str(meta.get("name", ""))
        causes = self._check_meta(res, meta)
        if res.schema is not None:
            errs = SchemaErrors()
            schema = res.schema
            apply_defaults(schema, body)
            top = {k: v for k, v in body.items() if k not in ("apiVersion", "kind", "metadata")}
            props = {k: v for k, v in (schema.get("properties") or {}).items()
                     if k not in ("apiVersion", "kind", "metadata")}
            sub = dict(schema, properties=props)
            sub.pop("required", None)
            pruned = validate_schema(sub, top, "", errs, prune=True)
            for req in schema.get("required") or []:
                if req not in body:
                    errs.invalid.append(f"{req}: Required value")
            if errs.unknown:
                unknown = [u.lstrip(".") for u in errs.unknown]
                if field_validation == "Strict":
                    raise ApiError(400, "BadRequest", "strict decoding error: " + ", ".join(
                        f'unknown field "{u}"' for u in unknown))
                if field_validation != "Ignore":
                    warnings.extend(f'unknown field "{u}"' for u in unknown)
            causes += [c.lstrip(".") for c in errs.invalid]
            body = {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": meta, **pruned}
        elif self._validate_builtins:
            causes += _validate_builtin(res, body)
        if causes:
            raise self._invalid(res, name, causes)
        return body

    def _check_meta(self, res: Resource, meta: Obj) -> list[str]:
        causes = []
        name = meta.get("name", "")
        if not isinstance(name, str) or not name:
            if not meta.get("generateName"):
                causes.append("metadata.name: Required value: name or generateName is required")
        elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
            causes.append(f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain must "
                          "consist of lower case alphanumeric characters, '-' or '.'")
        elif res.plural == "jobs" and len(name) > 63:
            causes.append(f"metadata.name: Invalid value: {name!r}: must be no more than 63 characters")
        ns = meta.get("namespace")
        if res.namespaced and (not isinstance(ns, str) or len(ns) > 63 or not _DNS1123_LABEL.match(ns)):
            causes.append(f"metadata.namespace: Invalid value: {ns!r}: a lowercase RFC 1123 label must consist "
                          "of lower case alphanumeric characters or '-'")
        for k, v in (meta.get("labels") or {}).items():
            if not _valid_label_key(k):
                causes.append(f"metadata.labels: Invalid value: {k!r}: name part must consist of "
                              "alphanumeric characters, '-', '_' or '.'")
            if not isinstance(v, str) or len(v) > 63 or not _LABEL_VALUE.match(v):
                causes.append(f"metadata.labels: Invalid value: {v!r}: a valid label must be an empty "
                              "string or consist of alphanumeric characters, '-', '_' or '.', "
                              "and must start and end with an alphanumeric character")
        ann = meta.get("annotations") or {}
        size = 0
        for k, v in ann.items():
            if not _valid_label_key(str(k).lower()) or not isinstance(v, str):
                causes.append(f"metadata.annotations: Invalid value: {k!r}")
            size += len(k) + len(str(v))
        if size > _ANNOTATIONS_MAX:
            causes.append(f"metadata.annotations: Too long: must have at most {_ANNOTATIONS_MAX} bytes")
        for f in meta.get("finalizers") or []:
            if not isinstance(f, str) or not _valid_label_key(f):
                causes.append(f"metadata.finalizers: Invalid value: {f!r}")
        return causes

    def create(self, res: Resource, ns: str, body: Any, *, field_validation: str = "",
               warnings: list[str] | None = None) -> Obj:
        warnings = [] if warnings is None else warnings
        with self._lock:
            obj = self._check_body(res, body, ns, None, field_validation, warnings)
            meta = obj["metadata"]
            if not meta.get("name"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            name = meta["name"]
            key = self._key(res, ns, name)
            if key in self._objects:
                raise ApiError(409, "AlreadyExists", f'{res.gr} "{name}" already exists',
                               {"name": name, "group": res.group, "kind": res.plural})
            if res.status:
                obj.pop("status", None)
            for f in ("deletionTimestamp", "deletionGracePeriodSeconds"):
                meta.pop(f, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
            meta["resourceVersion"] = str(self._next_rv())
            self._objects[key] = obj
            self._record(res, "ADDED", obj, None)
            return copy.deepcopy(obj)

    def get(self, res: Resource, ns: str, name: str) -> Obj:
        with self._lock:
            obj = self._objects.get(self._key(res, ns, name))
            if obj is None:
                raise self._not_found(res, name)
            return copy.deepcopy(obj)

    def update(self, res: Resource, ns: str, name: str, body: Any, *, status: bool,
               field_validation: str = "", warnings: list[str] | None = None,
               require_rv: bool = True) -> Obj:
        warnings = [] if warnings is None else warnings
        with self._lock:
            if status and not res.status:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            key = self._key(res, ns, name)
            old = self._objects.get(key)
            if old is None:
                raise self._not_found(res, name)
            new = self._check_body(res, body, ns, name, field_validation, warnings)
            meta, old_meta = new["metadata"], old["metadata"]
            rv = meta.get("resourceVersion")
            if not rv:
                if require_rv and not res.unconditional_update:
                    raise self._invalid(res, name, ["metadata.resourceVersion: Invalid value: 0x0: "
                                                    "must be specified for an update"])
            elif rv != old_meta["resourceVersion"]:
                raise self._conflict(res, name)
            if meta.get("uid") and meta["uid"] != old_meta["uid"]:
                raise self._conflict(res, name, f"Precondition failed: UID in precondition: {meta['uid']}, "
                                     f"UID in object meta: {old_meta['uid']}")
            if status:  # only status moves
                merged = copy.deepcopy(old)
                if "status" in new:
                    merged["status"] = new["status"]
                else:
                    merged.pop("status", None)
                new = merged
            else:
                if res.status:
                    if "status" in old:
                        new["status"] = copy.deepcopy(old["status"])
                    else:
                        new.pop("status", None)
                for f in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                          "generation"):
                    if f in old_meta:
                        meta[f] = old_meta[f]
                    else:
                        meta.pop(f, None)
                if old_meta.get("deletionTimestamp"):
                    added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
                    if added:
                        raise self._invalid(res, name, [f"metadata.finalizers: Forbidden: no new finalizers "
                                                        f"can be added if the object is being deleted, found "
                                                        f"new finalizers {sorted(added)}"])
                spec_new = {k: v for k, v in new.items() if k not in ("metadata", "status")}
                spec_old = {k: v for k, v in old.items() if k not in ("metadata", "status")}
                if spec_new != spec_old:
                    meta["generation"] = old_meta.get("generation", 1) + 1
            new["metadata"]["resourceVersion"] = old_meta["resourceVersion"]
            if new == old:
                return copy.deepcopy(old)   # no-op: same resourceVersion, no event
            new["metadata"]["resourceVersion"] = str(self._next_rv())
            if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
                del self._objects[key]
                self._record(res, "DELETED", new, old)
                return copy.deepcopy(new)
            self._objects[key] = new
            self._record(res, "MODIFIED", new, old)
            return copy.deepcopy(new)

    def patch(self, res: Resource, ns: str, name: str, body: Any, content_type: str, *, status: bool,
              field_validation: str = "", warnings: list[str] | None = None) -> Obj:
        with self._lock:
            cur = self.get(res, ns, name)
            if content_type.startswith("application/merge-patch+json"):
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "merge patch must be a JSON object")
                new = merge_patch(cur, body)
            elif content_type.startswith("application/json-patch+json"):
                if not isinstance(body, list):
                    raise ApiError(400, "BadRequest", "JSON patch must be a list of operations")
                new = json_patch(cur, body)
            elif content_type.startswith("application/strategic-merge-patch+json") and not res.custom:
                new = merge_patch(cur, body)   # close enough for the fields the driver patches
            else:
                raise ApiError(415, "UnsupportedMediaType",
                               f"the body of the request was in an unknown format - accepted media types "
                               f"include: application/json-patch+json, application/merge-patch+json")
            if not isinstance(new, dict):
                raise ApiError(422, "Invalid", "patch result is not an object")
            new.setdefault("metadata", {})
            if new["metadata"].get("resourceVersion") is None:
                new["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
            return self.update(res, ns, name, new, status=status, field_validation=field_validation,
                               warnings=warnings, require_rv=False)

    def delete(self, res: Resource, ns: str, name: str, options: Obj | None) -> tuple[Obj, bool]:
        """Returns (object, deleted_now)."""
        with self._lock:
            key = self._key(res, ns, name)
            old = self._objects.get(key)
            if old is None:
                raise self._not_found(res, name)
            pre = (options or {}).get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
                raise self._conflict(res, name, f"Precondition failed: UID in precondition: {pre['uid']}, "
                                     f"UID in object meta: {old['metadata']['uid']}")
            if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"]["resourceVersion"]:
                raise self._conflict(res, name, "Precondition failed: ResourceVersion in precondition: "
                                     f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                                     f"{old['metadata']['resourceVersion']}")
            if old["metadata"].get("finalizers"):
                if old["metadata"].get("deletionTimestamp"):
                    return copy.deepcopy(old), False
                new = copy.deepcopy(old)
                new["metadata"]["deletionTimestamp"] = _now()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                new["metadata"]["resourceVersion"] = str(self._next_rv())
                self._objects[key] = new
                self._record(res, "MODIFIED", new, old)
                return copy.deepcopy(new), False
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._next_rv())
            del self._objects[key]
            self._record(res, "DELETED", gone, old)
            return gone, True

    def list(self, res: Resource, ns: str | None, *, label_selector: str = "", field_selector: str = "",
             limit: int = 0, cont: str = "") -> Obj:
        labels = parse_label_selector(label_selector)
        fields = _parse_field_selector(field_selector)
        with self._lock:
            if cont:
                try:
                    token = json.loads(base64.urlsafe_b64decode(cont.encode()))
                    at, start = int(token["rv"]), str(token["start"])
                except (ValueError, KeyError, TypeError) as e:
                    raise ApiError(400, "BadRequest", f"invalid continue token: {e}") from e
                objs = self._snapshot(res, at)
            else:
                at, start = self._rv, ""
                objs = {k: v for k, v in self._objects.items() if k[:2] == (res.group, res.plural)}
            rows = sorted(((k[2], k[3]), v) for k, v in objs.items()
                          if (ns is None or not res.namespaced or k[2] == ns))
            rows = [(k, v) for k, v in rows if "/".join(k) > start and _match(v, labels, fields)]
            meta: Obj = {"resourceVersion": str(at)}
            if limit and len(rows) > limit:
                last = "/".join(rows[limit - 1][0])
                meta["continue"] = base64.urlsafe_b64encode(
                    json.dumps({"rv": at, "start": last}).encode()).decode()
                meta["remainingItemCount"] = len(rows) - limit
                rows = rows[:limit]
            items = [copy.deepcopy(v) for _, v in rows]
            return {"apiVersion": res.api_version, "kind": res.kind + "List", "metadata": meta, "items": items}

    def _snapshot(self, res: Resource, at: int) -> dict[tuple[str, str, str, str], Obj]:
        if at < self._trimmed:
            raise ApiError(410, "Expired", "The provided continue parameter is too old to display a "
                           "consistent list result. You can start a new list without the continue "
                           "parameter.")
        state = {k: v for k, v in self._objects.items() if k[:2] == (res.group, res.plural)}
        for ev in reversed(self._history):
            if ev.rv <= at:
                break
            if (ev.res.group, ev.res.plural) != (res.group, res.plural):
                continue
            key = self._key(res, ev.obj["metadata"].get("namespace", ""), ev.obj["metadata"]["name"])
            if ev.before is None:
                state.pop(key, None)
            else:
                state[key] = ev.before
        return state

    def watch_events(self, res: Resource, ns: str | None, *, resource_version: str, label_selector: str,
                     field_selector: str, timeout: float) -> Iterator[Obj]:
        """Yields watch event dicts; ends at the timeout or when the server stops."""
        import time
        labels = parse_label_selector(label_selector)
        fields = _parse_field_selector(field_selector)
        deadline = time.monotonic() + timeout

        def visible(o: Obj | None) -> bool:
            if o is None:
                return False
            if ns is not None and res.namespaced and o["metadata"].get("namespace") != ns:
                return False
            return _match(o, labels, fields)

        with self._lock:
            epoch = self._watch_epoch
            pending: list[Obj] = []
            if resource_version in ("", "0"):
                cursor = self._rv
                for k, v in sorted(self._objects.items()):
                    if k[:2] == (res.group, res.plural) and visible(v):
                        pending.append({"type": "ADDED", "object": copy.deepcopy(v)})
            else:
                cursor = int(resource_version)
                if cursor < self._trimmed:
                    yield {"type": "ERROR", "object": ApiError(
                        410, "Expired", f"too old resource version: {cursor} ({self._trimmed})").status()}
                    return
        for ev in pending:
            yield ev
        while True:
            with self._lock:
                while True:
                    # the history is in rv order: find the first newer event by bisection (a
                    # scan of the whole history per wake-up made every write O(history))
                    new = self._history[bisect.bisect_right(self._history, cursor, key=lambda e: e.rv):]
                    if new or self._stopping or self._watch_epoch != epoch:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._lock.wait(left)
                if self._stopping or self._watch_epoch != epoch:
                    return
                cursor = new[-1].rv
                out = []
                for e in new:
                    if (e.res.group, e.res.plural) != (res.group, res.plural):
                        continue
                    was, now = visible(e.before), visible(e.obj)
                    if e.type == "DELETED":
                        if was:
                            out.append({"type": "DELETED", "object": copy.deepcopy(e.obj)})
                    elif was and now:
                        out.append({"type": "MODIFIED", "object": copy.deepcopy(e.obj)})
                    elif now:
                        out.append({"type": "ADDED", "object": copy.deepcopy(e.obj)})
                    elif was:
                        out.append({"type": "DELETED", "object": copy.deepcopy(e.obj)})
            yield from out
            if time.monotonic() >= deadline:
                return

    # -- test hooks (what controllers and kubelets would do) ---------------

    def find(self, group: str, plural: str, name: str, namespace: str = "") -> Obj | None:
        with self._lock:
            for r in self.resources:
                if r.group == group and r.plural == plural:
                    obj = self._objects.get(self._key(r, namespace, name))
                    return None if obj is None else copy.deepcopy(obj)
        return None

    def objects(self, group: str, plural: str, namespace: str | None = None) -> list[Obj]:
        with self._lock:
            return [copy.deepcopy(v) for k, v in sorted(self._objects.items())
                    if k[0] == group and k[1] == plural and (namespace is None or k[2] == namespace)]

    def _res(self, group: str, plural: str) -> Resource:
        for r in self.resources:
            if r.group == group and r.plural == plural:
                return r
        raise KeyError(f"{plural}.{group}")

    def set_status(self, group: str, plural: str, name: str, status: Obj, namespace: str = "") -> Obj:
        """Replace an object's status, as its controller would (bumps the rv, sends MODIFIED)."""
        res = self._res(group, plural)
        with self._lock:
            cur = self.get(res, namespace, name)
            cur["status"] = status
            return self.update(res, namespace, name, cur, status=res.status)

    def put(self, group: str, plural: str, body: Obj, namespace: str = "") -> Obj:
        """Create an object as some other client would; keeps a status given in the body."""
        res = self._res(group, plural)
        status = body.get("status")
        obj = self.create(res, namespace, body)
        if status is not None and res.status:
            obj["status"] = status
            obj = self.update(res, namespace, obj["metadata"]["name"], obj, status=True)
        return obj

    def inject_conflicts(self, rate: float, *, seed: int = 0) -> None:
        """From now on, race each PUT/DELETE of a custom resource with another writer at `rate`."""
        import random
        with self._lock:
            self._conflict_rate = rate
            self._conflict_rng = random.Random(seed)

    def _maybe_race(self, res: Resource, ns: str, name: str) -> None:
        """Another client's write lands first (called before a custom resource's PUT/DELETE)."""
        with self._lock:
            if not res.custom or not self._conflict_rate or self._conflict_rng.random() >= self._conflict_rate:
                return
            key = self._key(res, ns, name)
            old = self._objects.get(key)
            if old is None:
                return
            new = copy.deepcopy(old)
            ann = new["metadata"].setdefault("annotations", {})
            ann["fake.example.org/touched"] = str(int(ann.get("fake.example.org/touched", "0")) + 1)
            new["metadata"]["resourceVersion"] = str(self._next_rv())
            self._objects[key] = new
            self._record(res, "MODIFIED", new, old)
            self.injected += 1

    def set_pod_log(self, namespace: str, name: str, text: str) -> None:
        with self._lock:
            self._logs[(namespace, name)] = text

    def pod_log(self, namespace: str, name: str) -> str:
        with self._lock:
            res = self._res("", "pods")
            if self._key(res, namespace, name) not in self._objects:
                raise self._not_found(res, name)
            return self._logs.get((namespace, name), "")

    # -- injected faults and controller behaviour (issue 12) ---------------

    def inject_fault(self, method: str, path: str, *, code: int = 500, times: int = 1,
                     drop: bool = False, lost: bool = False, message: str = "") -> None:
        """The next `times` requests of `method` whose path matches the regular expression `path`
        fail: with status `code` (a kubelet's 500 on pods/log, a 503 or 429 of an overloaded server),
        or with `drop`, by closing the connection unanswered (connection refused/reset), or with
        `lost`, by carrying the request out and then closing the connection before the answer (a
        timeout after the server acted: a client cannot tell whether its write happened)."""
        with self._lock:
            self._faults.append(_Fault(method=method, path=re.compile(path), code=code, left=times, drop=drop,
                                       lost=lost,
                                       message=message or f"injected {code}: dial tcp 10.0.0.1:10250: "
                                                          "connect: connection refused"))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def faults_left(self) -> int:
        with self._lock:
            return sum(f.left for f in self._faults)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if f.left > 0 and f.method == method and f.path.search(path):
                    f.left -= 1
                    return f
        return None

    # -- RBAC (fakerbac.py) ----------------------------------------------------

    rbac: Any = None  # a fakerbac.RbacAuthorizer once enforce_rbac() is called

    def enforce_rbac(self, authorizer: Any) -> None:
        """From now on, authenticate and authorize every request with `authorizer`."""
        self.rbac = authorizer

    def _authorize(self, method: str, path: str, q: Mapping[str, str], authorization: str | None) -> Any:
        """None, or the fakerbac.Refusal to answer (a path the server does not serve is left to 404)."""
        if self.rbac is None:
            return None
        m = _PATH.match(path)
        if not m:
            return None
        return self.rbac.authorize(authorization, method, group="" if m.group("core") else m.group("group"),
                                   resource=m.group("plural"), subresource=m.group("sub"),
                                   namespace=m.group("ns"), name=m.group("name"), query=q)

    def end_watches(self) -> None:
        """End every open watch now (the stream closes cleanly), as an API server restart or a
        proxy's idle timeout does: a client must watch again, or list, to go on."""
        with self._lock:
            self._watch_epoch += 1
            self._lock.notify_all()

    def recreate_job(self, name: str, namespace: str) -> Obj:
        """What a retry of a Job under the same name looks like: the Job is deleted and made again
        from its own spec (a new uid, no status); the old Job's pods stay until garbage collection."""
        res = self._res("batch", "jobs")
        with self._lock:
            old = copy.deepcopy(self._objects[self._key(res, namespace, name)])
        self.delete(res, namespace, name, None)
        meta = {k: v for k, v in old["metadata"].items()
                if k in ("name", "namespace", "labels", "annotations")}
        return self.create(res, namespace, {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
                                            "spec": old["spec"]})


@dataclasses.dataclass
class _Fault:
    method: str
    path: re.Pattern[str]
    code: int
    left: int
    drop: bool
    message: str
    lost: bool = False


def _tail(text: str, q: Mapping[str, str]) -> str:
    """pods/log's tailLines and limitBytes, as the kubelet applies them (lines first)."""
    if q.get("tailLines"):
        n = int(q["tailLines"])
        lines = text.splitlines(keepends=True)
        text = "".join(lines[-n:]) if n > 0 else ""
    if q.get("limitBytes"):
        text = text.encode()[:int(q["limitBytes"])].decode(errors="ignore")
    return text


_BUILTIN_SCHEMA_VERSION = "1.30.0"


def _validate_builtin(res: Resource, body: Obj) -> list[str]:
    try:
        import kubernetes_validate  # type: ignore[import-untyped]
        import kubernetes_validate.utils as kvu  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - the dev extra installs it
        return []
    try:
        kubernetes_validate.validate(body, _BUILTIN_SCHEMA_VERSION, strict=True)
    except kvu.ValidationError as e:
        return [f"{'.'.join(str(p) for p in e.path)}: {e.message}"]
    except kvu.SchemaNotFoundError:
        return []
    return []


# ---------------------------------------------------------------- HTTP

_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?/?$")


def _make_handler(api: FakeApiServer) -> type[http.server.BaseHTTPRequestHandler]:

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # headers and body go out in two writes: without this, Nagle and
            # delayed ACKs add 40 ms to every request
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass

        def _send_json(self, code: int, obj: Any, warnings: list[str] | None = None) -> None:
            if getattr(self, "_lose_answer", False):  # inject_fault(lost=True): done, but never answered
                self._lose_answer = False
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            data = json.dumps(obj).encode()
            if warnings:
                with api._lock:
                    api.warnings.extend(warnings)
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for w in warnings or []:
                self.send_header("Warning", f'299 - "{w}"')
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            if not raw:
                return None
            try:
                return json.loads(raw)
            except ValueError as e:
                raise ApiError(400, "BadRequest", f"invalid JSON: {e}") from e

        def _dispatch(self, method: str) -> None:
            url = urllib.parse.urlsplit(self.path)
            q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
            with api._lock:
                api.requests.append((method, url.path))
            refusal = api._authorize(method, url.path, q, self.headers.get("Authorization"))
            if refusal is not None:  # authentication and authorization come before any handler
                self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
                self._send_json(refusal.code, refusal.body)
                return
            fault = api._take_fault(method, url.path)
            if fault is not None and fault.lost:
                self._lose_answer = True
                fault = None
            if fault is not None and fault.drop:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault is not None:
                self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
                self._send_json(fault.code, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                             "status": "Failure", "message": fault.message,
                                             "reason": "InternalError" if fault.code >= 500 else "TooManyRequests",
                                             "code": fault.code})
                return
            try:
                body = self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
                m = _PATH.match(url.path)
                if not m:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                group = "" if m.group("core") else m.group("group")
                version = m.group("core") or m.group("version")
                plural, name, sub, ns = m.group("plural"), m.group("name"), m.group("sub"), m.group("ns")
                if ns is None and plural == "namespaces":
                    raise ApiError(404, "NotFound", "namespaces are not served by this fake")
                res = api.resource(group, version, plural)
                if res.namespaced and ns is None and (name is not None or method != "GET"):
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                if not res.namespaced and ns is not None:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                nsv = ns or ""
                if sub not in (None, "status", "log") or (sub == "log" and plural != "pods"):
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                if sub == "status" and not res.status:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                fv = q.get("fieldValidation", "")
                warnings: list[str] = []
                if q.get("dryRun"):
                    raise ApiError(400, "BadRequest", "dryRun is not supported by this fake")
                if method == "GET" and name is None:
                    if q.get("watch") in ("true", "1"):
                        self._watch(res, ns, q)
                        return
                    out = api.list(res, ns, label_selector=q.get("labelSelector", ""),
                                   field_selector=q.get("fieldSelector", ""),
                                   limit=int(q.get("limit") or 0), cont=q.get("continue", ""))
                    self._send_json(200, out)
                elif method == "GET" and sub == "log":
                    text = _tail(api.pod_log(nsv, name), q).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                elif method == "GET":
                    self._send_json(200, api.get(res, nsv, name))
                elif method == "POST" and name is None:
                    self._send_json(201, api.create(res, nsv, body, field_validation=fv, warnings=warnings),
                                    warnings)
                elif method == "PUT" and name is not None:
                    api._maybe_race(res, nsv, name)
                    self._send_json(200, api.update(res, nsv, name, body, status=sub == "status",
                                                    field_validation=fv, warnings=warnings), warnings)
                elif method == "PATCH" and name is not None:
                    self._send_json(200, api.patch(res, nsv, name, body, self.headers.get("Content-Type", ""),
                                                   status=sub == "status", field_validation=fv,
                                                   warnings=warnings), warnings)
                elif method == "DELETE" and name is not None and sub is None:
                    api._maybe_race(res, nsv, name)
                    obj, gone = api.delete(res, nsv, name, body)
                    if gone and not res.return_deleted:
                        self._send_json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                              "status": "Success", "details": {
                                                  "name": name, "group": res.group, "kind": res.plural,
                                                  "uid": obj["metadata"]["uid"]}})
                    else:
                        self._send_json(200, obj)
                else:
                    raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
            except ApiError as e:
                self._send_json(e.code, e.status())

        def _watch(self, res: Resource, ns: str | None, q: dict[str, str]) -> None:
            timeout = float(q.get("timeoutSeconds") or 1800)
            events = api.watch_events(res, ns, resource_version=q.get("resourceVersion", ""),
                                      label_selector=q.get("labelSelector", ""),
                                      field_selector=q.get("fieldSelector", ""), timeout=timeout)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for ev in events:
                    data = json.dumps(ev).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def do_PATCH(self) -> None:
            self._dispatch("PATCH")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

    return Handler
