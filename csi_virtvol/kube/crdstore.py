"""The StateStore on Kubernetes custom resources (group virtvol.csi.example.org).

One kind per table, one object per record, cluster-scoped:

=========  ==============  ==========================================
table      kind            spec / status
=========  ==============  ==========================================
arrays     StorageArray    kind, params*, labels, abilityOverrides*, topology /
                           identity, probedAbilities, abilities, capacity
luns       PhysicalVolume  array, id, size, address, origin / state, volume
volumes    VirtualVolume   name, size, kind, extents, ... / state, role, ...
pairs      VolumePair      source, targets / state, progress, methods, targets
nodes      VirtvolNode     id, topology, maxVolumes, registeredAt / -
groups     VirtvolGroup-   name, sources, members, parameters, createdAt /
           Snapshot        state, cutAt
=========  ==============  ==========================================

(* kept as the administrator wrote them: an ArrayInfo record is the driver's
view of a StorageArray the administrator may have created first.)

How the StateStore contract maps onto the API:

* The record key becomes ``metadata.name`` when it is a DNS-1123 subdomain,
  else a sanitised prefix plus a hash of the key; the key itself is kept in
  the annotation ``virtvol.csi.example.org/key``.
* The Revision is ``metadata.resourceVersion``; a stale one is 409 from the
  server and `errors.Conflict` here.
* Spec and status are projections of the record for kubectl and for the
  printer columns.  Status goes through the status subresource, so a write is
  two requests (the object, then its status); the record as a whole is also
  kept in the annotation ``virtvol.csi.example.org/record``, written by the
  first request, so that a reader never sees half of a write.  The Revision a
  write returns is the one after its last request.
* Secondary indexes are labels ``idx.virtvol.csi.example.org/<index>``
  (the value, or ``h-`` and a hash when it is not a valid label value); hits
  are re-checked against the decoded record.
* Volumes whose role is source or copy (in a live pair) carry the finalizer
  ``virtvol.csi.example.org/pair``: deleting them outside the driver only
  marks them; `delete` here removes the finalizer first.
* Every write uses ``fieldValidation=Strict``: a body the CRD schema does not
  describe fails instead of being pruned.
* Reads are served from a watch-fed cache (`_Informer`, one LIST and then one
  long-lived WATCH per kind and process, started by the first `list`, `find`
  or `watch` of that table): `list`/`find` are in-memory look-ups over sorted
  keys and index maps, `watch` subscribes to the cache's event stream instead
  of opening a LIST and a WATCH per call, and `get` of a cached table needs no
  request.  The cache is fed this process's own writes at once (read your
  writes) and every object a write path GETs, so a Conflict caused by a stale
  cache heals on the caller's next read.  An idle process makes no requests.
* A write that meets 409 because someone else changed only metadata or status
  of the object (not the record) is applied again over the fresh object: the
  record the caller's revision named is still the current one.
"""
from __future__ import annotations

import bisect
import builtins
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import kubernetes.client as k8s
import kubernetes.watch as _k8s_watch
import urllib3.exceptions

from csi_virtvol import config, errors
from csi_virtvol.model import codec
from csi_virtvol.model.array import ArraySpec
from csi_virtvol.model.capability import AccessMode
from csi_virtvol.model.ids import ArrayId, NodeId, Revision
from csi_virtvol.kube.retry import DELAYS, retrying
from csi_virtvol.store.base import Change, Put, Remove, Table, Versioned, Write

T = TypeVar("T")
Obj = dict[str, Any]
k8s_watch: Any = _k8s_watch  # the client's watch and config modules are untyped

logger = logging.getLogger(__name__)

GROUP = "virtvol.csi.example.org"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KEY_ANNOTATION = f"{GROUP}/key"
RECORD_ANNOTATION = f"{GROUP}/record"
INDEX_LABEL_PREFIX = f"idx.{GROUP}/"
MANAGED_BY = ("app.kubernetes.io/managed-by", "csi-virtvol")
PAIR_FINALIZER = f"{GROUP}/pair"
# on a StorageArray the driver made from its --config: a record of that entry, not configuration
RECORDED_ANNOTATION = f"{GROUP}/recorded-from"

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_PAGE = 500
_WATCH_SECONDS = 300   # server-side timeout of the cache's watch (then it resumes from its rv)
_WRITE_RETRIES = 8     # re-applications of a write whose 409 came from a foreign metadata change


# ---------------------------------------------------------------- naming

def object_name(key: str) -> str:
    """A DNS-1123 subdomain for a record key: the key itself when it is one."""
    if key and len(key) <= 253 and _DNS1123_SUBDOMAIN.match(key):
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    base = re.sub(r"[^a-z0-9.-]+", "-", key.lower())
    base = re.sub(r"[-.]{2,}", "-", base).strip("-.")[:200].strip("-.")
    return f"{base}-{digest}" if base else f"k-{digest}"


def label_value(value: str) -> str:
    """A valid label value standing for `value` (hashed when it is not one)."""
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    return "h-" + hashlib.sha256(value.encode()).hexdigest()[:40]


# ---------------------------------------------------------------- projections

def _abilities(names: list[str]) -> list[str]:
    return [n.replace("_", "-") for n in names]


