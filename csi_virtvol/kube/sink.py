"""Events on the VolumeSnapshot or PVC a copy is for (services.events.EventSink)."""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from csi_virtvol.kube.events import EventRecorder, ObjectRef

log = logging.getLogger(__name__)

PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
PV_NAME = "csi.storage.k8s.io/pv/name"
SNAPSHOT_NAME = "csi.storage.k8s.io/volumesnapshot/name"
SNAPSHOT_NAMESPACE = "csi.storage.k8s.io/volumesnapshot/namespace"
SNAPSHOT_CONTENT_NAME = "csi.storage.k8s.io/volumesnapshotcontent/name"

# external-provisioner names a PV `<prefix>-<PVC uid>` (unless told to shorten the uid);
# snapshot-controller names a dynamic VolumeSnapshotContent `snapcontent-<VolumeSnapshot uid>`
_TRAILING_UID = re.compile(r"-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


def _uid_in(name: str, prefix: str = "") -> str:
    if prefix and not name.startswith(prefix):
        return ""
    m = _TRAILING_UID.search(name)
    return m.group(1) if m else ""


def object_ref(parameters: Mapping[str, str]) -> ObjectRef | None:
    """The CO object the parameters name, with the uid its generated name carries (if any)."""
    if parameters.get(SNAPSHOT_NAME) and parameters.get(SNAPSHOT_NAMESPACE):
        return ObjectRef.volume_snapshot(parameters[SNAPSHOT_NAMESPACE], parameters[SNAPSHOT_NAME],
                                         uid=_uid_in(parameters.get(SNAPSHOT_CONTENT_NAME, ""), "snapcontent-"))
    if parameters.get(PVC_NAME) and parameters.get(PVC_NAMESPACE):
        return ObjectRef.pvc(parameters[PVC_NAMESPACE], parameters[PVC_NAME],
                             uid=_uid_in(parameters.get(PV_NAME, "")))
    return None


class KubeEvents:
    def __init__(self, recorder: EventRecorder) -> None:
        self._recorder = recorder

    def emit(self, *, parameters: Mapping[str, str], reason: str, message: str, warning: bool = False) -> None:
        ref = object_ref(parameters)
        if ref is None:
            log.info("event %s (no object to attach it to): %s", reason, message)
            return
        self._recorder.record_event(self._recorder.resolve(ref), reason, message,
                                    "Warning" if warning else "Normal")
