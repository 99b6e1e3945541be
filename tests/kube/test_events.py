"""Events on PVCs and VolumeSnapshots, checked by the fake API server (strict schema)."""
from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from csi_virtvol import errors
from csi_virtvol.kube.events import EventRecorder, ObjectRef, build_event

from fakeapi import FakeApiServer


def test_events_on_pvc_and_snapshot(fake_api: FakeApiServer, client: Any) -> None:
    rec = EventRecorder(client, instance="csi-virtvol-controller-0")
    assert rec.record_event(ObjectRef.pvc("apps", "data", uid="u-1"), "CopyStarted",
                            "copying 3 extents from vol-1 (host copy on node-a)")
    assert rec.record_event(ObjectRef.volume_snapshot("apps", "snap-1"), "CopyFailed", "x" * 5000, "Warning")
    got = fake_api.objects("events.k8s.io", "events", "apps")
    assert len(got) == 2
    by_reason = {e["reason"]: e for e in got}
    pvc = by_reason["CopyStarted"]
    assert pvc["regarding"] == {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": "apps",
                                "name": "data", "uid": "u-1"}
    assert pvc["type"] == "Normal" and pvc["reportingInstance"] == "csi-virtvol-controller-0"
    snap = by_reason["CopyFailed"]
    assert snap["regarding"]["apiVersion"] == "snapshot.storage.k8s.io/v1"
    assert snap["type"] == "Warning" and len(snap["note"].encode()) <= 1024


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_event_body_validates(version: str) -> None:
    body = build_event(ObjectRef.pvc("ns", "claim"), reason="CopyDone", message="ok")
    kubernetes_validate.validate(body, version, strict=True)


def test_bad_events_are_refused(client: Any) -> None:
    with pytest.raises(errors.InvalidRequest):
        build_event(ObjectRef.pvc("ns", "c"), reason="copy done", message="m")
    with pytest.raises(errors.InvalidRequest):
        build_event(ObjectRef.pvc("ns", "c"), reason="Done", message="m", type_="Error")


def test_recording_is_best_effort(fake_api: FakeApiServer, client: Any) -> None:
    rec = EventRecorder(client)
    # an invalid namespace name: the server refuses (422); the caller is not failed
    assert not rec.record_event(ObjectRef.pvc("Not_A_Namespace", "c"), "CopyDone", "m")


# ---- issue 12 item 4: Events somebody sees ----------------------------------------------------

def _pvc(fake_api: FakeApiServer, ns: str, name: str) -> str:
    obj = fake_api.put("", "persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
        namespace=ns)
    return str(obj["metadata"]["uid"])


def _describe(fake_api: FakeApiServer, ns: str, kind: str, name: str, uid: str) -> list[dict[str, Any]]:
    """What `kubectl describe` lists: Events whose regarding is the object, uid included."""
    return [e for e in fake_api.objects("events.k8s.io", "events", ns)
            if e["regarding"].get("kind") == kind and e["regarding"].get("name") == name
            and e["regarding"].get("uid") == uid]


def test_copy_events_carry_the_uid_of_the_pvc_and_the_snapshot(fake_api: FakeApiServer, client: Any) -> None:
    from csi_virtvol.kube.sink import KubeEvents

    uid = _pvc(fake_api, "apps", "data")
    snap = fake_api.put("snapshot.storage.k8s.io", "volumesnapshots", {
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot", "metadata": {"name": "snap-1"},
        "spec": {"source": {"persistentVolumeClaimName": "data"}}}, namespace="apps")
    sink = KubeEvents(EventRecorder(client, instance="ctl-0"))
    # the CO's extra-create-metadata names the object; the PV name here is not `pvc-<uid>`,
    # so the uid is read from the API server
    sink.emit(parameters={"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "apps",
                          "csi.storage.k8s.io/pv/name": "custom-name"}, reason="CopyStarted", message="m")
    sink.emit(parameters={"csi.storage.k8s.io/volumesnapshot/name": "snap-1",
                          "csi.storage.k8s.io/volumesnapshot/namespace": "apps"},
              reason="CopyFailed", message="cut failed", warning=True)
    [pvc_ev] = _describe(fake_api, "apps", "PersistentVolumeClaim", "data", uid)
    assert pvc_ev["regarding"] == {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": "apps",
                                   "name": "data", "uid": uid}
    [snap_ev] = _describe(fake_api, "apps", "VolumeSnapshot", "snap-1", snap["metadata"]["uid"])
    assert snap_ev["type"] == "Warning" and snap_ev["reason"] == "CopyFailed"


def test_uid_from_the_generated_names_without_a_read() -> None:
    from csi_virtvol.kube.sink import object_ref

    u = "0b7d9c1e-3f6a-4d2b-9e8f-1a2b3c4d5e6f"
    ref = object_ref({"csi.storage.k8s.io/pvc/name": "d", "csi.storage.k8s.io/pvc/namespace": "n",
                      "csi.storage.k8s.io/pv/name": f"pvc-{u}"})
    assert ref is not None and ref.uid == u
    ref = object_ref({"csi.storage.k8s.io/volumesnapshot/name": "s",
                      "csi.storage.k8s.io/volumesnapshot/namespace": "n",
                      "csi.storage.k8s.io/volumesnapshotcontent/name": f"snapcontent-{u}"})
    assert ref is not None and ref.uid == u and ref.kind == "VolumeSnapshot"


def test_repeated_identical_events_become_one_series(fake_api: FakeApiServer, client: Any) -> None:
    """Nine CreateSnapshot retries: one CopyStarted Event with series.count 9, not nine Events."""
    now = [1000.0]
    rec = EventRecorder(client, instance="ctl-0", clock=lambda: now[0])
    uid = _pvc(fake_api, "apps", "data")
    ref = ObjectRef.pvc("apps", "data", uid=uid)
    for _ in range(9):
        assert rec.record_event(ref, "CopyStarted", "copying vv-1 into vs-1: host 64 MiB")
        now[0] += 1
    [ev] = _describe(fake_api, "apps", "PersistentVolumeClaim", "data", uid)
    assert ev["series"]["count"] == 9 and ev["series"]["lastObservedTime"]
    # another reason is another Event
    assert rec.record_event(ref, "CopyFailed", "boom", "Warning")
    assert len(_describe(fake_api, "apps", "PersistentVolumeClaim", "data", uid)) == 2
    # after the series window a repeat starts a new Event, as client-go's recorder does
    now[0] += 7 * 60
    assert rec.record_event(ref, "CopyStarted", "copying again")
    started = [e for e in _describe(fake_api, "apps", "PersistentVolumeClaim", "data", uid)
               if e["reason"] == "CopyStarted"]
    assert len(started) == 2
    # the series' Event was deleted (TTL): the next repeat is created anew, not lost
    first = [e for e in started if "series" not in e][0]["metadata"]["name"]
    import kubernetes.client as k8s
    k8s.EventsV1Api(client).delete_namespaced_event(first, "apps")
    assert rec.record_event(ref, "CopyStarted", "copying again")
    started = [e for e in _describe(fake_api, "apps", "PersistentVolumeClaim", "data", uid)
               if e["reason"] == "CopyStarted"]
    assert len(started) == 2 and all(e["metadata"]["name"] != first for e in started)
    for e in started:
        kubernetes_validate.validate(e | {"metadata": {"name": e["metadata"]["name"]}}, "1.30.0", strict=True)
