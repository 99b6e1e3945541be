"""Re-establishing a split pair copies only what changed (seed [0090])."""
from __future__ import annotations

import os
import random

import grpc
import pytest

from csi_virtvol.copy.engine import RESYNC_GRAIN
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import virtvol_pb2 as vpb
from csi_virtvol.csi._gen import virtvol_pb2_grpc as vrpc
from harness.plugin import NODE_ID, Plugin, mount_cap, unique
from test_snapshots import create_volume, lun_paths, snapshot_ready, volume_bytes

MiB = 1 << 20


def test_resync_writes_about_what_changed(plugin: Plugin) -> None:
    pairs = vrpc.PairsStub(plugin.channel)
    src = create_volume(plugin, 320 * MiB)  # 256 MiB reflink pool (internal) + 64 MiB ext4 (host)
    for path in lun_paths(plugin, src.volume_id):
        with open(path, "r+b") as f:
            f.write(os.urandom(4 * MiB) * (path.stat().st_size // (4 * MiB)))
    snap = snapshot_ready(plugin, unique("snap"), src.volume_id)
    first = pairs.ListPairs(vpb.ListPairsRequest(source=src.volume_id)).pairs
    assert [(p.target, p.state) for p in first] == [(snap.snapshot_id, "split")]
    assert [e.bytes_written for e in first[0].extents if e.method == "host"] == [64 * MiB]

    # change N scattered 4 KiB blocks of the host-copied extent, and some of the cloned one
    slow = [p for p in lun_paths(plugin, src.volume_id) if "slow" in str(p)][0]
    fast = [p for p in lun_paths(plugin, src.volume_id) if "fast" in str(p)][0]
    rng = random.Random(7)
    grains = set()
    for path, n in ((slow, 40), (fast, 40)):
        fd = os.open(path, os.O_RDWR)
        try:
            for _ in range(n):
                off = rng.randrange(0, 64 * MiB // 4096) * 4096
                os.pwrite(fd, os.urandom(4096), off)
                if path == slow:
                    grains.add(off // RESYNC_GRAIN)
        finally:
            os.close(fd)
    now = volume_bytes(plugin, src.volume_id)
    assert volume_bytes(plugin, snap.snapshot_id) != now

    done = pairs.ResyncPair(vpb.ResyncPairRequest(target=snap.snapshot_id)).pair
    assert done.state == "split" and done.cut_at > first[0].cut_at
    host = [e for e in done.extents if e.method == "host"][0]
    assert host.bytes_written == len(grains) * RESYNC_GRAIN  # about N blocks, not 64 MiB
    assert volume_bytes(plugin, snap.snapshot_id) == now
    # the first resync compared the target and left a page manifest; the next reads only the source
    sums = list((plugin.data_dir / "copies").glob(f"{snap.snapshot_id}-*.sums"))
    assert len(sums) == 1
    with open(slow, "r+b") as f:
        f.write(os.urandom(8192))  # two pages
    again = pairs.ResyncPair(vpb.ResyncPairRequest(target=snap.snapshot_id)).pair
    assert [e.bytes_written for e in again.extents if e.method == "host"] == [8192]
    assert volume_bytes(plugin, snap.snapshot_id) == volume_bytes(plugin, src.volume_id)

    # a pair being resynced, or with a published target, or unknown, is refused clearly
    with pytest.raises(grpc.RpcError) as e:
        pairs.ResyncPair(vpb.ResyncPairRequest(target="vs-none"))
    assert e.value.code() is grpc.StatusCode.NOT_FOUND
    clone = create_volume(plugin, 320 * MiB, source=pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)))
    plugin.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=clone.volume_id, node_id=NODE_ID, volume_capability=mount_cap()))
    with pytest.raises(grpc.RpcError) as e:
        pairs.ResyncPair(vpb.ResyncPairRequest(target=clone.volume_id))
    assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION
