"""virtvol.v1.Pairs and virtvol.v1.Mapping: the admin API for the pair table and the
mapping table (CSI has no call for either)."""
from __future__ import annotations

from collections.abc import Mapping

import grpc

from csi_virtvol.csi._gen import virtvol_pb2 as vpb
from csi_virtvol.csi._gen import virtvol_pb2_grpc as vrpc
from csi_virtvol.model.pair import Pair
from csi_virtvol.services.snapshots import SnapshotService
from csi_virtvol.services.volumes import VolumeService


def pair_status(pair: Pair, targets: Mapping[int, str] | None = None) -> vpb.PairStatus:
    """`targets`: row index -> the "array:lun" the row's piece is written to."""
    t = pair.targets[0]
    targets = targets or {}
    return vpb.PairStatus(
        target=t.volume, source=pair.source, state=pair.state.value, fence=pair.fence.value,
        cut_at=pair.cut_at, reason=t.reason,
        extents=[vpb.ExtentStatus(index=e.index, method=e.method.value, state=e.state.value,
                                  bytes_total=e.bytes_total, bytes_done=e.bytes_done,
                                  bytes_written=e.bytes_written, source_lun=e.source_lun,
                                  target_lun=targets.get(e.index, ""))
                 for e in t.extents])


class PairsServicer(vrpc.PairsServicer):  # type: ignore[misc]
    def __init__(self, *, snapshots: SnapshotService) -> None:
        self._snapshots = snapshots

    def _status(self, pair: Pair) -> vpb.PairStatus:
        return pair_status(pair, self._snapshots.target_luns(pair))

    def ListPairs(self, request: vpb.ListPairsRequest, context: grpc.ServicerContext) -> vpb.ListPairsResponse:
        return vpb.ListPairsResponse(pairs=[self._status(p) for p in self._snapshots.pairs(source=request.source)])

    def ResyncPair(self, request: vpb.ResyncPairRequest, context: grpc.ServicerContext) -> vpb.ResyncPairResponse:
        return vpb.ResyncPairResponse(pair=self._status(self._snapshots.resync(request.target)))


class MappingServicer(vrpc.MappingServicer):  # type: ignore[misc]
    def __init__(self, *, volumes: VolumeService) -> None:
        self._volumes = volumes

    def GetMapping(self, request: vpb.GetMappingRequest, context: grpc.ServicerContext) -> vpb.GetMappingResponse:
        vol, rows = self._volumes.mapping(request.volume_id)
        return vpb.GetMappingResponse(
            volume_id=vol.id, kind=vol.kind.value, state=vol.state.value, size=vol.size,
            extents=[vpb.MappedExtent(index=i, array=r.extent.array, lun=r.extent.lun, offset=r.extent.offset,
                                      length=r.extent.length, lun_address=r.address,
                                      array_abilities=list(r.abilities))
                     for i, r in enumerate(rows)])
