"""CSI SnapshotMetadata over gRPC: allocated and changed ranges of snapshots of
two-extent volumes, on the reflink XFS pool (FIEMAP path) and the ext4 pool
(host-copied snapshots: content comparison), paging, and the error codes."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
import pytest

from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from csi_virtvol.model.volume import Extent
from csi_virtvol.store import base as S
from csi_virtvol.store.sqlite import SqliteStore
from harness.plugin import Plugin, mount_cap, unique

KiB = 1024
MiB = 1 << 20
Code = grpc.StatusCode
SIZE = 32 * MiB  # two 16 MiB extents

pytestmark = pytest.mark.root


def extents_of(p: Plugin, vid: str) -> tuple[Extent, ...]:
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.VOLUMES, vid)
        assert rec is not None
        return rec.value.extents


def write(p: Plugin, vid: str, offset: int, data: bytes) -> None:
    """Write at a volume offset through the LUN files (the volume is not published)."""
    pos = 0
    for e in extents_of(p, vid):
        lo, hi = max(offset, pos), min(offset + len(data), pos + e.length)
        if lo < hi:
            fd = os.open(p.pools[e.array] / "luns" / f"{e.lun}.img", os.O_WRONLY)
            try:
                os.pwrite(fd, data[lo - offset:hi - offset], e.offset + lo - pos)
                os.fsync(fd)
            finally:
                os.close(fd)
        pos += e.length


def pattern(tag: str, n: int) -> bytes:
    return (tag.encode() * (n // len(tag) + 1))[:n]


def create_volume(p: Plugin, size: int, **params: str) -> str:
    return p.controller.CreateVolume(pb.CreateVolumeRequest(
        name=unique(), capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_cap()], parameters=params)).volume.volume_id


def snapshot(p: Plugin, vid: str, timeout: float = 120) -> str:
    name = unique("snap")
    deadline = time.monotonic() + timeout
    while True:
        snap = p.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=vid)).snapshot
        if snap.ready_to_use:
            return snap.snapshot_id
        assert time.monotonic() < deadline, "snapshot did not become ready"
        time.sleep(0.3)


def stub(p: Plugin) -> rpc.SnapshotMetadataStub:
    return rpc.SnapshotMetadataStub(p.channel)


@dataclass
class Streamed:
    capacity: set[int]
    types: set[int]
    pages: list[list[tuple[int, int]]]

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [r for page in self.pages for r in page]


def collect(responses: Iterable[pb.GetMetadataAllocatedResponse | pb.GetMetadataDeltaResponse]) -> Streamed:
    out = Streamed(capacity=set(), types=set(), pages=[])
    for r in responses:
        out.capacity.add(r.volume_capacity_bytes)
        out.types.add(r.block_metadata_type)
        out.pages.append([(b.byte_offset, b.size_bytes) for b in r.block_metadata])
    return out


def delta(p: Plugin, base: str, target: str, *, start: int = 0, max_results: int = 0) -> Streamed:
    return collect(stub(p).GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=base, target_snapshot_id=target, starting_offset=start, max_results=max_results)))


def allocated(p: Plugin, sid: str, *, start: int = 0, max_results: int = 0) -> Streamed:
    return collect(stub(p).GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
        snapshot_id=sid, starting_offset=start, max_results=max_results)))


def code_of(call: object) -> Code:
    with pytest.raises(grpc.RpcError) as info:
        collect(call)  # type: ignore[arg-type]
    return info.value.code()  # type: ignore[no-any-return]


def covers(ranges: list[tuple[int, int]], offset: int, length: int) -> bool:
    return any(o <= offset and offset + length <= o + n for o, n in ranges)


def overlaps(ranges: list[tuple[int, int]], offset: int, length: int) -> bool:
    return any(o < offset + length and offset < o + n for o, n in ranges)


BEFORE = [(0, 4 * KiB), (MiB, 64 * KiB), (20 * MiB, 8 * KiB)]
# after A: a new block in a hole, an overwrite inside data, 8 KiB across the extent
# boundary (16 MiB), a block at the end, and a block rewritten with the bytes it held
CHANGES = [(256 * KiB, 4 * KiB), (MiB + 8 * KiB, 4 * KiB), (16 * MiB - 4 * KiB, 8 * KiB),
           (SIZE - 4 * KiB, 4 * KiB)]
EXPECTED_DELTA = CHANGES  # already merged and in order


def bytes_read(caplog: pytest.LogCaptureFixture, how: str) -> list[int]:
    """What the delta read, per piece, by the service's debug log."""
    out = []
    for rec in caplog.records:
        if rec.name == "csi_virtvol.services.metadata" and rec.msg.startswith("delta ") and rec.args:
            args = tuple(rec.args)
            if args[-1] == how:
                out.append(int(args[-3]))
    return out


