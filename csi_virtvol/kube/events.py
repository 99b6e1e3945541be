"""Kubernetes Events (events.k8s.io/v1) on the objects users look at: the
PersistentVolumeClaim or VolumeSnapshot a copy works for.

Events are best effort, as client-go's recorder: a failure to record one is
logged and never fails the operation that reported it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import time
import uuid
from typing import Any, cast

import kubernetes.client as k8s
import urllib3.exceptions

from csi_virtvol import errors

logger = logging.getLogger(__name__)

REPORTING_CONTROLLER = "virtvol.csi.example.org/csi-virtvol"
_REASON = re.compile(r"^[A-Z][A-Za-z0-9]{0,127}$")
_NOTE_MAX = 1024


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
        "eventTime": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": (instance or "csi-virtvol")[:128],
        "action": (action or reason)[:128],
        "reason": reason,
        "note": note,
        "type": type_,
        "regarding": regarding,
    }


class EventRecorder:
    """Records Events as `instance` (the pod's name) of the csi-virtvol controller."""

    def __init__(self, api_client: k8s.ApiClient, *, instance: str = "", request_timeout: float = 10.0) -> None:
        self._api = k8s.EventsV1Api(api_client)
        self._instance = instance
        self._timeout = request_timeout

    def record_event(self, ref: ObjectRef, reason: str, message: str, type_: str = "Normal", *,
                     action: str = "") -> bool:
        """Record one Event on `ref`; False (and a log line) if the API refused it."""
        body = build_event(ref, reason=reason, message=message, type_=type_, action=action,
                           instance=self._instance)
        try:
            self._api.create_namespaced_event(ref.namespace, cast(Any, body),  # a dict body is sent as is
                                             _request_timeout=self._timeout)
        except (k8s.ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            logger.warning("could not record event %s on %s %s/%s: %s", reason, ref.kind, ref.namespace,
                           ref.name, e)
            return False
        return True
