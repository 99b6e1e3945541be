"""Snapshots, restores and clones over gRPC, on a reflink XFS pool and an ext4 pool."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import grpc
import pytest

from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.store import base as S
from csi_virtvol.store.sqlite import SqliteStore
from harness.plugin import NODE_ID, Plugin, mount_cap, unique

MiB = 1 << 20
Code = grpc.StatusCode


def pair_of(p: Plugin, vid: str) -> dict[str, object]:
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.PAIRS, vid)
        assert rec is not None, f"no pair record for {vid}"
        t = rec.value.targets[0]
        return {"state": t.state.value, "methods": [e.method.value for e in t.extents],
                "done": t.bytes_done, "total": t.bytes_total, "fence": rec.value.fence.value}


def lun_paths(p: Plugin, vid: str) -> list[Path]:
    out = []
    for name, pool in p.pools.items():
        out += sorted((pool / "luns").glob(f"{vid}-*.img"))
    return out


def volume_bytes(p: Plugin, vid: str) -> bytes:
    """The virtual volume's content, read through the mapping from the LUN files."""
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        vol = st.get(S.VOLUMES, vid)
        assert vol is not None
        out = bytearray()
        for e in vol.value.extents:
            with open(p.pools[e.array] / "luns" / f"{e.lun}.img", "rb") as f:
                f.seek(e.offset)
                out += f.read(e.length)
        return bytes(out)


def write_pattern(p: Plugin, vid: str, seed: bytes) -> None:
    """Fill every extent with distinct data, through the LUN files (the volume is unpublished)."""
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        vol = st.get(S.VOLUMES, vid)
        assert vol is not None
        for i, e in enumerate(vol.value.extents):
            with open(p.pools[e.array] / "luns" / f"{e.lun}.img", "r+b") as f:
                for off in range(0, e.length, 4 * MiB):  # sparse-ish: every other 4 MiB chunk
                    if (off // (4 * MiB)) % 2 == 0:
                        f.seek(e.offset + off)
                        f.write(hashlib.sha256(seed + bytes([i]) + off.to_bytes(8, "big")).digest() * 4096)


def create_volume(p: Plugin, size: int, *, source: pb.VolumeContentSource | None = None,
                  **params: str) -> pb.Volume:
    req = pb.CreateVolumeRequest(name=unique(), capacity_range=pb.CapacityRange(required_bytes=size),
                                 volume_capabilities=[mount_cap()], parameters=params)
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    deadline = time.monotonic() + 120
    while True:
        try:
            return p.controller.CreateVolume(req).volume
        except grpc.RpcError as e:  # ABORTED while the copy runs: the CO retries
            if e.code() is not Code.ABORTED or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def snapshot_ready(p: Plugin, name: str, source: str, timeout: float = 120) -> pb.Snapshot:
    deadline = time.monotonic() + timeout
    while True:
        snap = p.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=source)).snapshot
        if snap.ready_to_use or time.monotonic() > deadline:
            return snap
        time.sleep(0.3)


def snap_source(sid: str) -> pb.VolumeContentSource:
    return pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=sid))


def vol_source(vid: str) -> pb.VolumeContentSource:
    return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=vid))


def test_mixed_volume_snapshot_uses_internal_then_host_copy_and_restores_exactly(plugin: Plugin) -> None:
    src = create_volume(plugin, 320 * MiB)  # 256 MiB on the reflink pool, 64 MiB on ext4
    write_pattern(plugin, src.volume_id, b"before")
    at_cut = volume_bytes(plugin, src.volume_id)
    snap = snapshot_ready(plugin, unique("snap"), src.volume_id)
    assert snap.ready_to_use and snap.size_bytes == 320 * MiB and snap.source_volume_id == src.volume_id
    pair = pair_of(plugin, snap.snapshot_id)
    assert pair["methods"] == ["internal", "host"] and pair["state"] == "split"
    assert pair["done"] == pair["total"] == 320 * MiB
    # the source changes after the cut; the snapshot does not
    write_pattern(plugin, src.volume_id, b"after")
    assert volume_bytes(plugin, snap.snapshot_id) == at_cut
    restored = create_volume(plugin, 320 * MiB, source=snap_source(snap.snapshot_id))
    assert volume_bytes(plugin, restored.volume_id) == at_cut
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    # holes stay holes: the host-copied extent is no denser than its source
    src_lun = [p for p in lun_paths(plugin, src.volume_id) if "slow" in str(p)][0]
    snap_lun = [p for p in lun_paths(plugin, snap.snapshot_id) if "slow" in str(p)][0]
    assert snap_lun.stat().st_blocks <= src_lun.stat().st_blocks + 64  # + a few extent-tree blocks


