"""csi.v1.Controller: parse, call the services, build the response."""
from __future__ import annotations

import grpc

from csi_virtvol.csi import convert as C
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from csi_virtvol.model.capability import unsupported_reason
from csi_virtvol.model.volume import VirtualVolume
from csi_virtvol.services import params as P
from csi_virtvol.services.groups import GroupService
from csi_virtvol.services.publish import PublishService
from csi_virtvol.services.snapshots import SnapshotService
from csi_virtvol.services.volumes import CreateVolume, VolumeService

RPC = pb.ControllerServiceCapability.RPC
CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME, RPC.PUBLISH_UNPUBLISH_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY,
    RPC.PUBLISH_READONLY, RPC.EXPAND_VOLUME, RPC.LIST_VOLUMES_PUBLISHED_NODES, RPC.VOLUME_CONDITION,
    RPC.GET_VOLUME, RPC.SINGLE_NODE_MULTI_WRITER, RPC.MODIFY_VOLUME,
    RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.CLONE_VOLUME, RPC.GET_SNAPSHOT,
)


class ControllerServicer(rpc.ControllerServicer):  # type: ignore[misc]
    def __init__(self, *, volumes: VolumeService, publish: PublishService, snapshots: SnapshotService,
                 groups: GroupService) -> None:
        self._volumes = volumes
        self._publish = publish
        self._snapshots = snapshots
        self._groups = groups

    def ControllerGetCapabilities(self, request: pb.ControllerGetCapabilitiesRequest,
                                  context: grpc.ServicerContext) -> pb.ControllerGetCapabilitiesResponse:
        return pb.ControllerGetCapabilitiesResponse(capabilities=[
            pb.ControllerServiceCapability(rpc=pb.ControllerServiceCapability.RPC(type=c)) for c in CAPABILITIES])

    def CreateVolume(self, request: pb.CreateVolumeRequest, context: grpc.ServicerContext) -> pb.CreateVolumeResponse:
        C.require(request.name, "name")
        requisite, preferred = C.topology(request.accessibility_requirements)
        vol = self._volumes.create(CreateVolume(
            name=request.name,
            required_bytes=request.capacity_range.required_bytes,
            limit_bytes=request.capacity_range.limit_bytes,
            parameters=dict(request.parameters),
            mutable_parameters=dict(request.mutable_parameters),
            capabilities=C.capabilities(request.volume_capabilities),
            requisite=requisite, preferred=preferred,
            content_source=C.content_source(request.volume_content_source),
        ))
        return pb.CreateVolumeResponse(volume=C.volume(vol))

    def DeleteVolume(self, request: pb.DeleteVolumeRequest, context: grpc.ServicerContext) -> pb.DeleteVolumeResponse:
        self._volumes.delete(C.require(request.volume_id, "volume_id"))
        return pb.DeleteVolumeResponse()

    def ControllerPublishVolume(self, request: pb.ControllerPublishVolumeRequest,
                                context: grpc.ServicerContext) -> pb.ControllerPublishVolumeResponse:
        C.require(request.volume_id, "volume_id")
        C.require(request.node_id, "node_id")
        if not request.HasField("volume_capability"):
            C.require("", "volume_capability")
        ctx = self._publish.publish(request.volume_id, request.node_id,
                                    capability=C.capability(request.volume_capability),
                                    readonly=request.readonly)
        return pb.ControllerPublishVolumeResponse(publish_context=ctx)

    def ControllerUnpublishVolume(self, request: pb.ControllerUnpublishVolumeRequest,
                                  context: grpc.ServicerContext) -> pb.ControllerUnpublishVolumeResponse:
        self._publish.unpublish(C.require(request.volume_id, "volume_id"), request.node_id)
        return pb.ControllerUnpublishVolumeResponse()

    def ValidateVolumeCapabilities(self, request: pb.ValidateVolumeCapabilitiesRequest,
                                   context: grpc.ServicerContext) -> pb.ValidateVolumeCapabilitiesResponse:
        vol = self._volumes.get(C.require(request.volume_id, "volume_id"))
        caps = C.capabilities(request.volume_capabilities)
        reasons = [r for r in (unsupported_reason(c) for c in caps) if r]
        P.check_keys(request.parameters, P.CREATE_KEYS, what="parameter")
        if P.user_parameters(request.parameters) and \
                P.user_parameters(request.parameters) != P.user_parameters(vol.parameters):
            reasons.append("parameters differ from the volume's")
        if P.user_parameters(request.mutable_parameters) and \
                dict(request.mutable_parameters) != dict(vol.mutable_parameters):
            reasons.append("mutable_parameters differ from the volume's")
        if reasons:
            return pb.ValidateVolumeCapabilitiesResponse(message="; ".join(reasons))
        return pb.ValidateVolumeCapabilitiesResponse(confirmed=pb.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context, volume_capabilities=request.volume_capabilities,
            parameters=request.parameters, mutable_parameters=request.mutable_parameters))

    def ListVolumes(self, request: pb.ListVolumesRequest, context: grpc.ServicerContext) -> pb.ListVolumesResponse:
        page = self._volumes.page(after=request.starting_token, limit=request.max_entries)
        return pb.ListVolumesResponse(next_token=page.next_token, entries=[
            pb.ListVolumesResponse.Entry(volume=C.volume(v), status=self._list_status(v)) for v in page.volumes])

    def _list_status(self, vol: VirtualVolume) -> pb.ListVolumesResponse.VolumeStatus:
        cond = self._volumes.condition(vol)
        return pb.ListVolumesResponse.VolumeStatus(
            published_node_ids=[a.node for a in vol.attachments],
            volume_condition=pb.VolumeCondition(abnormal=cond.abnormal, message=cond.message))

    def ControllerGetVolume(self, request: pb.ControllerGetVolumeRequest,
                            context: grpc.ServicerContext) -> pb.ControllerGetVolumeResponse:
        vol = self._volumes.get(C.require(request.volume_id, "volume_id"))
        cond = self._volumes.condition(vol)
        return pb.ControllerGetVolumeResponse(volume=C.volume(vol), status=pb.ControllerGetVolumeResponse.VolumeStatus(
            published_node_ids=[a.node for a in vol.attachments],
            volume_condition=pb.VolumeCondition(abnormal=cond.abnormal, message=cond.message)))

    def GetCapacity(self, request: pb.GetCapacityRequest, context: grpc.ServicerContext) -> pb.GetCapacityResponse:
        caps = [C.capability(c, field="volume_capabilities") for c in request.volume_capabilities]
        if any(unsupported_reason(c) for c in caps):
            return pb.GetCapacityResponse(available_capacity=0)
        topo = dict(request.accessible_topology.segments) if request.HasField("accessible_topology") else None
        cap = self._volumes.capacity(parameters=dict(request.parameters), topology=topo)
        resp = pb.GetCapacityResponse(available_capacity=cap.available)
        resp.maximum_volume_size.value = cap.maximum_volume_size
        resp.minimum_volume_size.value = 1 << 20
        return resp

    def ControllerExpandVolume(self, request: pb.ControllerExpandVolumeRequest,
                               context: grpc.ServicerContext) -> pb.ControllerExpandVolumeResponse:
        C.require(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            C.require("", "capacity_range")
        if request.HasField("volume_capability"):
            C.capability(request.volume_capability)
        vol = self._volumes.expand(request.volume_id, required=request.capacity_range.required_bytes,
                                   limit=request.capacity_range.limit_bytes)
        return pb.ControllerExpandVolumeResponse(capacity_bytes=vol.size, node_expansion_required=True)

    def ControllerModifyVolume(self, request: pb.ControllerModifyVolumeRequest,
                               context: grpc.ServicerContext) -> pb.ControllerModifyVolumeResponse:
        self._volumes.modify(C.require(request.volume_id, "volume_id"), mutable=dict(request.mutable_parameters))
        return pb.ControllerModifyVolumeResponse()

    # -- snapshots ----------------------------------------------------------------
    def _snapshot(self, snap: VirtualVolume, groups: dict[str, str] | None = None) -> pb.Snapshot:
        prog = self._snapshots.progress(snap)
        group = (self._groups.groups_of() if groups is None else groups).get(snap.id, "")
        out = pb.Snapshot(size_bytes=snap.size, snapshot_id=snap.id, source_volume_id=snap.source_volume,
                          ready_to_use=prog.ready, group_snapshot_id=group)
        out.creation_time.FromNanoseconds(int(snap.created_at * 1e9))
        return out

    def CreateSnapshot(self, request: pb.CreateSnapshotRequest, context: grpc.ServicerContext) -> pb.CreateSnapshotResponse:
        snap, _ = self._snapshots.create_snapshot(name=C.require(request.name, "name"),
                                                  source_volume_id=C.require(request.source_volume_id, "source_volume_id"),
                                                  parameters=dict(request.parameters))
        return pb.CreateSnapshotResponse(snapshot=self._snapshot(snap))

    def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest, context: grpc.ServicerContext) -> pb.DeleteSnapshotResponse:
        self._groups.delete_snapshot(C.require(request.snapshot_id, "snapshot_id"))
        return pb.DeleteSnapshotResponse()

    def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> pb.ListSnapshotsResponse:
        page = self._snapshots.page(snapshot_id=request.snapshot_id, source_volume_id=request.source_volume_id,
                                    after=request.starting_token, limit=request.max_entries)
        groups = self._groups.groups_of()
        return pb.ListSnapshotsResponse(next_token=page.next_token, entries=[
            pb.ListSnapshotsResponse.Entry(snapshot=self._snapshot(s, groups)) for s in page.volumes])

    def GetSnapshot(self, request: pb.GetSnapshotRequest, context: grpc.ServicerContext) -> pb.GetSnapshotResponse:
        snap = self._snapshots.get(C.require(request.snapshot_id, "snapshot_id"))
        return pb.GetSnapshotResponse(snapshot=self._snapshot(snap))
