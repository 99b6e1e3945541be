"""Events on the VolumeSnapshot or PVC a copy is for (services.events.EventSink)."""
from __future__ import annotations

import logging
from collections.abc import Mapping

from csi_virtvol.kube.events import EventRecorder, ObjectRef

log = logging.getLogger(__name__)

PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
SNAPSHOT_NAME = "csi.storage.k8s.io/volumesnapshot/name"
SNAPSHOT_NAMESPACE = "csi.storage.k8s.io/volumesnapshot/namespace"


def object_ref(parameters: Mapping[str, str]) -> ObjectRef | None:
    if parameters.get(SNAPSHOT_NAME) and parameters.get(SNAPSHOT_NAMESPACE):
        return ObjectRef.volume_snapshot(parameters[SNAPSHOT_NAMESPACE], parameters[SNAPSHOT_NAME])
    if parameters.get(PVC_NAME) and parameters.get(PVC_NAMESPACE):
        return ObjectRef.pvc(parameters[PVC_NAMESPACE], parameters[PVC_NAME])
    return None


class KubeEvents:
    def __init__(self, recorder: EventRecorder) -> None:
        self._recorder = recorder

    def emit(self, *, parameters: Mapping[str, str], reason: str, message: str, warning: bool = False) -> None:
        ref = object_ref(parameters)
        if ref is None:
            log.info("event %s (no object to attach it to): %s", reason, message)
            return
        self._recorder.record_event(ref, reason, message, "Warning" if warning else "Normal")
