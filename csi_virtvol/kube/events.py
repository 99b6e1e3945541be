"""Kubernetes Events (events.k8s.io/v1) on the objects users look at: the
PersistentVolumeClaim or VolumeSnapshot a copy works for.

Events are best effort, as client-go's recorder: a failure to record one is
logged and never fails the operation that reported it.

As client-go's events recorder (tools/events), an Event that repeats an
earlier one (same regarding object, reason, action and reporting controller)
within `SERIES_WINDOW` is not created again: the first one gains a `series`
(count, lastObservedTime) by a PATCH.  `regarding` carries the object's uid,
which `kubectl describe` filters on; `resolve` looks it up when the caller
only knows the name.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import kubernetes.client as k8s
import urllib3.exceptions

from csi_virtvol import errors

logger = logging.getLogger(__name__)

REPORTING_CONTROLLER = "virtvol.csi.example.org/csi-virtvol"
_REASON = re.compile(r"^[A-Z][A-Za-z0-9]{0,127}$")
_NOTE_MAX = 1024
SERIES_WINDOW = 6 * 60.0  # seconds; client-go's events recorder finishes a series after 6 minutes
_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ObjectRef:
    """What an Event is about."""

    kind: str          # PersistentVolumeClaim, VolumeSnapshot, ...
    namespace: str
    name: str
    api_version: str = "v1"
    uid: str = ""

    @classmethod
    def pvc(cls, namespace: str, name: str, uid: str = "") -> ObjectRef:
        return cls(kind="PersistentVolumeClaim", namespace=namespace, name=name, uid=uid)

    @classmethod
    def volume_snapshot(cls, namespace: str, name: str, uid: str = "") -> ObjectRef:
        return cls(kind="VolumeSnapshot", api_version="snapshot.storage.k8s.io/v1", namespace=namespace,
                   name=name, uid=uid)


def build_event(ref: ObjectRef, *, reason: str, message: str, type_: str = "Normal", action: str = "",
                instance: str = "", now: dt.datetime | None = None) -> dict[str, Any]:
    """The events.k8s.io/v1 Event body for `ref`."""
    if type_ not in ("Normal", "Warning"):
        raise errors.InvalidRequest(f"event type must be Normal or Warning, not {type_!r}")
    if not _REASON.match(reason):
        raise errors.InvalidRequest(f"event reason {reason!r} is not UpperCamelCase of at most 128 characters")
    when = now or dt.datetime.now(dt.timezone.utc)
    note = message if len(message.encode()) <= _NOTE_MAX else message.encode()[:_NOTE_MAX - 3].decode(
        errors="ignore") + "..."
    regarding: dict[str, Any] = {"apiVersion": ref.api_version, "kind": ref.kind, "namespace": ref.namespace,
                                 "name": ref.name}
    if ref.uid:
        regarding["uid"] = ref.uid
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": f"{ref.name[:200]}.{int(time.time() * 1e9):x}{uuid.uuid4().hex[:4]}",
                     "namespace": ref.namespace},
        "eventTime": when.strftime(_TIME),
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": (instance or "csi-virtvol")[:128],
        "action": (action or reason)[:128],
        "reason": reason,
        "note": note,
        "type": type_,
        "regarding": regarding,
    }


@dataclasses.dataclass(slots=True)
class _Series:
    name: str          # the Event the repeats are counted on
    count: int
    last: float        # monotonic time of the last observation


class EventRecorder:
    """Records Events as `instance` (the pod's name) of the csi-virtvol controller."""

    def __init__(self, api_client: k8s.ApiClient, *, instance: str = "", request_timeout: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._api = k8s.EventsV1Api(api_client)
        self._core = k8s.CoreV1Api(api_client)
        self._custom = k8s.CustomObjectsApi(api_client)
        self._instance = instance
        self._timeout = request_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], _Series] = {}
        self._uids: dict[tuple[str, str, str], str] = {}

    def resolve(self, ref: ObjectRef) -> ObjectRef:
        """`ref` with its object's uid, read from the API server (cached); `ref` as it is
        when it has one already or the object cannot be read."""
        if ref.uid:
            return ref
        key = (ref.kind, ref.namespace, ref.name)
        with self._lock:
            uid = self._uids.get(key, "")
        if not uid:
            try:
                if ref.kind == "PersistentVolumeClaim":
                    obj: Any = self._core.read_namespaced_persistent_volume_claim(
                        ref.name, ref.namespace, _request_timeout=self._timeout)
                    uid = str(obj.metadata.uid or "")
                elif ref.kind == "VolumeSnapshot":
                    obj = self._custom.get_namespaced_custom_object(
                        "snapshot.storage.k8s.io", "v1", ref.namespace, "volumesnapshots", ref.name,
                        _request_timeout=self._timeout)
                    uid = str(obj.get("metadata", {}).get("uid", ""))
            except (k8s.ApiException, urllib3.exceptions.HTTPError, OSError) as e:
                logger.warning("could not read %s %s/%s for its uid: %s", ref.kind, ref.namespace, ref.name, e)
                return ref
            if uid:
                with self._lock:
                    self._uids[key] = uid
        return dataclasses.replace(ref, uid=uid)

    def record_event(self, ref: ObjectRef, reason: str, message: str, type_: str = "Normal", *,
                     action: str = "") -> bool:
        """Record one Event on `ref`, or count it on the series of an earlier identical
        one; False (and a log line) if the API refused it."""
        body = build_event(ref, reason=reason, message=message, type_=type_, action=action,
                           instance=self._instance)
        key = (body["action"], reason, body["reportingController"], ref.api_version, ref.kind,
               ref.namespace, ref.name, ref.uid)
        with self._lock:  # one recording at a time keeps a series' count exact
            now = self._clock()
            series = self._series.get(key)
            if series is not None and now - series.last <= SERIES_WINDOW:
                series.count += 1
                series.last = now
                if self._patch_series(ref, series, reason=reason):
                    return True
            for k in [k for k, v in self._series.items() if now - v.last > SERIES_WINDOW]:
                del self._series[k]
            try:
                self._api.create_namespaced_event(ref.namespace, cast(Any, body),  # a dict body is sent as is
                                                 _request_timeout=self._timeout)
            except (k8s.ApiException, urllib3.exceptions.HTTPError, OSError) as e:
                self._series.pop(key, None)
                logger.warning("could not record event %s on %s %s/%s: %s", reason, ref.kind, ref.namespace,
                               ref.name, e)
                return False
            self._series[key] = _Series(name=body["metadata"]["name"], count=1, last=now)
            return True

    def _patch_series(self, ref: ObjectRef, series: _Series, *, reason: str) -> bool:
        """Count a repeat on the first Event; False when that Event is gone (its TTL), so a
        new one is created."""
        observed = dt.datetime.now(dt.timezone.utc).strftime(_TIME)
        patch = {"series": {"count": series.count, "lastObservedTime": observed}}
        try:
            self._api.patch_namespaced_event(series.name, ref.namespace, cast(Any, patch),
                                             _content_type="application/merge-patch+json",
                                             _request_timeout=self._timeout)
        except k8s.ApiException as e:
            if e.status == 404:
                return False
            logger.warning("could not count event %s on %s %s/%s: %s", reason, ref.kind, ref.namespace,
                           ref.name, e)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            logger.warning("could not count event %s on %s %s/%s: %s", reason, ref.kind, ref.namespace,
                           ref.name, e)
        return True
