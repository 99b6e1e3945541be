"""Our own conformance suite, written from the CSI v1.12 spec text.

Every bad request gets the code the spec names for it, and leaves nothing
behind: the LUN files on the arrays and the records in the state store are
counted before and after.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from csi_virtvol import DRIVER_NAME
from csi_virtvol.csi._gen import csi_pb2 as pb
from harness.plugin import NODE_ID, Plugin, block_cap, mount_cap, unique

MiB = 1 << 20
Code = grpc.StatusCode
Mode = pb.VolumeCapability.AccessMode.Mode


def expect(p: Plugin, code: grpc.StatusCode, call: Callable[[Any], Any], req: Any) -> None:
    before = p.footprint()
    with pytest.raises(grpc.RpcError) as e:
        call(req)
    assert e.value.code() is code, e.value.details()
    assert e.value.details(), "an error must say why"
    assert p.footprint() == before, "a failed request left something behind"


def new_volume(p: Plugin, size: int = 8 * MiB) -> str:
    return str(p.controller.CreateVolume(pb.CreateVolumeRequest(
        name=unique(), capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_cap()])).volume.volume_id)


# -- Identity -----------------------------------------------------------------

def test_identity(plugin: Plugin) -> None:
    info = plugin.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == DRIVER_NAME and info.vendor_version
    caps = plugin.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    assert pb.PluginCapability.Service.CONTROLLER_SERVICE in services
    assert pb.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS in services
    assert plugin.identity.Probe(pb.ProbeRequest()).ready.value


# -- CreateVolume -------------------------------------------------------------

def _create(**kw: Any) -> pb.CreateVolumeRequest:
    base: dict[str, Any] = dict(name=unique(), capacity_range=pb.CapacityRange(required_bytes=8 * MiB),
                                volume_capabilities=[mount_cap()])
    base.update(kw)
    return pb.CreateVolumeRequest(**base)


@pytest.mark.parametrize("req,code", [
    (_create(name=""), Code.INVALID_ARGUMENT),
    (_create(volume_capabilities=[]), Code.INVALID_ARGUMENT),
    (_create(volume_capabilities=[pb.VolumeCapability(
        access_mode=pb.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER))]), Code.INVALID_ARGUMENT),
    (_create(volume_capabilities=[pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume())]),
     Code.INVALID_ARGUMENT),
    (_create(volume_capabilities=[mount_cap("ntfs")]), Code.INVALID_ARGUMENT),
    (_create(volume_capabilities=[mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)]), Code.INVALID_ARGUMENT),
    (_create(parameters={"iops": "100"}), Code.INVALID_ARGUMENT),
    (_create(parameters={"layout": "striped"}), Code.INVALID_ARGUMENT),
    (_create(parameters={"arrays": "no-such-array"}), Code.INVALID_ARGUMENT),
    (_create(parameters={"maxExtentSize": "12345"}), Code.INVALID_ARGUMENT),
    (_create(mutable_parameters={"colour": "blue"}), Code.INVALID_ARGUMENT),
    (_create(capacity_range=pb.CapacityRange(required_bytes=-1)), Code.OUT_OF_RANGE),
    (_create(capacity_range=pb.CapacityRange(required_bytes=8 * MiB, limit_bytes=4 * MiB)), Code.OUT_OF_RANGE),
    (_create(capacity_range=pb.CapacityRange(required_bytes=MiB + 1, limit_bytes=MiB + 2)), Code.OUT_OF_RANGE),
    (_create(capacity_range=pb.CapacityRange(required_bytes=1 << 60)), Code.OUT_OF_RANGE),
    (_create(capacity_range=pb.CapacityRange(required_bytes=511 * MiB),
             parameters={"layout": "single"}), Code.RESOURCE_EXHAUSTED),
    (_create(accessibility_requirements=pb.TopologyRequirement(requisite=[pb.Topology(
        segments={"topology.virtvol.csi.example.org/node": "elsewhere"})])), Code.RESOURCE_EXHAUSTED),
    (_create(volume_content_source=pb.VolumeContentSource(
        volume=pb.VolumeContentSource.VolumeSource(volume_id=""))), Code.INVALID_ARGUMENT),
])
def test_create_volume_rejects(plugin: Plugin, req: pb.CreateVolumeRequest, code: grpc.StatusCode) -> None:
    expect(plugin, code, plugin.controller.CreateVolume, req)


def test_create_volume_fills_free_space_exactly_then_exhausts(plugin: Plugin) -> None:
    plugin.controller.CreateVolume(_create(capacity_range=pb.CapacityRange(required_bytes=512 * MiB)))
    expect(plugin, Code.RESOURCE_EXHAUSTED, plugin.controller.CreateVolume, _create())


def test_create_volume_idempotent_returns_same_volume(plugin: Plugin) -> None:
    req = _create()
    assert plugin.controller.CreateVolume(req) == plugin.controller.CreateVolume(req)


def test_create_volume_co_metadata_parameters_are_accepted(plugin: Plugin) -> None:
    plugin.controller.CreateVolume(_create(parameters={
        "csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "default",
        "csi.storage.k8s.io/pv/name": "pvc-123"}))


def test_create_volume_honours_requisite_topology(plugin: Plugin) -> None:
    seg = {"topology.virtvol.csi.example.org/node": NODE_ID}
    vol = plugin.controller.CreateVolume(_create(accessibility_requirements=pb.TopologyRequirement(
        requisite=[pb.Topology(segments=seg)], preferred=[pb.Topology(segments=seg)]))).volume
    assert dict(vol.accessible_topology[0].segments) == seg


# -- DeleteVolume ---------------------------------------------------------------

def test_delete_volume(plugin: Plugin) -> None:
    expect(plugin, Code.INVALID_ARGUMENT, plugin.controller.DeleteVolume, pb.DeleteVolumeRequest())
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id="vv-does-not-exist"))


# -- ControllerPublish / Unpublish ----------------------------------------------

def test_controller_publish_rejects(plugin: Plugin) -> None:
    vid = new_volume(plugin)
    c = plugin.controller.ControllerPublishVolume
    R = pb.ControllerPublishVolumeRequest
    expect(plugin, Code.INVALID_ARGUMENT, c, R(node_id=NODE_ID, volume_capability=mount_cap()))
    expect(plugin, Code.INVALID_ARGUMENT, c, R(volume_id=vid, volume_capability=mount_cap()))
    expect(plugin, Code.INVALID_ARGUMENT, c, R(volume_id=vid, node_id=NODE_ID))
    expect(plugin, Code.INVALID_ARGUMENT, c, R(volume_id=vid, node_id=NODE_ID, volume_capability=mount_cap("zfs")))
    expect(plugin, Code.NOT_FOUND, c, R(volume_id="vv-none", node_id=NODE_ID, volume_capability=mount_cap()))
    expect(plugin, Code.NOT_FOUND, c, R(volume_id=vid, node_id="ghost", volume_capability=mount_cap()))


def test_controller_unpublish(plugin: Plugin) -> None:
    expect(plugin, Code.INVALID_ARGUMENT, plugin.controller.ControllerUnpublishVolume,
           pb.ControllerUnpublishVolumeRequest(node_id=NODE_ID))
    plugin.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id="vv-none", node_id=NODE_ID))


# -- Validate / Get / List / Capacity -------------------------------------------

def test_validate_volume_capabilities(plugin: Plugin) -> None:
    vid = new_volume(plugin)
    v = plugin.controller.ValidateVolumeCapabilities
    R = pb.ValidateVolumeCapabilitiesRequest
    expect(plugin, Code.INVALID_ARGUMENT, v, R(volume_capabilities=[mount_cap()]))
    expect(plugin, Code.INVALID_ARGUMENT, v, R(volume_id=vid))
    expect(plugin, Code.NOT_FOUND, v, R(volume_id="vv-none", volume_capabilities=[mount_cap()]))
    expect(plugin, Code.INVALID_ARGUMENT, v, R(volume_id=vid, volume_capabilities=[mount_cap()],
                                               parameters={"bogus": "1"}))
    ok = v(R(volume_id=vid, volume_capabilities=[block_cap()]))
    assert ok.HasField("confirmed")


def test_controller_get_volume(plugin: Plugin) -> None:
    expect(plugin, Code.INVALID_ARGUMENT, plugin.controller.ControllerGetVolume, pb.ControllerGetVolumeRequest())
    expect(plugin, Code.NOT_FOUND, plugin.controller.ControllerGetVolume,
           pb.ControllerGetVolumeRequest(volume_id="vv-none"))


def test_list_volumes_tokens(plugin: Plugin) -> None:
    expect(plugin, Code.ABORTED, plugin.controller.ListVolumes, pb.ListVolumesRequest(starting_token="nope"))
    expect(plugin, Code.INVALID_ARGUMENT, plugin.controller.ListVolumes, pb.ListVolumesRequest(max_entries=-1))
    assert list(plugin.controller.ListVolumes(pb.ListVolumesRequest()).entries) == []


def test_get_capacity_with_unsupported_capability_is_zero(plugin: Plugin) -> None:
    r = plugin.controller.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[mount_cap("ntfs")]))
    assert r.available_capacity == 0
    expect(plugin, Code.INVALID_ARGUMENT, plugin.controller.GetCapacity,
           pb.GetCapacityRequest(parameters={"bogus": "x"}))


# -- Expand / Modify --------------------------------------------------------------

def test_controller_expand_rejects(plugin: Plugin) -> None:
    vid = new_volume(plugin)
    e = plugin.controller.ControllerExpandVolume
    R = pb.ControllerExpandVolumeRequest
    expect(plugin, Code.INVALID_ARGUMENT, e, R(capacity_range=pb.CapacityRange(required_bytes=16 * MiB)))
    expect(plugin, Code.INVALID_ARGUMENT, e, R(volume_id=vid))
    expect(plugin, Code.NOT_FOUND, e, R(volume_id="vv-none", capacity_range=pb.CapacityRange(required_bytes=16 * MiB)))
    expect(plugin, Code.OUT_OF_RANGE, e, R(volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=-5)))
    expect(plugin, Code.RESOURCE_EXHAUSTED, e, R(volume_id=vid, capacity_range=pb.CapacityRange(
        required_bytes=600 * MiB)))
    # shrinking is a no-op that reports the current size
    assert e(R(volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=MiB))).capacity_bytes == 8 * MiB


def test_controller_modify_rejects(plugin: Plugin) -> None:
    vid = new_volume(plugin)
    m = plugin.controller.ControllerModifyVolume
    R = pb.ControllerModifyVolumeRequest
    expect(plugin, Code.INVALID_ARGUMENT, m, R(mutable_parameters={"maxExtentSize": "64Mi"}))
    expect(plugin, Code.INVALID_ARGUMENT, m, R(volume_id=vid, mutable_parameters={"maxExtentSize": "-1"}))
    expect(plugin, Code.INVALID_ARGUMENT, m, R(volume_id=vid, mutable_parameters={"arrays": "nowhere"}))
    # the volume is looked up first: a missing one is NOT_FOUND, with or without parameters
    expect(plugin, Code.NOT_FOUND, m, R(volume_id="vv-none"))
    expect(plugin, Code.NOT_FOUND, m, R(volume_id="vv-none", mutable_parameters={"colour": "blue"}))


def _mutable(p: Plugin, vid: str) -> dict[str, str]:
    from csi_virtvol.store import base as S
    from csi_virtvol.store.sqlite import SqliteStore

    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.VOLUMES, vid)
    assert rec is not None
    return dict(rec.value.mutable_parameters)


def test_controller_modify_with_no_parameters_is_a_no_op(plugin: Plugin) -> None:
    """As in the reference driver (csi-driver-host-path): an empty mutable_parameters map on
    an existing volume succeeds and changes nothing."""
    vid = new_volume(plugin)
    m = plugin.controller.ControllerModifyVolume
    m(pb.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters={"maxExtentSize": "4Mi"}))
    before = plugin.footprint(), _mutable(plugin, vid)
    m(pb.ControllerModifyVolumeRequest(volume_id=vid))
    assert (plugin.footprint(), _mutable(plugin, vid)) == before == (before[0], {"maxExtentSize": "4Mi"})


# -- capability-gated behaviour -----------------------------------------------------

def test_advertised_controller_capabilities_are_served(plugin: Plugin) -> None:
    RPC = pb.ControllerServiceCapability.RPC
    caps = {c.rpc.type for c in plugin.controller.ControllerGetCapabilities(
        pb.ControllerGetCapabilitiesRequest()).capabilities}
    assert {RPC.CREATE_DELETE_VOLUME, RPC.PUBLISH_UNPUBLISH_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY,
            RPC.EXPAND_VOLUME, RPC.GET_VOLUME, RPC.VOLUME_CONDITION, RPC.MODIFY_VOLUME} <= caps
    if RPC.CREATE_DELETE_SNAPSHOT not in caps:
        expect(plugin, Code.UNIMPLEMENTED, plugin.controller.CreateSnapshot,
               pb.CreateSnapshotRequest(name="s", source_volume_id="v"))


def test_node_capabilities_and_info(plugin: Plugin) -> None:
    caps = {c.rpc.type for c in plugin.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities}
    NRPC = pb.NodeServiceCapability.RPC
    assert {NRPC.STAGE_UNSTAGE_VOLUME, NRPC.GET_VOLUME_STATS, NRPC.EXPAND_VOLUME} <= caps
    info = plugin.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.accessible_topology.segments["topology.virtvol.csi.example.org/node"] == NODE_ID


def test_operations_on_one_volume_do_not_interleave(plugin: Plugin) -> None:
    """A second operation on a busy volume is ABORTED, not queued (spec: 'operation pending')."""
    import threading

    vid = new_volume(plugin)
    from csi_virtvol.services import locks  # the guard used by every service
    assert locks.KeyedLocks  # the behaviour itself is checked through gRPC below
    results: list[grpc.StatusCode] = []
    barrier = threading.Barrier(8)

    def expand(i: int) -> None:
        barrier.wait()
        try:
            plugin.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
                volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=(16 + i) * MiB)))
            results.append(Code.OK)
        except grpc.RpcError as e:
            results.append(e.code())

    threads = [threading.Thread(target=expand, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) <= {Code.OK, Code.ABORTED} and Code.OK in results


# -- GroupController (VolumeGroupSnapshot) ---------------------------------------------

def _group_req(name: str, sources: list[str], **params: str) -> pb.CreateVolumeGroupSnapshotRequest:
    return pb.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=sources, parameters=params)


def _ready_group(p: Plugin, req: pb.CreateVolumeGroupSnapshotRequest) -> pb.VolumeGroupSnapshot:
    import time

    deadline = time.monotonic() + 60
    while True:
        g = p.groups.CreateVolumeGroupSnapshot(req).group_snapshot
        if g.ready_to_use or time.monotonic() > deadline:
            return g
        time.sleep(0.3)


def test_group_controller_is_advertised_and_served(plugin: Plugin) -> None:
    caps = plugin.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    assert pb.PluginCapability.Service.GROUP_CONTROLLER_SERVICE in {
        c.service.type for c in caps if c.HasField("service")}
    gcaps = plugin.groups.GroupControllerGetCapabilities(pb.GroupControllerGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in gcaps] == [pb.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]


def test_create_volume_group_snapshot_rejects(plugin: Plugin) -> None:
    a, b = new_volume(plugin), new_volume(plugin)
    c = plugin.groups.CreateVolumeGroupSnapshot
    expect(plugin, Code.INVALID_ARGUMENT, c, _group_req("", [a, b]))
    expect(plugin, Code.INVALID_ARGUMENT, c, _group_req(unique("g"), []))
    expect(plugin, Code.INVALID_ARGUMENT, c, _group_req(unique("g"), [a, ""]))
    expect(plugin, Code.INVALID_ARGUMENT, c, _group_req(unique("g"), [a, a]))
    expect(plugin, Code.INVALID_ARGUMENT, c, _group_req(unique("g"), [a, b], colour="blue"))
    expect(plugin, Code.INVALID_ARGUMENT, c, _group_req(unique("g"), [a, b], arrays="no-such-array"))
    # the second member is missing: the first one's snapshot must not be left behind
    expect(plugin, Code.NOT_FOUND, c, _group_req(unique("g"), [a, "vv-does-not-exist"]))


def test_create_volume_group_snapshot_is_idempotent_by_name(plugin: Plugin) -> None:
    a, b, other = new_volume(plugin), new_volume(plugin), new_volume(plugin)
    name = unique("g")
    first = _ready_group(plugin, _group_req(name, [a, b]))
    assert first.ready_to_use and first.group_snapshot_id
    assert sorted(s.source_volume_id for s in first.snapshots) == sorted([a, b])
    assert all(s.group_snapshot_id == first.group_snapshot_id and s.ready_to_use for s in first.snapshots)
    again = plugin.groups.CreateVolumeGroupSnapshot(_group_req(name, [b, a])).group_snapshot
    assert again.group_snapshot_id == first.group_snapshot_id
    assert sorted(s.snapshot_id for s in again.snapshots) == sorted(s.snapshot_id for s in first.snapshots)
    expect(plugin, Code.ALREADY_EXISTS, plugin.groups.CreateVolumeGroupSnapshot, _group_req(name, [a, other]))
    expect(plugin, Code.ALREADY_EXISTS, plugin.groups.CreateVolumeGroupSnapshot, _group_req(name, [a]))
    # each member is an ordinary snapshot too, that names its group and goes only with it
    for s in first.snapshots:
        got = plugin.controller.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=s.snapshot_id)).snapshot
        assert got.source_volume_id == s.source_volume_id and got.ready_to_use
        assert got.group_snapshot_id == first.group_snapshot_id
        listed = plugin.controller.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=s.source_volume_id))
        assert [e.snapshot.group_snapshot_id for e in listed.entries] == [first.group_snapshot_id]
        expect(plugin, Code.FAILED_PRECONDITION, plugin.controller.DeleteSnapshot,
               pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id))


def test_get_volume_group_snapshot(plugin: Plugin) -> None:
    a, b = new_volume(plugin), new_volume(plugin)
    g = _ready_group(plugin, _group_req(unique("g"), [a, b]))
    ids = [s.snapshot_id for s in g.snapshots]
    get = plugin.groups.GetVolumeGroupSnapshot
    R = pb.GetVolumeGroupSnapshotRequest
    expect(plugin, Code.INVALID_ARGUMENT, get, R(snapshot_ids=ids))
    expect(plugin, Code.INVALID_ARGUMENT, get, R(group_snapshot_id=g.group_snapshot_id))
    expect(plugin, Code.INVALID_ARGUMENT, get, R(group_snapshot_id="vg-does-not-exist"))  # snapshot_ids is REQUIRED
    expect(plugin, Code.NOT_FOUND, get, R(group_snapshot_id="vg-does-not-exist", snapshot_ids=ids))
    expect(plugin, Code.INVALID_ARGUMENT, get, R(group_snapshot_id=g.group_snapshot_id, snapshot_ids=ids[:1]))
    expect(plugin, Code.INVALID_ARGUMENT, get, R(group_snapshot_id=g.group_snapshot_id,
                                                 snapshot_ids=ids[:1] + ["vs-foreign"]))
    got = get(R(group_snapshot_id=g.group_snapshot_id, snapshot_ids=ids[::-1])).group_snapshot
    assert got == g


def test_delete_volume_group_snapshot(plugin: Plugin) -> None:
    a, b = new_volume(plugin), new_volume(plugin)
    before = plugin.footprint()
    g = _ready_group(plugin, _group_req(unique("g"), [a, b]))
    ids = [s.snapshot_id for s in g.snapshots]
    d = plugin.groups.DeleteVolumeGroupSnapshot
    R = pb.DeleteVolumeGroupSnapshotRequest
    expect(plugin, Code.INVALID_ARGUMENT, d, R(snapshot_ids=ids))
    expect(plugin, Code.INVALID_ARGUMENT, d, R(group_snapshot_id=g.group_snapshot_id))
    expect(plugin, Code.INVALID_ARGUMENT, d, R(group_snapshot_id="vg-never-was"))  # snapshot_ids is REQUIRED
    expect(plugin, Code.INVALID_ARGUMENT, d, R(group_snapshot_id=g.group_snapshot_id, snapshot_ids=ids[:1]))
    d(R(group_snapshot_id=g.group_snapshot_id, snapshot_ids=ids))
    assert plugin.footprint() == before, "deleting the group left a member behind"
    for sid in ids:
        expect(plugin, Code.NOT_FOUND, plugin.controller.GetSnapshot, pb.GetSnapshotRequest(snapshot_id=sid))
    d(R(group_snapshot_id=g.group_snapshot_id, snapshot_ids=ids))  # deleting what is gone succeeds
    d(R(group_snapshot_id="vg-never-was", snapshot_ids=["vs-x"]))
