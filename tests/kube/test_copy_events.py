"""Issue 12 item 4, the whole driver against the fake API server: a snapshot whose cut
fails says so with a CopyFailed Warning on the VolumeSnapshot (uid included, so
`kubectl describe` shows it), and the CO's retries add to one series instead of
repeating CopyStarted Events."""
from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from csi_virtvol import app
from csi_virtvol.config import load_config
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from fakeapi import FakeApiServer

MiB = 1 << 20
NS = "csi-virtvol"
pytestmark = pytest.mark.root


@pytest.fixture
def controller(fake_api: FakeApiServer, ext4_mount: Path, tmp_path: Path) -> Iterator[rpc.ControllerStub]:
    tag = uuid.uuid4().hex[:8]
    cfg = tmp_path / "controller.yaml"
    cfg.write_text(yaml.safe_dump({
        "store": "crd", "kubeApi": fake_api.url, "namespace": NS, "copyImage": "csi-virtvol:test",
        "copyJob": {"serviceAccountName": "csi-virtvol-copy", "hostDataDir": str(tmp_path / "host")},
        # an administrator's override claims reflink on ext4: every clone fails at the cut
        "arrays": [{"id": "claims-reflink", "kind": "file", "abilityOverrides": {"internal-copy": True},
                    "params": {"path": str(ext4_mount / f"ce-{tag}"), "capacity": "64Mi"}}]}))
    sock = f"/tmp/virtvol-ev-{tag}.sock"
    config = load_config(endpoint=f"unix://{sock}", data_dir=str(tmp_path / "data"), node_id="node-1",
                         mode="controller", config_file=str(cfg))
    stop = threading.Event()
    server = threading.Thread(target=app.serve, args=(config,), kwargs={"stop": stop}, daemon=True)
    server.start()
    channel = grpc.insecure_channel(f"unix://{sock}")
    grpc.channel_ready_future(channel).result(timeout=30)
    try:
        yield rpc.ControllerStub(channel)
    finally:
        channel.close()
        stop.set()
        server.join(timeout=30)


def test_a_failed_cut_is_a_warning_on_the_snapshot_and_retries_are_one_series(
        fake_api: FakeApiServer, controller: rpc.ControllerStub) -> None:
    cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
        mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER), mount=pb.VolumeCapability.MountVolume())
    vol = controller.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-1", capacity_range=pb.CapacityRange(required_bytes=16 * MiB), volume_capabilities=[cap])).volume
    snap_obj = fake_api.put("snapshot.storage.k8s.io", "volumesnapshots", {
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot", "metadata": {"name": "snap"},
        "spec": {"source": {"persistentVolumeClaimName": "data"}}}, namespace="default")
    uid = snap_obj["metadata"]["uid"]
    params = {"csi.storage.k8s.io/volumesnapshot/name": "snap",
              "csi.storage.k8s.io/volumesnapshot/namespace": "default",
              "csi.storage.k8s.io/volumesnapshotcontent/name": f"snapcontent-{uid}"}
    for _ in range(3):  # csi-snapshotter retries a failed CreateSnapshot
        with pytest.raises(grpc.RpcError) as e:
            controller.CreateSnapshot(pb.CreateSnapshotRequest(name="snapshot-1", source_volume_id=vol.volume_id,
                                                               parameters=params))
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT, e.value  # UnsupportedCapability
    events: list[dict[str, Any]] = [
        ev for ev in fake_api.objects("events.k8s.io", "events", "default")
        if ev["regarding"] == {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                               "namespace": "default", "name": "snap", "uid": uid}]
    by_reason = {ev["reason"]: ev for ev in events}
    assert len(events) == 2 and set(by_reason) == {"CopyStarted", "CopyFailed"}, events
    failed = by_reason["CopyFailed"]
    assert failed["type"] == "Warning" and "cut" in failed["note"]
    assert failed["series"]["count"] == 3 and by_reason["CopyStarted"]["series"]["count"] == 3
    controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
