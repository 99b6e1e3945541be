"""csi.v1.GroupController: parse, call services/groups.py, build the response."""
from __future__ import annotations

import grpc

from csi_virtvol.csi import convert as C
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from csi_virtvol.services.groups import GroupService, GroupView
from csi_virtvol.services.snapshots import SnapshotService

RPC = pb.GroupControllerServiceCapability.RPC


class GroupControllerServicer(rpc.GroupControllerServicer):  # type: ignore[misc]
    def __init__(self, *, groups: GroupService, snapshots: SnapshotService) -> None:
        self._groups = groups
        self._snapshots = snapshots

    def GroupControllerGetCapabilities(self, request: pb.GroupControllerGetCapabilitiesRequest,
                                       context: grpc.ServicerContext) -> pb.GroupControllerGetCapabilitiesResponse:
        return pb.GroupControllerGetCapabilitiesResponse(capabilities=[pb.GroupControllerServiceCapability(
            rpc=RPC(type=RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT))])

    def _group(self, view: GroupView) -> pb.VolumeGroupSnapshot:
        out = pb.VolumeGroupSnapshot(group_snapshot_id=view.group.id, ready_to_use=view.ready)
        out.creation_time.FromNanoseconds(int(view.group.created_at * 1e9))
        for snap in view.snapshots:
            s = out.snapshots.add(size_bytes=snap.size, snapshot_id=snap.id, source_volume_id=snap.source_volume,
                                  ready_to_use=self._snapshots.progress(snap).ready,
                                  group_snapshot_id=view.group.id)
            s.creation_time.FromNanoseconds(int(view.group.created_at * 1e9))  # one instant for all
        return out

    def CreateVolumeGroupSnapshot(self, request: pb.CreateVolumeGroupSnapshotRequest,
                                  context: grpc.ServicerContext) -> pb.CreateVolumeGroupSnapshotResponse:
        view = self._groups.create(name=C.require(request.name, "name"),
                                   source_volume_ids=list(request.source_volume_ids),
                                   parameters=dict(request.parameters))
        return pb.CreateVolumeGroupSnapshotResponse(group_snapshot=self._group(view))

    def GetVolumeGroupSnapshot(self, request: pb.GetVolumeGroupSnapshotRequest,
                               context: grpc.ServicerContext) -> pb.GetVolumeGroupSnapshotResponse:
        view = self._groups.get(C.require(request.group_snapshot_id, "group_snapshot_id"),
                                snapshot_ids=list(request.snapshot_ids))
        return pb.GetVolumeGroupSnapshotResponse(group_snapshot=self._group(view))

    def DeleteVolumeGroupSnapshot(self, request: pb.DeleteVolumeGroupSnapshotRequest,
                                  context: grpc.ServicerContext) -> pb.DeleteVolumeGroupSnapshotResponse:
        self._groups.delete(C.require(request.group_snapshot_id, "group_snapshot_id"),
                            snapshot_ids=list(request.snapshot_ids))
        return pb.DeleteVolumeGroupSnapshotResponse()