def test_snapshot_is_idempotent_and_names_are_unique_per_source(plugin: Plugin) -> None:
    a = create_volume(plugin, 8 * MiB)
    b = create_volume(plugin, 8 * MiB)
    name = unique("snap")
    s1 = snapshot_ready(plugin, name, a.volume_id)
    s2 = snapshot_ready(plugin, name, a.volume_id)
    assert s1.snapshot_id == s2.snapshot_id
    with pytest.raises(grpc.RpcError) as e:
        plugin.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=b.volume_id))
    assert e.value.code() is Code.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as e:
        plugin.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=unique(), source_volume_id="vv-none"))
    assert e.value.code() is Code.NOT_FOUND
    listed = plugin.controller.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=a.volume_id))
    assert [x.snapshot.snapshot_id for x in listed.entries] == [s1.snapshot_id]
    by_id = plugin.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=s1.snapshot_id))
    assert len(by_id.entries) == 1
    assert len(plugin.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id="vs-none")).entries) == 0
    got = plugin.controller.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=s1.snapshot_id)).snapshot
    assert got.ready_to_use


def test_clone_and_restore_into_another_array_are_identical(plugin: Plugin) -> None:
    src = create_volume(plugin, 64 * MiB)  # on the reflink pool
    write_pattern(plugin, src.volume_id, b"x")
    data = volume_bytes(plugin, src.volume_id)
    clone = create_volume(plugin, 64 * MiB, source=vol_source(src.volume_id), arrays="slow")
    assert all("slow" in str(p) for p in lun_paths(plugin, clone.volume_id))
    assert pair_of(plugin, clone.volume_id)["methods"] == ["host"]
    assert volume_bytes(plugin, clone.volume_id) == data
    snap = snapshot_ready(plugin, unique("snap"), src.volume_id)
    assert pair_of(plugin, snap.snapshot_id)["methods"] == ["internal"]
    bigger = create_volume(plugin, 96 * MiB, source=snap_source(snap.snapshot_id), arrays="slow")
    got = volume_bytes(plugin, bigger.volume_id)
    assert len(got) == 96 * MiB and got[:64 * MiB] == data and got[64 * MiB:] == bytes(32 * MiB)
    # deleting a copy dissolves its pair; deleting the source dissolves the rest
    assert plugin.records()["pairs"] == 3
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=clone.volume_id))
    assert plugin.records()["pairs"] == 2
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=src.volume_id))
    assert plugin.records()["pairs"] == 1  # the restore's pair: its source, the snapshot, is still here
    assert volume_bytes(plugin, snap.snapshot_id) == data  # the copies stay
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=bigger.volume_id))
    assert plugin.records()["pairs"] == 0


def source_lun_states(p: Plugin, vid: str) -> set[str]:
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        vol = st.get(S.VOLUMES, vid)
        assert vol is not None
        luns = [st.get(S.LUNS, f"{e.array}:{e.lun}") for e in vol.value.extents]
    return {lun.value.state.value for lun in luns if lun is not None}