def _array_body(rec: Obj, old_spec: Mapping[str, Any]) -> tuple[Obj, Obj]:
    # an administrator's params stay as they wrote them; an array from --config shows its own
    # (secrets were left out of the record by ArrayPool)
    spec: Obj = {"kind": rec["kind"], "params": dict(old_spec.get("params") or rec.get("params") or {}),
                 "labels": rec["labels"], "abilityOverrides": dict(old_spec.get("abilityOverrides") or {}),
                 "topology": rec["topology"]}
    status: Obj = {"identity": rec["identity"], "probedAbilities": _abilities(rec["probed"]),
                   "abilities": _abilities(rec["abilities"]), "capacityTotal": rec["capacity_total"],
                   "capacityFree": rec["capacity_free"],
                   "luns": [{"id": x["id"], "size": x["size"], "state": x["state"], "origin": x["origin"],
                             **({"volume": x["volume"]} if x["volume"] else {})} for x in rec.get("luns", [])]}
    return spec, status


def _lun_body(rec: Obj, old_spec: Mapping[str, Any]) -> tuple[Obj, Obj]:
    return ({"array": rec["array"], "id": rec["id"], "size": rec["size"], "address": rec["address"],
             "origin": rec["origin"]},
            {"state": rec["state"], "volume": rec["volume"]})


def _attachment(a: Obj) -> Obj:
    """A ControllerPublish as kubectl shows it: the access mode by name."""
    out: Obj = {"node": a["node"], "readonly": a["readonly"]}
    mode = a.get("access_mode", 0)
    if mode:
        out["accessMode"] = AccessMode(mode).name
    if a.get("access_type"):
        out["accessType"] = a["access_type"]
    return out


def _volume_body(rec: Obj, old_spec: Mapping[str, Any]) -> tuple[Obj, Obj]:
    spec: Obj = {"name": rec["name"], "size": rec["size"], "kind": rec["kind"],
                 "extents": [{"array": e["array"], "lun": e["lun"], "offset": e["offset"], "length": e["length"]}
                             for e in rec["extents"]],
                 "address": rec["address"], "parameters": rec["parameters"],
                 "mutableParameters": rec["mutable_parameters"], "contentSource": rec["content_source"],
                 "sourceVolume": rec["source_volume"], "topology": rec["topology"]}
    status: Obj = {"state": rec["state"], "role": rec["role"],
                   "attachments": [_attachment(a) for a in rec["attachments"]],
                   "message": rec["message"], "extents": extents_text(rec["extents"])}
    return spec, status


