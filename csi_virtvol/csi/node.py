"""csi.v1.Node: parse, call the node service, build the response."""
from __future__ import annotations

import grpc

from csi_virtvol.csi import convert as C
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from csi_virtvol.services.node import NodeService

NRPC = pb.NodeServiceCapability.RPC
CAPABILITIES = (NRPC.STAGE_UNSTAGE_VOLUME, NRPC.GET_VOLUME_STATS, NRPC.EXPAND_VOLUME,
                NRPC.VOLUME_CONDITION, NRPC.SINGLE_NODE_MULTI_WRITER, NRPC.VOLUME_MOUNT_GROUP)


class NodeServicer(rpc.NodeServicer):  # type: ignore[misc]
    def __init__(self, *, service: NodeService) -> None:
        self._svc = service

    def NodeGetInfo(self, request: pb.NodeGetInfoRequest, context: grpc.ServicerContext) -> pb.NodeGetInfoResponse:
        info = self._svc.info()
        return pb.NodeGetInfoResponse(node_id=info.id, max_volumes_per_node=info.max_volumes,
                                      accessible_topology=pb.Topology(segments=dict(info.topology)))

    def NodeGetCapabilities(self, request: pb.NodeGetCapabilitiesRequest,
                            context: grpc.ServicerContext) -> pb.NodeGetCapabilitiesResponse:
        return pb.NodeGetCapabilitiesResponse(capabilities=[
            pb.NodeServiceCapability(rpc=pb.NodeServiceCapability.RPC(type=c)) for c in CAPABILITIES])

    def NodeStageVolume(self, request: pb.NodeStageVolumeRequest, context: grpc.ServicerContext) -> pb.NodeStageVolumeResponse:
        C.require(request.volume_id, "volume_id")
        C.require(request.staging_target_path, "staging_target_path")
        if not request.HasField("volume_capability"):
            C.require("", "volume_capability")
        self._svc.stage(request.volume_id, request.staging_target_path,
                        capability=C.capability(request.volume_capability),
                        publish_context=dict(request.publish_context))
        return pb.NodeStageVolumeResponse()

    def NodeUnstageVolume(self, request: pb.NodeUnstageVolumeRequest,
                          context: grpc.ServicerContext) -> pb.NodeUnstageVolumeResponse:
        self._svc.unstage(C.require(request.volume_id, "volume_id"),
                          C.require(request.staging_target_path, "staging_target_path"))
        return pb.NodeUnstageVolumeResponse()

    def NodePublishVolume(self, request: pb.NodePublishVolumeRequest,
                          context: grpc.ServicerContext) -> pb.NodePublishVolumeResponse:
        C.require(request.volume_id, "volume_id")
        C.require(request.target_path, "target_path")
        if not request.HasField("volume_capability"):
            C.require("", "volume_capability")
        C.require(request.staging_target_path, "staging_target_path")
        self._svc.publish(request.volume_id, request.staging_target_path, request.target_path,
                          capability=C.capability(request.volume_capability), readonly=request.readonly)
        return pb.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request: pb.NodeUnpublishVolumeRequest,
                            context: grpc.ServicerContext) -> pb.NodeUnpublishVolumeResponse:
        self._svc.unpublish(C.require(request.volume_id, "volume_id"), C.require(request.target_path, "target_path"))
        return pb.NodeUnpublishVolumeResponse()

    def NodeGetVolumeStats(self, request: pb.NodeGetVolumeStatsRequest,
                           context: grpc.ServicerContext) -> pb.NodeGetVolumeStatsResponse:
        st = self._svc.stats(C.require(request.volume_id, "volume_id"), C.require(request.volume_path, "volume_path"))
        usage = [pb.VolumeUsage(unit=pb.VolumeUsage.BYTES, total=st.bytes_total,
                                used=st.bytes_used, available=st.bytes_available)]
        if st.inodes_total:
            usage.append(pb.VolumeUsage(unit=pb.VolumeUsage.INODES, total=st.inodes_total,
                                        used=st.inodes_used, available=st.inodes_available))
        return pb.NodeGetVolumeStatsResponse(usage=usage, volume_condition=pb.VolumeCondition(
            abnormal=st.abnormal, message=st.message))

    def NodeExpandVolume(self, request: pb.NodeExpandVolumeRequest,
                         context: grpc.ServicerContext) -> pb.NodeExpandVolumeResponse:
        C.require(request.volume_id, "volume_id")
        C.require(request.volume_path, "volume_path")
        if request.HasField("volume_capability"):
            C.capability(request.volume_capability)
        size = self._svc.expand(request.volume_id, request.volume_path, request.staging_target_path,
                                required=request.capacity_range.required_bytes,
                                limit=request.capacity_range.limit_bytes)
        return pb.NodeExpandVolumeResponse(capacity_bytes=size)