@pytest.mark.parametrize("array", ["fast", "slow"])  # reflink XFS (internal copy) | ext4 (host copy)
def test_delta_and_allocated_of_two_snapshots(plugin: Plugin, array: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="csi_virtvol.services.metadata")
    vid = create_volume(plugin, SIZE, arrays=array, layout="concat", maxExtentSize="16Mi")
    assert [(e.array, e.length) for e in extents_of(plugin, vid)] == [(array, 16 * MiB)] * 2
    for off, n in BEFORE:
        write(plugin, vid, off, pattern(f"before{off}", n))
    a = snapshot(plugin, vid)
    for off, n in CHANGES:
        write(plugin, vid, off, pattern(f"after{off}", n))
    write(plugin, vid, 0, pattern("before0", 4 * KiB))  # same bytes again: not a change
    b = snapshot(plugin, vid)

    got = delta(plugin, a, b)
    assert got.ranges == EXPECTED_DELTA
    assert got.capacity == {SIZE} and got.types == {pb.VARIABLE_LENGTH} and len(got.pages) == 1
    # only what FIEMAP cannot prove equal was read: on XFS the rewritten (CoW) grains, on ext4
    # (host-copied snapshots, nothing shared) the data of either side; never the holes
    read = bytes_read(caplog, "fiemap")
    assert read and 0 < sum(read) <= 4 * MiB, read
    caplog.clear()
    # nothing changed between a snapshot and itself
    assert delta(plugin, b, b).ranges == []

    alloc = allocated(plugin, b)
    assert alloc.capacity == {SIZE} and alloc.types == {pb.VARIABLE_LENGTH}
    for off, n in BEFORE + CHANGES:
        assert covers(alloc.ranges, off, n), (off, n, alloc.ranges)
    assert not overlaps(alloc.ranges, 4 * MiB, 11 * MiB)      # never written, in the first extent
    assert not overlaps(alloc.ranges, 21 * MiB, 10 * MiB)     # never written, in the second
    assert all(x[0] + x[1] < y[0] for x, y in zip(alloc.ranges, alloc.ranges[1:]))  # ordered, merged
    # A knows nothing of what was written after it
    assert not overlaps(allocated(plugin, a).ranges, 256 * KiB, 4 * KiB)

    # paging: one range per message, the same ranges
    paged = delta(plugin, a, b, max_results=1)
    assert [len(pg) for pg in paged.pages] == [1] * len(EXPECTED_DELTA) and paged.ranges == EXPECTED_DELTA
    paged_alloc = allocated(plugin, b, max_results=2)
    assert all(1 <= len(pg) <= 2 for pg in paged_alloc.pages) and paged_alloc.ranges == alloc.ranges

    # starting_offset: continue from inside a range (clipped to it) and after the last one
    inside = MiB + 8 * KiB + 1000
    assert delta(plugin, a, b, start=inside).ranges == [(inside, 4 * KiB - 1000)] + EXPECTED_DELTA[2:]
    assert delta(plugin, a, b, start=16 * MiB).ranges == [(16 * MiB, 4 * KiB), EXPECTED_DELTA[3]]
    assert allocated(plugin, b, start=20 * MiB).ranges[0][0] >= 20 * MiB
    at_end = delta(plugin, a, b, start=SIZE)
    assert at_end.ranges == [] and at_end.capacity == {SIZE}

    # errors
    assert code_of(stub(plugin).GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=a, target_snapshot_id=b, starting_offset=SIZE + 1))) is Code.OUT_OF_RANGE
    assert code_of(stub(plugin).GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
        snapshot_id=b, starting_offset=-1))) is Code.OUT_OF_RANGE
    assert code_of(stub(plugin).GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
        snapshot_id=b, max_results=-1))) is Code.INVALID_ARGUMENT
    assert code_of(stub(plugin).GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=b, target_snapshot_id=a))) is Code.INVALID_ARGUMENT  # base cut after target


def test_errors_for_missing_unknown_and_foreign_snapshots(plugin: Plugin) -> None:
    v1 = create_volume(plugin, 4 * MiB, arrays="fast")
    v2 = create_volume(plugin, 4 * MiB, arrays="fast")
    s1, s2 = snapshot(plugin, v1), snapshot(plugin, v2)
    m = stub(plugin)
    assert code_of(m.GetMetadataAllocated(pb.GetMetadataAllocatedRequest())) is Code.INVALID_ARGUMENT
    assert code_of(m.GetMetadataDelta(pb.GetMetadataDeltaRequest(base_snapshot_id=s1))) is Code.INVALID_ARGUMENT
    assert code_of(m.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
        snapshot_id="vs-does-not-exist"))) is Code.NOT_FOUND
    assert code_of(m.GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=s1, target_snapshot_id="vs-nope"))) is Code.NOT_FOUND
    # a volume id is not a snapshot id
    assert code_of(m.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=v1))) is Code.NOT_FOUND
    # snapshots of two different volumes
    assert code_of(m.GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=s1, target_snapshot_id=s2))) is Code.INVALID_ARGUMENT
    # a blank snapshot: one message with the capacity and no ranges
    empty = allocated(plugin, s1)
    assert empty.pages == [[]] and empty.capacity == {4 * MiB}
    caps = plugin.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    assert pb.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE in [c.service.type for c in caps]


def test_snapshot_still_copying_is_a_failed_precondition(plugin: Plugin) -> None:
    """A host copy held to 1 MiB/s outlasts CreateSnapshot's wait: not ready yet."""
    vid = create_volume(plugin, 32 * MiB, arrays="slow")
    plugin.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=vid, mutable_parameters={"copyBandwidth": "1Mi"}))
    write(plugin, vid, 0, os.urandom(24 * MiB))
    snap = plugin.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("snap"), source_volume_id=vid)).snapshot
    assert not snap.ready_to_use
    assert code_of(stub(plugin).GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
        snapshot_id=snap.snapshot_id))) is Code.FAILED_PRECONDITION
    plugin.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))


def test_delta_across_a_volume_expansion(plugin: Plugin) -> None:
    """Ranges past the base's size are compared with zeros."""
    vid = create_volume(plugin, 16 * MiB, arrays="fast", layout="concat", maxExtentSize="16Mi")
    write(plugin, vid, 0, pattern("x", 4 * KiB))
    a = snapshot(plugin, vid)
    plugin.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=32 * MiB)))
    write(plugin, vid, 20 * MiB, pattern("grown", 8 * KiB))
    write(plugin, vid, 24 * MiB, bytes(4 * KiB))  # zeros in the new part: not a change
    b = snapshot(plugin, vid)
    got = delta(plugin, a, b)
    assert got.capacity == {32 * MiB} and got.ranges == [(20 * MiB, 8 * KiB)]
