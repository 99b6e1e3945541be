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
