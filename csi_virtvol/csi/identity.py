"""csi.v1.Identity."""
from __future__ import annotations

from collections.abc import Callable

import grpc

from csi_virtvol import DRIVER_NAME, VERSION
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc

Cap = pb.PluginCapability


class IdentityServicer(rpc.IdentityServicer):  # type: ignore[misc]
    def __init__(self, *, controller: bool, ready: Callable[[], bool], snapshot_metadata: bool = False,
                 group_controller: bool = False) -> None:
        self._controller = controller
        self._ready = ready
        self._snapshot_metadata = snapshot_metadata
        self._group_controller = group_controller

    def GetPluginInfo(self, request: pb.GetPluginInfoRequest, context: grpc.ServicerContext) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=VERSION,
                                        manifest={"source": "csi-virtvol"})

    def GetPluginCapabilities(self, request: pb.GetPluginCapabilitiesRequest,
                              context: grpc.ServicerContext) -> pb.GetPluginCapabilitiesResponse:
        caps = [Cap(volume_expansion=Cap.VolumeExpansion(type=Cap.VolumeExpansion.ONLINE))]
        if self._controller:
            caps += [Cap(service=Cap.Service(type=Cap.Service.CONTROLLER_SERVICE)),
                     Cap(service=Cap.Service(type=Cap.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS))]
        if self._snapshot_metadata:
            caps.append(Cap(service=Cap.Service(type=Cap.Service.SNAPSHOT_METADATA_SERVICE)))
        if self._group_controller:
            caps.append(Cap(service=Cap.Service(type=Cap.Service.GROUP_CONTROLLER_SERVICE)))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        resp = pb.ProbeResponse()
        resp.ready.value = self._ready()
        return resp
