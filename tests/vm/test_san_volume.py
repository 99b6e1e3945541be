"""One virtual volume over three SAN-like arrays, through the real plugin (gRPC on a unix
socket), inside vmtest: a LIO target with 3PC, a LIO target without, and an LVM thin
pool.  Its snapshot copies each extent by that array's means (EXTENDED COPY, host copy,
thin snapshot); the node reaches the LIO LUNs over iSCSI and composes the volume with
device-mapper; the volume is staged, published, expanded online and unstaged.

On the host this module skips; test_lio_vm.py boots the VM that runs it.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import virtvol_pb2 as vpb
from csi_virtvol.csi._gen import virtvol_pb2_grpc as vrpc
from csi_virtvol.store import base as S
from csi_virtvol.store.sqlite import SqliteStore
from csi_virtvol import errors
from csi_virtvol.backends import lio
from csi_virtvol.model.array import ArraySpec
from csi_virtvol.transport import Attacher, iscsi

from harness.plugin import NODE_ID, Plugin, mount_cap, running_plugin
from liotarget import IN_VM, NOT_IN_VM, MiB, ext4_mount, iscsid, lio_spec, remove_target, sh
from lvmvg import empty_pool, thin_pool, volume_group

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.skipif(not IN_VM, reason=NOT_IN_VM)]

Code = grpc.StatusCode


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[Plugin]:
    # the thin pool has room for 128 MiB of data but hands out 32 MiB (overcommit 0.25), so the
    # volume spans all three arrays and its snapshot still finds room in the pool
    with iscsid(tmp_path), ext4_mount(tmp_path) as pools, volume_group(tmp_path) as vg, \
            thin_pool(vg, size=128 * MiB) as pool:
        plain = lio_spec(pools, name="lio-plain", emulate_3pc=False, capacity=str(32 * MiB))
        tpc = lio_spec(pools, name="lio-3pc", capacity=str(512 * MiB))
        arrays: list[dict[str, object]] = [
            {"id": "thin", "kind": "lvm", "params": {"vg": vg, "pool": pool, "overcommit": "0.25"}},
            *({"id": s.id, "kind": "lio", "params": dict(s.params)} for s in (plain, tpc))]
        try:
            with running_plugin(tmp_path, [], extra_arrays=arrays) as p:
                READERS.update({str(s.id): s for s in (plain, tpc)})
                yield p
        finally:
            for spec in (plain, tpc):
                remove_target(spec)
            empty_pool(vg, pool)


def arrays_of(p: Plugin, vid: str) -> list[str]:
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.VOLUMES, vid)
        assert rec is not None
        return [e.array for e in rec.value.extents]


READERS: dict[str, ArraySpec] = {}  # the LIO arrays, which this test's reads must be let into


def pieces(p: Plugin, vid: str) -> list[tuple[str, int, int]]:
    """(LUN address, offset, length) of each extent of a volume or snapshot."""
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.VOLUMES, vid)
        assert rec is not None
        out = []
        for e in rec.value.extents:
            lun = st.get(S.LUNS, f"{e.array}:{e.lun}")
            assert lun is not None
            out.append((lun.value.address, e.offset, e.length))
        return out


def let_in(p: Plugin, vid: str) -> None:
    """Grant this host's initiator the LIO LUNs of `vid`, as the array's admin would, to
    read them outside the plugin (ControllerUnpublish took the node's access away)."""
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.VOLUMES, vid)
        assert rec is not None
        for e in rec.value.extents:
            if e.array in READERS:
                lio.LioDriver(READERS[e.array]).grant_access(lun_id=e.lun, initiator=iscsi.initiator_name())


def image(p: Plugin, vid: str, attacher: Attacher) -> bytes:
    """A volume's or snapshot's bytes read through its LUNs, each attached by this host."""
    parts = pieces(p, vid)
    let_in(p, vid)
    paths = attacher.attach(user=f"read-{vid}", addresses=[a for a, _, _ in parts])
    out = bytearray()
    try:
        for path, (_, offset, length) in zip(paths, parts):
            fd = os.open(path, os.O_RDONLY)
            try:
                out += os.pread(fd, length, offset)
            finally:
                os.close(fd)
    finally:
        attacher.detach_user(user=f"read-{vid}")
    return bytes(out)


def staged_device(staging: Path) -> str:
    for line in open("/proc/self/mountinfo", encoding="utf-8"):
        f = line.split()
        if f[4] == str(staging):
            return f[f.index("-") + 2]
    raise AssertionError(f"{staging} is not mounted")


