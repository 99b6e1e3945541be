"""Issue 12 item 7: CreateSnapshot and CreateVolume-from-a-source answer at once while a
copy runs (ready_to_use=false, ABORTED), and the sidecar's next calls see it finish.

The host copy is held to 16 MiB/s over 64 MiB of data (about 4 s): a controller that
waited 8 s for it answered "ready" at the first call and held the gRPC thread meanwhile."""
from __future__ import annotations

import os
import time

import grpc
import pytest

from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.store import base as S
from csi_virtvol.store.sqlite import SqliteStore
from harness.plugin import Plugin, mount_cap, unique

MiB = 1 << 20


def _slow_source(p: Plugin) -> str:
    vol = p.controller.CreateVolume(pb.CreateVolumeRequest(
        name=unique(), capacity_range=pb.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[mount_cap()], parameters={"arrays": "slow"},  # ext4: host copy
        mutable_parameters={"copyBandwidth": "16Mi"})).volume
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.VOLUMES, vol.volume_id)
        assert rec is not None
        [e] = rec.value.extents
    with open(p.pools[e.array] / "luns" / f"{e.lun}.img", "r+b") as f:
        f.write(os.urandom(64 * MiB))  # dense: every byte goes through the bandwidth cap
        f.flush()
        os.fsync(f.fileno())
    return vol.volume_id


def test_create_snapshot_answers_not_ready_at_once_then_ready(plugin: Plugin) -> None:
    vid = _slow_source(plugin)
    req = pb.CreateSnapshotRequest(name=unique("snap"), source_volume_id=vid)
    first = plugin.controller.CreateSnapshot(req).snapshot
    assert not first.ready_to_use and first.snapshot_id
    deadline = time.monotonic() + 120
    while True:  # csi-snapshotter calls again until ready_to_use
        snap = plugin.controller.CreateSnapshot(req).snapshot
        if snap.ready_to_use:
            break
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert snap.snapshot_id == first.snapshot_id
    plugin.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))


def test_clone_answers_aborted_at_once_then_the_volume(plugin: Plugin) -> None:
    vid = _slow_source(plugin)
    req = pb.CreateVolumeRequest(
        name=unique(), capacity_range=pb.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[mount_cap()], parameters={"arrays": "slow"},
        volume_content_source=pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=vid)))
    with pytest.raises(grpc.RpcError) as e:
        plugin.controller.CreateVolume(req)
    assert e.value.code() is grpc.StatusCode.ABORTED and "being filled" in (e.value.details() or "")
    deadline = time.monotonic() + 120
    while True:  # external-provisioner retries an operation in flight
        try:
            clone = plugin.controller.CreateVolume(req).volume
            break
        except grpc.RpcError as err:
            assert err.code() is grpc.StatusCode.ABORTED and time.monotonic() < deadline
            time.sleep(0.3)
    assert clone.content_source.volume.volume_id == vid
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=clone.volume_id))
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
