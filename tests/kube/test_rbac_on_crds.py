"""The driver in its cluster shape under the chart's RBAC (deploy/20-csi-virtvol.yaml), for
what test_driver_on_crds.py does not exercise: the node plugin's own calls, and copy Jobs
owned by their VolumePair."""
from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from chart_rbac import NODE, NODE_SA, NS, admin_client, granted
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from csi_virtvol.kube.crdstore import API_VERSION, KEY_ANNOTATION, CrdStore, api_client, object_name
from csi_virtvol.model.pair import Fence
from csi_virtvol.services.publish import PublishService, node_record
from csi_virtvol.store import base as S
from fakeapi import FakeApiServer
from fakerbac import RbacAuthorizer
from test_driver_on_crds import start_driver

MiB = 1 << 20
GROUP = "virtvol.csi.example.org"
pytestmark = pytest.mark.root

# What the node plugin's role grants that the scenario below does not reach, and why it is needed.
NODE_NOT_EXERCISED: dict[tuple[str, str, str], str] = {}

CAP = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
    mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER), mount=pb.VolumeCapability.MountVolume(fs_type="ext4"))


@dataclasses.dataclass
class Cluster:
    api: FakeApiServer
    authz: RbacAuthorizer
    channel: grpc.Channel
    node_channel: grpc.Channel
    tmp: Path

    @property
    def ctl(self) -> rpc.ControllerStub:
        return rpc.ControllerStub(self.channel)


@pytest.fixture
def enforced(fake_api: FakeApiServer, xfs_mount: Path, ext4_mount: Path, tmp_path: Path) -> Iterator[Cluster]:
    tag = uuid.uuid4().hex[:8]
    d = start_driver(fake_api, tmp_path, [
        {"id": "fast", "kind": "file", "params": {"path": str(xfs_mount / f"kf-{tag}"), "capacity": "256Mi"}},
        {"id": "slow", "kind": "file", "params": {"path": str(ext4_mount / f"ks-{tag}"), "capacity": "256Mi"}}],
        run_jobs=False)
    assert d.authz is not None
    try:
        yield Cluster(fake_api, d.authz, d.channel, d.node_channel, tmp_path)
    finally:
        d.close()


def test_the_node_plugin_works_within_its_role_and_its_role_holds_only_what_it_uses(enforced: Cluster) -> None:
    """Staging a volume, answering a fence request and registering (again, as after a restart),
    under the node's ServiceAccount: nothing is refused, and the node's ClusterRole grants
    nothing these did not use."""
    c = enforced
    vol = c.ctl.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-n", capacity_range=pb.CapacityRange(required_bytes=32 * MiB), volume_capabilities=[CAP],
        parameters={"arrays": "slow"})).volume
    ctx = dict(c.ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id="node-1", volume_capability=CAP)).publish_context)
    node = rpc.NodeStub(c.node_channel)
    staging = c.tmp / "staging"
    staging.mkdir()
    node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vol.volume_id, staging_target_path=str(staging),
                                                   volume_capability=CAP, publish_context=ctx))
    assert os.path.ismount(staging)
    node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=str(staging)))
    c.ctl.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id="node-1"))

    # a fence request for node-1 (as the controller makes for a live cut): the node answers it
    snap = c.ctl.CreateSnapshot(pb.CreateSnapshotRequest(name="s-n", source_volume_id=vol.volume_id)).snapshot
    admin = CrdStore(admin_client(c.api, c.authz))
    try:
        got = admin.get(S.PAIRS, snap.snapshot_id)
        assert got is not None
        admin.update(S.PAIRS, dataclasses.replace(got.value, fence=Fence.FREEZE_REQUESTED, fence_node="node-1"),
                     revision=got.revision)
        deadline = time.monotonic() + 20
        while True:
            cur = admin.get(S.PAIRS, snap.snapshot_id)
            if (cur is not None and cur.value.fence is Fence.REFUSED) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert cur is not None and cur.value.fence is Fence.REFUSED, "the node did not answer the fence request"
    finally:
        admin.close()

    # a restarted node plugin registers again: its record exists, so it is updated
    store = CrdStore(api_client(kubeconfig=str(c.tmp / f"{NODE_SA}.kubeconfig")))
    try:
        PublishService.register(store, node_record("node-1", {"topology.virtvol.csi.example.org/node": "node-1"}, 7))
    finally:
        store.close()

    assert c.authz.denied() == [], "the chart's RBAC refused the driver"
    used = c.authz.used(NODE)
    role = granted(NODE_SA, "csi-virtvol-node")
    assert used <= role
    unused = sorted(role - used - NODE_NOT_EXERCISED.keys())
    assert unused == [], f"the node's ClusterRole grants what the node plugin did not use: {unused}"
    c.ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    c.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_copy_jobs_are_owned_by_their_pair_and_go_with_a_clone_deleted_mid_copy(enforced: Cluster) -> None:
    """Issue 12 item 7: a deleted clone's copy Jobs stayed until their TTL, with no
    ownerReferences although the chart said they had them.  Each Job is owned by its
    VolumePair (by uid, so the garbage collector deletes it with the pair); and DeleteVolume
    of a clone still being copied deletes its Jobs itself."""
    c = enforced
    vol = c.ctl.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-src", capacity_range=pb.CapacityRange(required_bytes=32 * MiB), volume_capabilities=[CAP],
        parameters={"arrays": "slow"})).volume
    for pv in c.api.objects(GROUP, "physicalvolumes"):
        with open(pv["spec"]["address"], "r+b") as f:
            f.write(os.urandom(MiB))
    with pytest.raises(grpc.RpcError) as e:  # the CO is told to come back while the copy runs
        c.ctl.CreateVolume(pb.CreateVolumeRequest(
            name="pvc-clone", capacity_range=pb.CapacityRange(required_bytes=32 * MiB), volume_capabilities=[CAP],
            parameters={"arrays": "fast"}, volume_content_source=pb.VolumeContentSource(
                volume=pb.VolumeContentSource.VolumeSource(volume_id=vol.volume_id))))
    assert e.value.code() is grpc.StatusCode.ABORTED
    [clone_id] = [o["metadata"]["annotations"][KEY_ANNOTATION] for o in c.api.objects(GROUP, "virtualvolumes")
                  if o["spec"]["name"] == "pvc-clone"]
    deadline = time.monotonic() + 30
    while not c.api.objects("batch", "jobs", NS) and time.monotonic() < deadline:
        time.sleep(0.1)
    jobs = c.api.objects("batch", "jobs", NS)
    assert jobs, "the ext4 -> xfs clone is a host copy: a Job"
    pair = c.api.find(GROUP, "volumepairs", object_name(clone_id))
    assert pair is not None and pair["spec"]["targets"] == [clone_id]
    for job in jobs:
        assert job["metadata"]["ownerReferences"] == [{
            "apiVersion": API_VERSION, "kind": "VolumePair", "name": pair["metadata"]["name"],
            "uid": pair["metadata"]["uid"], "controller": True, "blockOwnerDeletion": False}]

    c.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=clone_id))
    assert c.api.objects("batch", "jobs", NS) == [], "the clone's copy Jobs outlived it"
    assert c.api.find(GROUP, "volumepairs", object_name(clone_id)) is None
    assert c.authz.denied() == []
    c.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))