def test_one_volume_over_lio_3pc_lio_plain_and_lvm_thin(plugin: Plugin, tmp_path: Path) -> None:
    p = plugin
    cap = mount_cap("ext4")
    vol = p.controller.CreateVolume(pb.CreateVolumeRequest(
        name="san-vol", capacity_range=pb.CapacityRange(required_bytes=96 * MiB), volume_capabilities=[cap],
        parameters={"arrays": "thin,lio-plain,lio-3pc", "layout": "concat"})).volume
    vid = vol.volume_id
    assert arrays_of(p, vid) == ["thin", "lio-plain", "lio-3pc"]

    # publish: the node's initiator is granted on both targets; stage over iSCSI + dm-linear
    ctx = p.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=NODE_ID, volume_capability=cap)).publish_context
    staging, target = tmp_path / "staging", tmp_path / "target"
    staging.mkdir()
    p.node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=str(staging),
                                                     volume_capability=cap, publish_context=ctx))
    dev = staged_device(staging)
    assert dev.startswith("/dev/dm-") or dev.startswith("/dev/mapper/"), dev
    p.node.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=str(staging),
                                                         target_path=str(target), volume_capability=cap))
    payload = os.urandom(60 * MiB)  # the ext4 file spreads over all three arrays
    with open(target / "data.bin", "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())

    # expand online: the last LUN (on lio-3pc) grows, the dm table is reloaded, ext4 grows
    before = os.statvfs(target)
    p.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=112 * MiB), volume_capability=cap))
    p.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id=vid, volume_path=str(target), staging_target_path=str(staging),
        capacity_range=pb.CapacityRange(required_bytes=112 * MiB), volume_capability=cap))
    st = os.statvfs(target)
    assert (st.f_blocks - before.f_blocks) * st.f_frsize >= 14 * MiB  # ext4 grew with the 16 MiB
    assert arrays_of(p, vid) == ["thin", "lio-plain", "lio-3pc"]  # grown in place

    p.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)))
    p.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)))
    p.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE_ID))
    assert vid not in sh("dmsetup", "ls")
    assert not [s for s in sh("iscsiadm", "-m", "session", check=False).splitlines() if "lio-" in s]

    # the targets' ACLs follow ControllerUnpublish: this host no longer sees the LIO LUNs
    attacher = Attacher(str(tmp_path / "reader"))
    denied = [a for a, _, _ in pieces(p, vid) if a.startswith(iscsi.SCHEME)]
    assert len(denied) == 2
    for address in denied:
        with pytest.raises(errors.NotFound):
            attacher.attach(user="denied", addresses=[address])
    attacher.detach_user(user="denied")

    # the snapshot (of the unpublished volume: its LUNs are fenced for the cut) copies each
    # extent by its array's means, and its image is the volume's, byte for byte
    at_cut = image(p, vid, attacher)
    deadline = time.monotonic() + 300
    while True:
        snap = p.controller.CreateSnapshot(pb.CreateSnapshotRequest(name="san-snap", source_volume_id=vid)).snapshot
        if snap.ready_to_use:
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    pairs = vrpc.PairsStub(p.channel).ListPairs(vpb.ListPairsRequest(source=vid)).pairs
    [pair] = [x for x in pairs if x.target == snap.snapshot_id]
    by_array = {row.source_lun.partition(":")[0]: row.method for row in pair.extents}
    assert by_array == {"thin": "internal", "lio-plain": "host", "lio-3pc": "internal"}, by_array
    assert image(p, snap.snapshot_id, attacher) == at_cut

    # later writes to the volume do not reach the snapshot
    parts = pieces(p, vid)
    let_in(p, vid)
    paths = attacher.attach(user="writer", addresses=[a for a, _, _ in parts])
    for path, (_, offset, _) in zip(paths, parts):
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, os.urandom(MiB), offset + 4 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    attacher.detach_user(user="writer")
    assert image(p, vid, attacher) != at_cut
    assert image(p, snap.snapshot_id, attacher) == at_cut

    # a clone from the snapshot is staged, mounted and read
    deadline = time.monotonic() + 300
    while True:
        try:
            clone = p.controller.CreateVolume(pb.CreateVolumeRequest(
                name="san-clone", capacity_range=pb.CapacityRange(required_bytes=112 * MiB),
                volume_capabilities=[cap], volume_content_source=pb.VolumeContentSource(
                    snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)))).volume
            break
        except grpc.RpcError as e:
            if e.code() is not Code.ABORTED or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    ctx = p.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=clone.volume_id, node_id=NODE_ID, volume_capability=cap)).publish_context
    cstage = tmp_path / "clone-staging"
    cstage.mkdir()
    p.node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=clone.volume_id, staging_target_path=str(cstage),
                                                     volume_capability=cap, publish_context=ctx))
    with open(cstage / "data.bin", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
    p.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=clone.volume_id,
                                                         staging_target_path=str(cstage)))
    p.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=clone.volume_id, node_id=NODE_ID))

    for v in (clone.volume_id, vid):
        p.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v))
    p.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        assert st.list(S.LUNS) == [] or all(r.value.state.value == "intact" for r in st.list(S.LUNS))
