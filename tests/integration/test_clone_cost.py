"""Issue 12 item 3, through the real plugin over gRPC: a snapshot of a volume on a reflink
XFS pool that cannot promise the clone's unwritten part is host-copied onto the array
with room, at the first CreateSnapshot, instead of failing (and being re-made and
undone on every retry)."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import grpc

from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.store import base as S
from csi_virtvol.store.sqlite import SqliteStore
from harness.plugin import Plugin, mount_cap, running_plugin, unique
from loopfs import loop_filesystem

MiB = 1 << 20


def _volume(p: Plugin, vid: str) -> object:
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.VOLUMES, vid)
        assert rec is not None
        return rec.value


def _content(p: Plugin, vid: str) -> bytes:
    vol = _volume(p, vid)
    out = bytearray()
    for e in vol.extents:  # type: ignore[attr-defined]
        with open(p.pools[e.array] / "luns" / f"{e.lun}.img", "rb") as f:
            f.seek(e.offset)
            out += f.read(e.length)
    return bytes(out)


def _pair(p: Plugin, vid: str) -> tuple[str, list[str]]:
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.PAIRS, vid)
        assert rec is not None
        t = rec.value.targets[0]
        return t.state.value, [e.method.value for e in t.extents]


def test_a_clone_the_xfs_pool_cannot_promise_is_host_copied_onto_the_array_with_room(
        tmp_path: Path, ext4_mount: Path) -> None:
    with loop_filesystem("xfs", tmp_path / "xfs", size=512 * MiB) as xfs:
        roomy = ext4_mount / f"roomy-{uuid.uuid4().hex[:8]}"
        pools = [("xfs-pool", xfs / "pool", 0, {}), ("roomy", roomy, 512 * MiB, {})]
        with running_plugin(tmp_path / "plugin", pools) as p:
            src = p.controller.CreateVolume(pb.CreateVolumeRequest(
                name=unique(), capacity_range=pb.CapacityRange(required_bytes=320 * MiB),
                volume_capabilities=[mount_cap()], parameters={"arrays": "xfs-pool"})).volume
            lun = _volume(p, src.volume_id).extents[0]  # type: ignore[attr-defined]
            with open(p.pools[lun.array] / "luns" / f"{lun.lun}.img", "r+b") as f:
                f.write(os.urandom(8 * MiB))  # little data, much promised: the pool
                f.flush()
                os.fsync(f.fileno())
            at_cut = _content(p, src.volume_id)
            name = unique("snap")
            calls = 0
            deadline = time.monotonic() + 120
            while True:  # what csi-snapshotter does: CreateSnapshot until ready_to_use
                calls += 1
                snap = p.controller.CreateSnapshot(
                    pb.CreateSnapshotRequest(name=name, source_volume_id=src.volume_id)).snapshot
                if snap.ready_to_use or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert snap.ready_to_use
            assert _pair(p, snap.snapshot_id) == ("split", ["host"])
            assert {e.array for e in _volume(p, snap.snapshot_id).extents} == {"roomy"}  # type: ignore[attr-defined]
            assert _content(p, snap.snapshot_id) == at_cut
            # nothing was made on the full pool and undone: no clone file was ever there
            assert not list((xfs / "pool" / "luns").glob(f"{snap.snapshot_id}-*"))
            # a volume whose clone fits is still cloned on the same pool
            small = p.controller.CreateVolume(pb.CreateVolumeRequest(
                name=unique(), capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
                volume_capabilities=[mount_cap()], parameters={"arrays": "xfs-pool"})).volume
            s2 = p.controller.CreateSnapshot(
                pb.CreateSnapshotRequest(name=unique("snap"), source_volume_id=small.volume_id)).snapshot
            assert _pair(p, s2.snapshot_id)[1] == ["internal"]
            for sid in (snap.snapshot_id, s2.snapshot_id):
                p.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=sid))
            for vid in (src.volume_id, small.volume_id):
                p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
        import shutil
        shutil.rmtree(roomy, ignore_errors=True)