def test_a_host_copy_fences_an_unpublished_source_until_a_publish_hands_it_to_its_node(plugin: Plugin) -> None:
    """The copy of an unpublished source reads its LUNs, access-prohibited.  A read-only publish
    waits; a publish for writing does not (the node cuts the volume before writing it:
    test_live_stage.py), and the pair says which node must cut it."""
    src = create_volume(plugin, 48 * MiB, arrays="slow")  # no internal copy on ext4: host copy
    with open(lun_paths(plugin, src.volume_id)[0], "r+b") as f:
        f.write(os.urandom(48 * MiB))  # dense, so the bandwidth cap makes the copy take ~16 s
    plugin.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=src.volume_id, mutable_parameters={"copyBandwidth": "3Mi"}))
    snap = plugin.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        name=unique("snap"), source_volume_id=src.volume_id)).snapshot
    assert not snap.ready_to_use
    assert pair_of(plugin, snap.snapshot_id)["fence"] == "prohibited"
    assert source_lun_states(plugin, src.volume_id) == {"access-prohibited"}
    with pytest.raises(grpc.RpcError) as e:
        plugin.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=src.volume_id, node_id=NODE_ID, volume_capability=mount_cap(), readonly=True))
    assert e.value.code() is Code.FAILED_PRECONDITION and "access-prohibited" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=src.volume_id))
    assert e.value.code() is Code.FAILED_PRECONDITION
    plugin.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=src.volume_id, node_id=NODE_ID, volume_capability=mount_cap()))
    assert pair_of(plugin, snap.snapshot_id)["fence"] == "cut-on-stage"
    assert source_lun_states(plugin, src.volume_id) == {"in-use"}
    # DeleteSnapshot during the copy cancels it and leaves nothing behind
    plugin.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert lun_paths(plugin, snap.snapshot_id) == []
    assert plugin.records()["pairs"] == 0 and plugin.records()["volumes"] == 1
    assert list((plugin.data_dir / "copies").glob("*")) == []
    plugin.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=src.volume_id, node_id=NODE_ID))


def test_snapshot_errors_leave_nothing(plugin: Plugin) -> None:
    before = plugin.footprint()
    for req, code in [
        (pb.CreateSnapshotRequest(source_volume_id="vv-x"), Code.INVALID_ARGUMENT),
        (pb.CreateSnapshotRequest(name="s"), Code.INVALID_ARGUMENT),
        (pb.CreateSnapshotRequest(name="s", source_volume_id="vv-x", parameters={"zz": "1"}), Code.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            plugin.controller.CreateSnapshot(req)
        assert e.value.code() is code
    with pytest.raises(grpc.RpcError) as e:
        plugin.controller.DeleteSnapshot(pb.DeleteSnapshotRequest())
    assert e.value.code() is Code.INVALID_ARGUMENT
    plugin.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id="vs-none"))
    with pytest.raises(grpc.RpcError) as e:
        create_volume(plugin, 8 * MiB, source=snap_source("vs-none"))
    assert e.value.code() is Code.NOT_FOUND
    src = create_volume(plugin, 16 * MiB)
    snap = snapshot_ready(plugin, unique(), src.volume_id)
    with pytest.raises(grpc.RpcError) as e:
        create_volume(plugin, 8 * MiB, source=snap_source(snap.snapshot_id))
    assert e.value.code() is Code.OUT_OF_RANGE
    plugin.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=src.volume_id))
    assert plugin.footprint() == before
    assert os.listdir(plugin.pools["fast"] / "luns") == []


BLOCK = 4096


def _block(i: int) -> bytes:
    head = f"virtvol-seq {i:012d} ".encode()
    return head + bytes([i % 251]) * (BLOCK - len(head))


@pytest.mark.root
@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_writer_running_through_a_snapshot_is_cut_at_one_instant(xfs_mount: Path, ext4_mount: Path,
                                                                 tmp_path: Path, fs: str) -> None:
    from harness.plugin import running_plugin

    tag = unique("w")
    with running_plugin(tmp_path / "plugin", [("fast", xfs_mount / f"fast-{tag}", 512 * MiB, {}),
                                              ("slow", ext4_mount / f"slow-{tag}", 512 * MiB, {})]) as plugin:
        _writer_through_snapshot(plugin, tmp_path, fs)