def size_text(n: int) -> str:
    """Bytes in the largest binary unit that divides them exactly (64Mi, 1536Ki, 7)."""
    for unit, shift in (("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def extents_text(extents: list[Obj]) -> str:
    """The VirtualVolume Extents column: every extent as ARRAY:SIZE, in order."""
    return ",".join(f"{e['array']}:{size_text(int(e['length']))}" for e in extents)


_PAIR_RANK = {"failed": 0, "copying": 1, "resyncing": 2, "paired": 3, "split": 4}


def _pair_body(rec: Obj, old_spec: Mapping[str, Any]) -> tuple[Obj, Obj]:
    targets = []
    methods: list[str] = []
    done = total = 0
    for t in rec["targets"]:
        t_total = sum(e["bytes_total"] for e in t["extents"])
        t_done = sum(e["bytes_done"] for e in t["extents"])
        total, done = total + t_total, done + t_done
        for e in t["extents"]:
            if e["method"] not in methods:
                methods.append(e["method"])
        targets.append({
            "volume": t["volume"], "state": t["state"],
            "extents": [{"index": e["index"], "method": e["method"], "state": e["state"],
                         "bytesTotal": e["bytes_total"], "bytesDone": e["bytes_done"],
                          "bytesWritten": e["bytes_written"], "message": e["message"],
                          "sourceLun": e.get("source_lun", ""),
                          "verifyMethod": e.get("verify_method", ""), "verifyResult": e.get("verify_result", "")}
                        for e in t["extents"]],
            "bytesTotal": t_total, "bytesDone": t_done, "startedAt": t["started_at"],
            "endedAt": t["ended_at"], "reason": t["reason"]})
    status: Obj = {"progress": progress(done, total), "methods": ",".join(methods), "targets": targets,
                   "fence": rec["fence"], "fenceNode": rec["fence_node"], "fenceMessage": rec["fence_message"],
                   "cutAt": rec["cut_at"], "cutId": rec.get("cut_id", ""), "cutHold": rec.get("cut_hold", False),
                   "cutView": rec.get("cut_view", ""), "cutTime": rec.get("cut_time", 0.0),
                   "sinceCut": rec.get("since_cut", ""), "cutChanged": rec.get("cut_changed", "")}
    if rec["targets"]:
        status["state"] = min((t["state"] for t in rec["targets"]), key=lambda s: _PAIR_RANK.get(s, 0))
    return {"source": rec["source"], "targets": [t["volume"] for t in rec["targets"]]}, status


def progress(done: int, total: int) -> str:
    """Bytes done over bytes total as a percentage, floored to 0.1 ("42.5%")."""
    if total <= 0:
        return "100%"
    pct = math.floor(min(done, total) * 1000 / total) / 10
    return f"{pct:g}%"


def _node_body(rec: Obj, old_spec: Mapping[str, Any]) -> tuple[Obj, Obj]:
    return ({"id": rec["id"], "topology": rec["topology"], "maxVolumes": rec["max_volumes"],
             "registeredAt": rec["registered_at"], "initiator": rec.get("initiator", "")}, {})


def _group_body(rec: Obj, old_spec: Mapping[str, Any]) -> tuple[Obj, Obj]:
    return ({"name": rec["name"], "sources": rec["sources"], "members": rec["members"],
             "parameters": rec["parameters"], "createdAt": rec["created_at"]},
            {"state": rec["state"], "cutAt": rec["cut_at"]})


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Kind:
    kind: str
    plural: str
    body: Callable[[Obj, Mapping[str, Any]], tuple[Obj, Obj]]  # record dict, old spec -> spec, status
    finalizer: Callable[[Obj], bool] = lambda rec: False
    adopt: bool = False   # an object without our record may be taken over by create()


KINDS: dict[str, Kind] = {
    "arrays": Kind(kind="StorageArray", plural="storagearrays", body=_array_body, adopt=True),
    "luns": Kind(kind="PhysicalVolume", plural="physicalvolumes", body=_lun_body),
    "volumes": Kind(kind="VirtualVolume", plural="virtualvolumes", body=_volume_body,
                    finalizer=lambda rec: rec.get("role", "none") != "none"),
    "pairs": Kind(kind="VolumePair", plural="volumepairs", body=_pair_body),
    "nodes": Kind(kind="VirtvolNode", plural="virtvolnodes", body=_node_body),
    "groups": Kind(kind="VirtvolGroupSnapshot", plural="virtvolgroupsnapshots", body=_group_body),
}


# ---------------------------------------------------------------- errors

def wrap_api_error(e: Exception, what: str) -> errors.VirtvolError:
    if isinstance(e, k8s.ApiException):
        status = int(e.status or 0)
        reason = _reason(e)
        msg = f"{what}: {status} {reason}: {_message(e)}"
        if status == 404:
            return errors.NotFound(msg)
        if status in (409, 410):
            return errors.Conflict(msg)
        if status in (400, 422):
            return errors.InvalidRequest(msg)
        if status in (401, 403):
            return errors.BackendError(msg)
        if status == 429 or status >= 500 or status == 0:
            return errors.BackendUnavailable(msg)
        return errors.BackendError(msg)
    if isinstance(e, (urllib3.exceptions.HTTPError, OSError)):
        return errors.BackendUnavailable(f"{what}: API server unreachable: {e}")
    return errors.BackendError(f"{what}: {e}")


def _status_body(e: k8s.ApiException) -> Obj:
    try:
        body = json.loads(e.body or "{}")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _reason(e: k8s.ApiException) -> str:
    return str(_status_body(e).get("reason") or e.reason or "")


def _message(e: k8s.ApiException) -> str:
    return str(_status_body(e).get("message") or e.body or "")


# ---------------------------------------------------------------- the watch-fed cache

def _rv_newer(a: str, b: str) -> bool:
    """Is resourceVersion `a` newer than `b`?  (Opaque in general; the API server's are integers.)"""
    if a.isdigit() and b.isdigit():
        return int(a) > int(b)
    return a != b


@dataclasses.dataclass(slots=True)
class _Entry:
    name: str
    rv: str
    value: Any                             # Versioned[T]
    digest: int                            # hash of the record JSON: dedupes watch events
    idx: tuple[tuple[str, str], ...]       # (index name, value) of the record


_GAP = object()  # told to subscribers when the cache had to list again: they may have missed events


class _Informer:
    """One LIST, then one long-lived WATCH of one kind, feeding an in-memory copy of its
    records (decoded once per change), their sorted keys and index maps, and the event
    queues of this process's `watch` calls."""

    def __init__(self, store: CrdStore, table: Table[Any], kind: Kind) -> None:
        self._store = store
        self._table = table
        self._kind = kind
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._keys: list[str] = []
        self._index: dict[tuple[str, str], set[str]] = {}
        self._tomb: set[str] = set()       # deleted by us: ignore events for it until its DELETED
        self._subs: list[queue.SimpleQueue[Any]] = []
        self._synced = threading.Event()
        self._error: errors.VirtvolError | None = None
        self._stop = threading.Event()
        self._resp: Any = None
        self.lists = 0                     # LISTs made (relists after 410 included)
        self._thread = threading.Thread(target=self._run, name=f"crd-cache-{kind.plural}", daemon=True)
        self._thread.start()

    # -- reads ---------------------------------------------------------------------

    def wait_synced(self, timeout: float) -> None:
        if not self._synced.wait(timeout):
            raise errors.BackendUnavailable(
                f"cache of {self._kind.plural} is not filled yet: {self._error or 'timed out'}")

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def get(self, key: str) -> Any:
        with self._lock:
            e = self._entries.get(key)
            return None if e is None else e.value

    def find(self, index: str, value: str) -> builtins.list[Any]:
        with self._lock:
            keys = sorted(self._index.get((index, value), ()))
            return [self._entries[k].value for k in keys]

    def list(self, after: str, limit: int) -> builtins.list[Any]:
        with self._lock:
            i = bisect.bisect_right(self._keys, after)
            keys = self._keys[i:i + limit] if limit else self._keys[i:]
            return [self._entries[k].value for k in keys]

    def subscribe(self) -> tuple[queue.SimpleQueue[Any], dict[str, int]]:
        """A queue of the events from now on, and the record digests as of now."""
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self._lock:
            self._subs.append(q)
            return q, {k: e.digest for k, e in self._entries.items()}

    def unsubscribe(self, q: queue.SimpleQueue[Any]) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._subs.remove(q)

    # -- feeding -------------------------------------------------------------------

    def feed(self, obj: Obj, *, deleted: bool = False, own: bool = False) -> None:
        """`obj` as last seen: a watch event, or (own) a write's answer or a GET."""
        meta = obj.get("metadata") or {}
        key = (meta.get("annotations") or {}).get(KEY_ANNOTATION)
        if key is None:
            return
        rv = str(meta.get("resourceVersion") or "")
        rec = None if deleted else CrdStore._record_of(obj)
        value = None if rec is None else CrdStore._versioned(self._table, obj, rec[1])
        with self._lock:
            if key in self._tomb:
                if deleted and not own:
                    self._tomb.discard(key)
                if not own:
                    return
                self._tomb.discard(key)
            cur = self._entries.get(key)
            if cur is not None and not _rv_newer(rv, cur.rv):
                return
            if rec is None or value is None:
                self._drop(key)
                return
            self._put(key, _Entry(name=str(meta.get("name", "")), rv=rv, value=value, digest=hash(rec[1]),
                                  idx=tuple((n, f(value.value)) for n, f in self._table.indexes.items())))

    def forget(self, key: str) -> None:
        """This process deleted `key`: gone now, whatever older events still arrive."""
        with self._lock:
            self._drop(key)
            self._tomb.add(key)

    def _put(self, key: str, entry: _Entry) -> None:
        old = self._entries.get(key)
        if old is None:
            bisect.insort(self._keys, key)
        else:
            self._unindex(key, old)
        self._entries[key] = entry
        for iv in entry.idx:
            self._index.setdefault(iv, set()).add(key)

    def _drop(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is None:
            return
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            del self._keys[i]
        self._unindex(key, old)

    def _unindex(self, key: str, entry: _Entry) -> None:
        for iv in entry.idx:
            keys = self._index.get(iv)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._index[iv]

    # -- the LIST and WATCH loop ---------------------------------------------------------

    def _run(self) -> None:
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    rv = self._relist()
                rv = self._watch(rv)
            except errors.VirtvolError as e:
                if self._stop.is_set():
                    return
                self._error = e
                logger.warning("cache of %s: %s; retrying", self._kind.plural, e)
                self._stop.wait(1.0)
            except Exception as e:  # noqa: BLE001 - a closed stream on close(), or a bug: keep serving
                if self._stop.is_set():
                    return
                self._error = errors.BackendError(f"cache of {self._kind.plural}: {e!r}")
                logger.exception("cache of %s", self._kind.plural)
                self._stop.wait(1.0)
                rv = ""

    def _relist(self) -> str:
        cont, at = "", ""
        seen = set()
        while True:  # each page goes into the cache as it comes: never 10,000 raw objects at once
            kw: dict[str, Any] = {"limit": _PAGE}
            if cont:
                kw["_continue"] = cont
            page = self._store._call(f"list {self._kind.plural}", self._store._api.list_cluster_custom_object,
                                     self._kind.plural, **kw)
            for obj in page.get("items") or []:
                self.feed(obj)
                key = ((obj.get("metadata") or {}).get("annotations") or {}).get(KEY_ANNOTATION)
                if key is not None:
                    seen.add(key)
            meta = page.get("metadata") or {}
            at = at or str(meta.get("resourceVersion") or "")
            cont = meta.get("continue") or ""
            del page
            if not cont:
                break
        self.lists += 1
        with self._lock:
            for key in [k for k, e in self._entries.items() if k not in seen and not _rv_newer(e.rv, at)]:
                self._drop(key)
            self._tomb.clear()
            subs = builtins.list(self._subs) if self._synced.is_set() else []
        for q in subs:
            q.put(_GAP)
        self._error = None
        self._synced.set()
        return at

    def _watch(self, rv: str) -> str:
        """Follow the kind from `rv`; the last rv seen, or "" when the server has no history back there."""
        resp: Any
        try:
            resp = self._store._api.list_cluster_custom_object(
                GROUP, VERSION, self._kind.plural, watch=True, resource_version=rv,
                timeout_seconds=_WATCH_SECONDS, allow_watch_bookmarks=True, _preload_content=False,
                _request_timeout=(self._store._timeout, _WATCH_SECONDS + 30))
        except k8s.ApiException as e:
            if e.status == 410:
                return ""
            raise wrap_api_error(e, f"watch {self._kind.plural}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"watch {self._kind.plural}") from e
        self._resp = resp
        try:
            if self._stop.is_set():
                return rv
            for line in _iter_lines(resp):
                if self._stop.is_set():
                    return rv
                if not line:
                    continue
                event = json.loads(line)
                type_, obj = str(event.get("type")), event.get("object") or {}
                if type_ == "ERROR":
                    if obj.get("code") == 410:
                        return ""
                    raise errors.BackendUnavailable(f"watch {self._kind.plural}: {obj.get('message')}")
                rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                if type_ == "BOOKMARK":
                    continue
                self.feed(obj, deleted=type_ == "DELETED")
                with self._lock:
                    subs = builtins.list(self._subs)
                for q in subs:
                    q.put((type_, obj))
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError):
            pass  # the server (or our read timeout) ended the watch: resume from rv
        finally:
            self._resp = None
            with contextlib.suppress(Exception):
                resp.release_conn()
        return rv

    def close(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + 5
        while self._thread.is_alive() and time.monotonic() < deadline:
            resp = self._resp
            if resp is not None:  # wake the thread blocked reading the watch
                sock = getattr(getattr(resp, "connection", None), "sock", None)
                with contextlib.suppress(OSError):
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)
            self._thread.join(timeout=0.05)


def _iter_lines(resp: Any) -> Iterator[str]:
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buf += chunk if isinstance(chunk, bytes) else str(chunk).encode()
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode("utf-8", errors="replace")


# ---------------------------------------------------------------- the store

class CrdStore:
    """A StateStore on the custom resources of `api_client`'s cluster."""

    def __init__(self, api_client: k8s.ApiClient, *, request_timeout: float = 30.0, cache: bool = True,
                 retry_delays: Sequence[float] = DELAYS) -> None:
        self._client: Any = api_client
        self._api = k8s.CustomObjectsApi(api_client)
        self._timeout = request_timeout
        self._delays = retry_delays  # 5xx, 429 and connection errors are retried (kube/retry.py)
        self._use_cache = cache
        self._informers: dict[str, _Informer] = {}
        self._inf_lock = threading.Lock()

    def _cache(self, table: Table[Any], *, start: bool) -> _Informer | None:
        """The table's watch-fed cache, started (and filled) now when `start`; None without one."""
        if not self._use_cache:
            return None
        inf = self._informers.get(table.name)
        if inf is None:
            if not start:
                return None
            with self._inf_lock:
                inf = self._informers.get(table.name)
                if inf is None:
                    inf = self._informers[table.name] = _Informer(self, table, self._kind(table))
        if not inf.synced:
            if not start:
                return None
            inf.wait_synced(self._timeout)
        return inf

    def _seen(self, table: Table[Any], obj: Obj | None, *, deleted: bool = False) -> None:
        """An object this process just read or wrote: into the cache, if the table has one."""
        inf = self._informers.get(table.name)
        if inf is not None and obj is not None:
            inf.feed(obj, deleted=deleted, own=True)

    def cache_lists(self) -> int:
        """LISTs the caches have made so far (for tests and benchmarks)."""
        return sum(i.lists for i in self._informers.values())

    # -- helpers -------------------------------------------------------------

    @staticmethod
    def _kind(table: Table[Any]) -> Kind:
        try:
            return KINDS[table.name]
        except KeyError:
            raise errors.InvalidRequest(f"the CRD store has no kind for table {table.name}") from None

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, failures: list[BaseException] | None = None,
              **kw: Any) -> Any:
        """One request, retried while the API server cannot answer (kube/retry.py); the transient
        errors met go into `failures`."""
        try:
            return retrying(lambda: fn(GROUP, VERSION, *args, _request_timeout=self._timeout, **kw),
                            what=what, delays=self._delays, failures=failures)
        except (k8s.ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, what) from e

    def _read(self, kind: Kind, name: str) -> Obj | None:
        try:
            return cast(Obj, retrying(lambda: self._api.get_cluster_custom_object(
                GROUP, VERSION, kind.plural, name, _request_timeout=self._timeout),
                what=f"get {kind.plural}/{name}", delays=self._delays))
        except k8s.ApiException as e:
            if e.status == 404:
                return None
            raise wrap_api_error(e, f"get {kind.plural}/{name}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"get {kind.plural}/{name}") from e

    def _list_all(self, kind: Kind, selector: str = "") -> list[Obj]:
        items: list[Obj] = []
        cont = ""
        while True:
            kw: dict[str, Any] = {"limit": _PAGE}
            if selector:
                kw["label_selector"] = selector
            if cont:
                kw["_continue"] = cont
            page = self._call(f"list {kind.plural}", self._api.list_cluster_custom_object, kind.plural, **kw)
            items += page.get("items") or []
            cont = (page.get("metadata") or {}).get("continue") or ""
            if not cont:
                return items

    @staticmethod
    def _record_of(obj: Obj) -> tuple[str, str] | None:
        """(key, record JSON) of an object this store wrote, None otherwise or once deleted."""
        meta = obj.get("metadata") or {}
        ann = meta.get("annotations") or {}
        if RECORD_ANNOTATION not in ann or KEY_ANNOTATION not in ann:
            return None
        if meta.get("deletionTimestamp") and PAIR_FINALIZER not in (meta.get("finalizers") or []):
            return None  # deleted by us (only foreign finalizers keep it): gone for the store
        return str(ann[KEY_ANNOTATION]), str(ann[RECORD_ANNOTATION])

    @staticmethod
    def _versioned(table: Table[T], obj: Obj, record: str) -> Versioned[T]:
        value = codec.from_dict(table.type, json.loads(record))
        return Versioned(value=value, revision=Revision(str(obj["metadata"]["resourceVersion"])))

    def _build(self, table: Table[T], kind: Kind, record: T, old: Obj | None) -> tuple[Obj, Obj]:
        """(object body without status, status) for writing `record` over `old`."""
        key = table.key(record)
        rec = codec.to_dict(record)
        old_meta = (old or {}).get("metadata") or {}
        spec, status = kind.body(rec, (old or {}).get("spec") or {})
        labels = {k: v for k, v in (old_meta.get("labels") or {}).items() if not k.startswith(INDEX_LABEL_PREFIX)}
        labels[MANAGED_BY[0]] = MANAGED_BY[1]
        for index, func in table.indexes.items():
            labels[INDEX_LABEL_PREFIX + index] = label_value(func(record))
        annotations = dict(old_meta.get("annotations") or {})
        annotations[KEY_ANNOTATION] = key
        annotations[RECORD_ANNOTATION] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
        if kind.adopt and old is None:  # nobody described this array as an object: --config did
            annotations[RECORDED_ANNOTATION] = "config"
        finalizers = [f for f in (old_meta.get("finalizers") or []) if f != PAIR_FINALIZER]
        if kind.finalizer(rec) and not old_meta.get("deletionTimestamp"):
            finalizers.append(PAIR_FINALIZER)
        elif kind.finalizer(rec) and PAIR_FINALIZER in (old_meta.get("finalizers") or []):
            finalizers.append(PAIR_FINALIZER)
        meta: Obj = {"name": object_name(key), "labels": labels, "annotations": annotations}
        if finalizers:
            meta["finalizers"] = finalizers
        if old is not None:
            meta["resourceVersion"] = old_meta["resourceVersion"]
        old_status = dict((old or {}).get("status") or {})
        # keep status fields others maintain (conditions, the LUN inventory)
        merged_status = {k: v for k, v in old_status.items() if k not in status and k != "observedGeneration"}
        merged_status.update(status)
        body = {"apiVersion": API_VERSION, "kind": kind.kind, "metadata": meta, "spec": spec}
        return body, merged_status

    def _write(self, table: Table[Any], kind: Kind, record: Any, old: Obj | None, *, create: bool) -> Revision:
        """Write `record` over `old` (the object as read; None: a new object), then its status.

        A 409 whose cause left the record alone (someone changed labels, annotations or
        status of the object) is not the caller's conflict: the write is built again over
        the fresh object and sent again.  A 409 because the record changed is Conflict (also
        when the change was this very write, sent again after its answer was lost: the caller
        reads again and finds its change made).  A create that met a transient error and then
        finds exactly its record there made it."""
        body, status = self._build(table, kind, record, old)
        name = body["metadata"]["name"]
        ours = self._record_of({"metadata": body["metadata"]})
        failures: list[BaseException] = []
        for attempt in range(_WRITE_RETRIES):
            try:
                if create:
                    obj = self._call(f"create {kind.plural}/{name}", self._api.create_cluster_custom_object,
                                     kind.plural, body, field_validation="Strict", failures=failures)
                else:
                    obj = self._call(f"update {kind.plural}/{name}", self._api.replace_cluster_custom_object,
                                     kind.plural, name, body, field_validation="Strict")
                break
            except errors.Conflict:
                if create:
                    # sent again after a failure that may have been a lost answer: the object that is
                    # there now, holding exactly our record, is the one our first attempt made
                    fresh = self._current(table, kind, table.key(record)) if failures else None
                    if fresh is None or self._record_of(fresh) != ours:
                        raise
                    obj = fresh
                    break
                if attempt == _WRITE_RETRIES - 1:
                    raise
                fresh = self._current(table, kind, table.key(record))
                if fresh is None or old is None or self._record_of(fresh) != self._record_of(old):
                    raise
                old = fresh  # only others' metadata moved: the caller's revision still names this record
                body, status = self._build(table, kind, record, old)
        self._seen(table, obj)
        for attempt in range(_WRITE_RETRIES):
            want = dict(status, observedGeneration=obj["metadata"].get("generation", 1))
            if obj.get("status") == want:
                break
            obj["status"] = want
            try:
                obj = self._call(f"update {kind.plural}/{name}/status",
                                 self._api.replace_cluster_custom_object_status, kind.plural, name, obj,
                                 field_validation="Strict")
                self._seen(table, obj)
                break
            except (errors.Conflict, errors.NotFound):
                fresh = self._current(table, kind, table.key(record))
                if fresh is None or self._record_of(fresh) != ours:
                    # Another writer (or a deleter) wrote a newer record: the status is
                    # theirs to project.  The revision we return is stale, as it should be.
                    logger.info("status of %s/%s changed underneath; leaving it to the newer write",
                                kind.plural, name)
                    break
                obj = fresh  # a foreign metadata change only: project our record again
                old_status = {k: v for k, v in (fresh.get("status") or {}).items()
                              if k not in status and k != "observedGeneration"}
                status = {**old_status, **status}
        return Revision(str(obj["metadata"]["resourceVersion"]))

    def _current(self, table: Table[Any], kind: Kind, key: str) -> Obj | None:
        obj = self._read(kind, object_name(key))
        if obj is None:
            return None
        ann = (obj.get("metadata") or {}).get("annotations") or {}
        if ann.get(KEY_ANNOTATION, key) != key:
            raise errors.BackendError(f"{kind.plural}/{object_name(key)} holds key {ann[KEY_ANNOTATION]!r}, "
                                      f"not {key!r} (name hash collision)")
        self._seen(table, obj)
        return obj

    # -- StateStore: reads ---------------------------------------------------------

    def get(self, table: Table[T], key: str) -> Versioned[T] | None:
        kind = self._kind(table)
        inf = self._cache(table, start=False)
        if inf is not None:
            return cast("Versioned[T] | None", inf.get(key))
        obj = self._current(table, kind, key)
        rec = None if obj is None else self._record_of(obj)
        if obj is None or rec is None:
            return None
        return self._versioned(table, obj, rec[1])

    def find(self, table: Table[T], *, index: str, value: str) -> list[Versioned[T]]:
        func = table.indexes.get(index)
        if func is None:
            raise errors.InvalidRequest(f"table {table.name} has no index {index!r}")
        kind = self._kind(table)
        inf = self._cache(table, start=True)
        if inf is not None:
            return inf.find(index, value)
        found = self._decode_all(table, self._list_all(kind, f"{INDEX_LABEL_PREFIX}{index}={label_value(value)}"))
        return [v for _, v in found if func(v.value) == value]

    def list(self, table: Table[T], *, after: str = "", limit: int = 0) -> list[Versioned[T]]:
        if limit < 0:
            raise errors.InvalidRequest(f"limit must not be negative: {limit}")
        inf = self._cache(table, start=True)
        if inf is not None:
            return inf.list(after, limit)
        found = [(k, v) for k, v in self._decode_all(table, self._list_all(self._kind(table))) if k > after]
        out = [v for _, v in found]
        return out[:limit] if limit else out

    def _decode_all(self, table: Table[T],
                    items: builtins.list[Obj]) -> builtins.list[tuple[str, Versioned[T]]]:
        out = []
        for obj in items:
            rec = self._record_of(obj)
            if rec is not None:
                out.append((rec[0], self._versioned(table, obj, rec[1])))
        out.sort(key=lambda kv: kv[0])
        return out

    # -- StateStore: writes -----------------------------------------------------

    def create(self, table: Table[T], record: T) -> Revision:
        kind = self._kind(table)
        key = table.key(record)
        old = None
        if kind.adopt:
            old = self._current(table, kind, key)
            if old is not None and (self._record_of(old) is not None or (old.get("metadata") or {}).get(
                    "deletionTimestamp")):
                raise errors.Conflict(f"{table.name}/{key} already exists")
        try:
            return self._write(table, kind, record, old, create=old is None)
        except errors.Conflict as e:
            raise errors.Conflict(f"{table.name}/{key} already exists") from e

    def update(self, table: Table[T], record: T, *, revision: Revision) -> Revision:
        kind = self._kind(table)
        key = table.key(record)
        old = self._current(table, kind, key)
        if old is None or self._record_of(old) is None:
            raise errors.NotFound(f"{table.name}/{key} does not exist")
        if old["metadata"]["resourceVersion"] != revision:
            raise errors.Conflict(f"{table.name}/{key}: revision {revision} is stale "
                                  f"(now {old['metadata']['resourceVersion']})")
        return self._write(table, kind, record, old, create=False)

    def delete(self, table: Table[T], key: str, *, revision: Revision | None = None) -> None:
        kind = self._kind(table)
        obj = self._current(table, kind, key)
        if obj is None or self._record_of(obj) is None:
            self._forget(table, key)
            return
        rv = str(obj["metadata"]["resourceVersion"])
        if revision is not None and revision != rv:
            raise errors.Conflict(f"{table.name}/{key}: revision {revision} is stale (now {rv})")
        seen = self._record_of(obj)
        for attempt in range(_WRITE_RETRIES):
            try:
                self._delete_once(kind, object_name(key), obj)
                break
            except errors.Conflict:
                fresh = self._current(table, kind, key)
                if fresh is None or self._record_of(fresh) is None:
                    break
                if attempt == _WRITE_RETRIES - 1 or self._record_of(fresh) != seen:
                    raise
                obj = fresh  # only others' metadata moved since we read it
        self._forget(table, key)

    def _forget(self, table: Table[Any], key: str) -> None:
        inf = self._informers.get(table.name)
        if inf is not None:
            inf.forget(key)

    def _delete_once(self, kind: Kind, name: str, obj: Obj) -> None:
        rv = str(obj["metadata"]["resourceVersion"])
        finalizers = obj["metadata"].get("finalizers") or []
        if PAIR_FINALIZER in finalizers:
            obj = dict(obj, metadata=dict(obj["metadata"], finalizers=[f for f in finalizers if f != PAIR_FINALIZER]))
            try:
                obj = self._call(f"update {kind.plural}/{name}", self._api.replace_cluster_custom_object,
                                 kind.plural, name, obj, field_validation="Strict")
            except errors.NotFound:
                return
            if obj["metadata"].get("deletionTimestamp"):
                return  # the finalizer was all that kept it
            rv = str(obj["metadata"]["resourceVersion"])
        options = k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(resource_version=rv))
        try:  # retried after a lost answer, a delete that happened answers 404
            retrying(lambda: self._api.delete_cluster_custom_object(GROUP, VERSION, kind.plural, name, body=options,
                                                                    _request_timeout=self._timeout),
                     what=f"delete {kind.plural}/{name}", delays=self._delays)
        except k8s.ApiException as e:
            if e.status == 404:
                return
            raise wrap_api_error(e, f"delete {kind.plural}/{name}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"delete {kind.plural}/{name}") from e

    def apply(self, writes: Sequence[Write]) -> builtins.list[Revision | None]:
        """One by one, in order: the API has no multi-object transaction."""
        out: builtins.list[Revision | None] = []
        for w in writes:
            if isinstance(w, Put):
                out.append(self.create(w.table, w.record) if w.revision is None
                           else self.update(w.table, w.record, revision=w.revision))
            elif isinstance(w, Remove):
                self.delete(w.table, w.key, revision=w.revision)
                out.append(None)
            else:
                raise errors.InvalidRequest(f"not a store write: {w!r}")
        return out

    # -- StateStore: watch ---------------------------------------------------------

    def watch(self, table: Table[T], *, timeout: float) -> Iterator[Change[T]]:
        """Changes after this call, until `timeout` seconds pass.

        The starting resourceVersion is taken now (a list), not at the first
        `next()`.  Each store write is reported once, when it is complete
        (its status written); raises Conflict while iterating if the server
        no longer has the history to resume from (410): list again.
        """
        kind = self._kind(table)
        deadline = time.monotonic() + timeout
        inf = self._cache(table, start=True)
        if inf is not None:
            q, digests = inf.subscribe()
            return self._watch_cached(table, kind, inf, q, digests, deadline)
        page = self._call(f"list {kind.plural}", self._api.list_cluster_custom_object, kind.plural)
        known: dict[str, Any] = {}
        for obj in page.get("items") or []:
            rec = self._record_of(obj)
            if rec is not None:
                known[rec[0]] = hash(rec[1])
        start = str((page.get("metadata") or {}).get("resourceVersion") or "")
        return self._watch(table, kind, start, known, deadline)

    def _watch(self, table: Table[T], kind: Kind, rv: str, known: dict[str, Any],
               deadline: float) -> Iterator[Change[T]]:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            w = k8s_watch.Watch()
            stream = w.stream(self._api.list_cluster_custom_object, GROUP, VERSION, kind.plural,
                              resource_version=rv, timeout_seconds=max(1, math.ceil(left)),
                              _request_timeout=(self._timeout, left))
            try:
                with contextlib.closing(stream):
                    for event in stream:
                        obj = event.get("raw_object") or {}
                        rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                        change = self._change(table, kind, str(event.get("type")), obj, known)
                        if change is not None:
                            yield change
                        if time.monotonic() >= deadline:
                            return
            except k8s.ApiException as e:
                raise wrap_api_error(e, f"watch {kind.plural}") from e
            except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError):
                pass  # the read timeout is our deadline
            except (urllib3.exceptions.HTTPError, OSError) as e:
                raise wrap_api_error(e, f"watch {kind.plural}") from e
            finally:
                w.stop()

    def _watch_cached(self, table: Table[T], kind: Kind, inf: _Informer, q: queue.SimpleQueue[Any],
                      known: dict[str, int], deadline: float) -> Iterator[Change[T]]:
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                try:
                    item = q.get(timeout=left)
                except queue.Empty:
                    return
                if item is _GAP:
                    raise errors.Conflict(f"watch on {table.name}: the cache had to list again; list again")
                change = self._change(table, kind, item[0], item[1], known)
                if change is not None:
                    yield change
        finally:
            inf.unsubscribe(q)

    def _change(self, table: Table[T], kind: Kind, type_: str, obj: Obj,
                known: dict[str, Any]) -> Change[T] | None:
        meta = obj.get("metadata") or {}
        ann = meta.get("annotations") or {}
        key = ann.get(KEY_ANNOTATION)
        if key is None:
            return None
        rv = Revision(str(meta.get("resourceVersion")))
        rec = self._record_of(obj) if type_ != "DELETED" else None
        if rec is None:
            if known.pop(key, None) is None:
                return None
            return Change(kind="delete", key=key, value=None, revision=rv)
        # Report a write once it is complete: the status projects this record.
        spec, status = kind.body(json.loads(rec[1]), obj.get("spec") or {})
        have = obj.get("status") or {}
        if have.get("observedGeneration") != meta.get("generation") or any(
                have.get(k) != v for k, v in status.items()):
            return None
        digest = hash(rec[1])
        if known.get(key) == digest:
            return None
        known[key] = digest
        return Change(kind="put", key=key, value=codec.from_dict(table.type, json.loads(rec[1])), revision=rv)

    # -- extras --------------------------------------------------------------------

    def array_specs(self, *, node_id: NodeId) -> builtins.list[ArraySpec]:
        """Every StorageArray an administrator (or the chart) described, as configuration
        (its spec, read like a --config entry; a file pool without topology is local to
        `node_id`).  Objects the driver made from its own --config are records of it and
        are left out; an object whose spec is not a valid array is logged and skipped."""
        out = []
        for obj in self._list_all(KINDS["arrays"]):
            meta = obj.get("metadata") or {}
            annotations = meta.get("annotations") or {}
            if annotations.get(RECORDED_ANNOTATION) or meta.get("deletionTimestamp"):
                continue
            spec = obj.get("spec") or {}
            item = {"id": str(annotations.get(KEY_ANNOTATION, meta["name"])), "kind": spec.get("kind", ""),
                    "params": spec.get("params") or {}, "labels": spec.get("labels") or {},
                    "abilityOverrides": spec.get("abilityOverrides") or {}, "topology": spec.get("topology") or {}}
            try:
                out.append(config.array_from_item(item, node_id=node_id))
            except errors.InvalidRequest as e:
                logger.error("StorageArray %s is not a usable array, ignoring it: %s", meta["name"], e)
        return sorted(out, key=lambda s: s.id)

    def close(self) -> None:
        for inf in builtins.list(self._informers.values()):
            inf.close()
        self._client.close()


def api_client(*, kubeconfig: str | None = None, context: str | None = None,
               host: str | None = None) -> k8s.ApiClient:
    """An ApiClient: `host` (no auth, tests), a kubeconfig, or the pod's service account."""
    import kubernetes.config as _k8s_config

    k8s_config: Any = _k8s_config

    if host is not None:
        cfg = k8s.Configuration(host=host)
        return k8s.ApiClient(cfg)
    try:
        if kubeconfig is None:
            try:
                k8s_config.load_incluster_config()
                return k8s.ApiClient()
            except k8s_config.ConfigException:
                pass
        cfg = k8s.Configuration()
        k8s_config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        return k8s.ApiClient(cfg)
    except (k8s_config.ConfigException, OSError) as e:
        raise errors.InvalidRequest(f"no Kubernetes configuration: {e}") from e
