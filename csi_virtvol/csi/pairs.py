"""virtvol.v1.Pairs: the admin API for the pair table (CSI has no call for it)."""
from __future__ import annotations

import grpc

from csi_virtvol.csi._gen import virtvol_pb2 as vpb
from csi_virtvol.csi._gen import virtvol_pb2_grpc as vrpc
from csi_virtvol.model.pair import Pair
from csi_virtvol.services.snapshots import SnapshotService


def pair_status(pair: Pair) -> vpb.PairStatus:
    t = pair.targets[0]
    return vpb.PairStatus(
        target=t.volume, source=pair.source, state=pair.state.value, fence=pair.fence.value,
        cut_at=pair.cut_at, reason=t.reason,
        extents=[vpb.ExtentStatus(index=e.index, method=e.method.value, state=e.state.value,
                                  bytes_total=e.bytes_total, bytes_done=e.bytes_done,
                                  bytes_written=e.bytes_written, source_lun=e.source_lun)
                 for e in t.extents])


class PairsServicer(vrpc.PairsServicer):  # type: ignore[misc]
    def __init__(self, *, snapshots: SnapshotService) -> None:
        self._snapshots = snapshots

    def ListPairs(self, request: vpb.ListPairsRequest, context: grpc.ServicerContext) -> vpb.ListPairsResponse:
        return vpb.ListPairsResponse(pairs=[pair_status(p) for p in self._snapshots.pairs(source=request.source)])

    def ResyncPair(self, request: vpb.ResyncPairRequest, context: grpc.ServicerContext) -> vpb.ResyncPairResponse:
        return vpb.ResyncPairResponse(pair=pair_status(self._snapshots.resync(request.target)))