def _writer_through_snapshot(plugin: Plugin, tmp_path: Path, fs: str) -> None:
    """Every write acknowledged before the cut is in the image and none issued after it.

    The volume spans a reflink pool and an ext4 pool, so its image needs a host
    copy while the volume is in use: the node holds the writes (fence protocol).
    """
    import threading

    cap = mount_cap(fs)
    # the first extent (where a small new file lands) is on ext4, so it is copied by the host
    create_volume(plugin, 384 * MiB, arrays="slow")  # leaves 128 MiB on the ext4 pool
    src = create_volume(plugin, 320 * MiB, arrays="slow,fast", layout="concat")
    ctx = plugin.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=src.volume_id, node_id=NODE_ID, volume_capability=cap)).publish_context
    staging = tmp_path / "staging"
    staging.mkdir()
    plugin.node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=src.volume_id, staging_target_path=str(staging), volume_capability=cap, publish_context=ctx))
    acked: list[tuple[int, float]] = []
    stop = threading.Event()

    def writer() -> None:
        fd = os.open(staging / "seq.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            i = 0
            while not stop.is_set():
                os.pwrite(fd, _block(i), i * BLOCK)
                os.fdatasync(fd)
                acked.append((i, time.time()))
                i += 1
        finally:
            os.close(fd)

    w = threading.Thread(target=writer)
    w.start()
    try:
        while len(acked) < 50:
            time.sleep(0.05)
        snap = snapshot_ready(plugin, unique("snap"), src.volume_id)
        time.sleep(0.3)  # the writer carries on after the cut
    finally:
        stop.set()
        w.join()
    assert snap.ready_to_use
    with SqliteStore(str(plugin.data_dir / "state.db"), readonly=True) as st:
        pair = st.get(S.PAIRS, snap.snapshot_id)
        assert pair is not None
        cut = pair.value.cut_at
        assert [e.method.value for e in pair.value.targets[0].extents] == ["host", "internal"]
        fence = pair.value.fence.value
    before_cut = [i for i, t in acked if t < cut]
    assert before_cut and len(acked) > len(before_cut), "the writer must run on both sides of the cut"

    restored = create_volume(plugin, 320 * MiB, source=snap_source(snap.snapshot_id))
    ctx2 = plugin.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=restored.volume_id, node_id=NODE_ID, volume_capability=cap)).publish_context
    staging2 = tmp_path / "restored"
    staging2.mkdir()
    plugin.node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=restored.volume_id, staging_target_path=str(staging2), volume_capability=cap,
        publish_context=ctx2))
    with open(staging2 / "seq.bin", "rb") as f:
        image = f.read()
    n = 0
    while (n + 1) * BLOCK <= len(image) and image[n * BLOCK:(n + 1) * BLOCK] == _block(n):
        n += 1
    tail = image[n * BLOCK:]
    assert tail.count(0) == len(tail), "the image holds a torn or foreign block after block %d" % n
    last_acked_before_cut = before_cut[-1]
    assert n - 1 >= last_acked_before_cut, "an acknowledged pre-cut write is missing from the image"
    assert n - 1 <= last_acked_before_cut + 1, "post-cut data leaked into the image"
    assert fence == "released"
    for vid, path in ((restored.volume_id, staging2), (src.volume_id, staging)):
        plugin.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(path)))


def test_the_source_stays_fenced_until_its_last_copy_ends(plugin: Plugin) -> None:
    src = create_volume(plugin, 32 * MiB, arrays="slow")
    with open(lun_paths(plugin, src.volume_id)[0], "r+b") as f:
        f.write(os.urandom(32 * MiB))
    plugin.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=src.volume_id, mutable_parameters={"copyBandwidth": "2Mi"}))
    slow = plugin.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        name=unique("slow"), source_volume_id=src.volume_id)).snapshot  # ~16 s at 2 MiB/s
    plugin.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=src.volume_id, mutable_parameters={"copyBandwidth": "1Gi"}))
    fast = snapshot_ready(plugin, unique("fast"), src.volume_id)  # ends first
    assert fast.ready_to_use
    assert not plugin.controller.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=slow.snapshot_id)).snapshot.ready_to_use
    assert source_lun_states(plugin, src.volume_id) == {"access-prohibited"}  # the first copy still reads it
    deadline = time.monotonic() + 60
    while not plugin.controller.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=slow.snapshot_id)).snapshot.ready_to_use:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert source_lun_states(plugin, src.volume_id) == {"in-use"}
    plugin.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=src.volume_id, node_id=NODE_ID, volume_capability=mount_cap()))
