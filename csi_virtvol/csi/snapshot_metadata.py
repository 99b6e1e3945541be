"""csi.v1.SnapshotMetadata (CSI 1.10+, alpha): parse, call the service, stream the pages.

Ranges are VARIABLE_LENGTH.  Errors are domain errors, translated by the
interceptor: INVALID_ARGUMENT (missing id, negative max_results, snapshots of
different volumes), NOT_FOUND (no such snapshot), FAILED_PRECONDITION
(snapshot not ready), OUT_OF_RANGE (starting_offset negative or beyond the size).
"""
from __future__ import annotations

from collections.abc import Iterator

import grpc

from csi_virtvol.csi import convert as C
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from csi_virtvol.services.metadata import Page, SnapshotMetadataService


def _blocks(page: Page) -> list[pb.BlockMetadata]:
    return [pb.BlockMetadata(byte_offset=off, size_bytes=n) for off, n in page.blocks]


class SnapshotMetadataServicer(rpc.SnapshotMetadataServicer):  # type: ignore[misc]
    def __init__(self, *, service: SnapshotMetadataService) -> None:
        self._service = service

    def GetMetadataAllocated(self, request: pb.GetMetadataAllocatedRequest,
                             context: grpc.ServicerContext) -> Iterator[pb.GetMetadataAllocatedResponse]:
        pages = self._service.allocated(snapshot_id=C.require(request.snapshot_id, "snapshot_id"),
                                        starting_offset=request.starting_offset, max_results=request.max_results)
        for page in pages:
            yield pb.GetMetadataAllocatedResponse(block_metadata_type=pb.VARIABLE_LENGTH,
                                                  volume_capacity_bytes=page.volume_capacity_bytes,
                                                  block_metadata=_blocks(page))

    def GetMetadataDelta(self, request: pb.GetMetadataDeltaRequest,
                         context: grpc.ServicerContext) -> Iterator[pb.GetMetadataDeltaResponse]:
        pages = self._service.delta(base_snapshot_id=C.require(request.base_snapshot_id, "base_snapshot_id"),
                                    target_snapshot_id=C.require(request.target_snapshot_id, "target_snapshot_id"),
                                    starting_offset=request.starting_offset, max_results=request.max_results)
        for page in pages:
            yield pb.GetMetadataDeltaResponse(block_metadata_type=pb.VARIABLE_LENGTH,
                                              volume_capacity_bytes=page.volume_capacity_bytes,
                                              block_metadata=_blocks(page))
