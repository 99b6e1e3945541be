"""Node service over gRPC with real loop devices, filesystems and mounts."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from csi_virtvol.csi._gen import csi_pb2 as pb
from harness.plugin import NODE_ID, Plugin, block_cap, mount_cap, unique

MiB = 1 << 20
pytestmark = pytest.mark.root


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _loops_on(paths: list[Path]) -> list[str]:
    out = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if any(str(p) in ln for p in paths)]


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        eff = int(next(ln for ln in f if ln.startswith("CapEff:")).split()[1], 16)
    return bool(eff >> 24 & 1)


def _publish(p: Plugin, vid: str, cap: pb.VolumeCapability) -> dict[str, str]:
    return dict(p.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=NODE_ID, volume_capability=cap)).publish_context)


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_volume_larger_than_any_array_full_lifecycle(plugin: Plugin, tmp_path: Path, fs: str) -> None:
    """Create across two arrays, stage, mkfs, write, read back, expand online, unstage, delete."""
    info = plugin.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == NODE_ID
    cap = mount_cap(fs)
    vol = plugin.controller.CreateVolume(pb.CreateVolumeRequest(
        name=unique(), capacity_range=pb.CapacityRange(required_bytes=320 * MiB),
        volume_capabilities=[cap])).volume  # each pool holds 256 MiB
    vid = vol.volume_id
    assert vol.volume_context["virtvol.csi.example.org/extents"] == "2"
    ctx = _publish(plugin, vid, cap)
    staging, target = tmp_path / "staging", tmp_path / "target"
    staging.mkdir()
    plugin.node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), volume_capability=cap, publish_context=ctx))
    # staging again is a no-op
    plugin.node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), volume_capability=cap, publish_context=ctx))
    plugin.node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), target_path=str(target), volume_capability=cap))
    assert _mounted(target)
    # fill most of the filesystem, in several directories (several XFS allocation groups),
    # so the data lands on both extents
    st = os.statvfs(target)
    each = (st.f_bavail * st.f_frsize * 85 // 100) // 4 // MiB * MiB
    digests = {}
    for i in range(4):
        (target / f"d{i}").mkdir()
        payload = os.urandom(each)
        digests[f"d{i}/data.bin"] = hashlib.sha256(payload).hexdigest()
        with open(target / f"d{i}" / "data.bin", "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    del payload
    second = plugin.pools["slow"] / "luns" / f"{vid}-1.img"
    assert second.stat().st_blocks * 512 > 16 * MiB  # user data reached the second array

    stats = plugin.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(target)))
    byte_usage = [u for u in stats.usage if u.unit == pb.VolumeUsage.BYTES][0]
    assert byte_usage.used >= 4 * each and not stats.volume_condition.abnormal

    before = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
    # expand online: the controller adds room, the node grows the device and the filesystem
    plugin.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=448 * MiB)))
    expand = pb.NodeExpandVolumeRequest(
        volume_id=vid, volume_path=str(target), staging_target_path=str(staging),
        capacity_range=pb.CapacityRange(required_bytes=448 * MiB))
    offline = fs == "ext4" and not _has_cap_sys_resource()
    if offline:
        # this sandbox withholds CAP_SYS_RESOURCE, which online ext4 growth needs: the node
        # says so clearly, and grows the filesystem offline when the volume is next staged
        with pytest.raises(grpc.RpcError) as e:
            plugin.node.NodeExpandVolume(expand)
        assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "CAP_SYS_RESOURCE" in e.value.details()
    else:
        assert plugin.node.NodeExpandVolume(expand).capacity_bytes == 448 * MiB
        st = os.statvfs(target)
        assert st.f_blocks * st.f_frsize - before >= 100 * MiB  # the filesystem grew while mounted

    # unpublish, unstage, stage again elsewhere and read back byte for byte
    plugin.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)))
    plugin.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)))
    assert not _mounted(staging) and not target.exists()
    # stage again with the publish_context from before the expansion, as kubelet does: the
    # node must assemble the grown volume all the same
    plugin.node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), volume_capability=cap, publish_context=ctx))
    for rel, digest in digests.items():
        with open(staging / rel, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    if offline:
        st = os.statvfs(staging)
        assert st.f_blocks * st.f_frsize - before >= 100 * MiB  # grown offline at this stage
    plugin.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)))
    plugin.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)))
    assert _loops_on(list(plugin.pools.values())) == []
    plugin.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE_ID))
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    assert plugin.lun_files() == []


def test_block_volume_publish_and_raw_io(plugin: Plugin, tmp_path: Path) -> None:
    cap = block_cap()
    vol = plugin.controller.CreateVolume(pb.CreateVolumeRequest(
        name=unique(), capacity_range=pb.CapacityRange(required_bytes=48 * MiB),
        volume_capabilities=[cap], parameters={"layout": "concat", "maxExtentSize": "16Mi"})).volume
    vid = vol.volume_id
    ctx = _publish(plugin, vid, cap)
    staging, target = tmp_path / "staging", tmp_path / "dev"
    staging.mkdir()
    plugin.node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), volume_capability=cap, publish_context=ctx))
    plugin.node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), target_path=str(target), volume_capability=cap))
    marker = b"virtvol-boundary!"
    fd = os.open(target, os.O_RDWR)
    try:
        os.pwrite(fd, marker, 16 * MiB - 8)  # straddles extents 0 and 1
        os.fsync(fd)
    finally:
        os.close(fd)
    lun0 = plugin.pools["fast"] / "luns" / f"{vid}-0.img"
    lun1 = plugin.pools["fast"] / "luns" / f"{vid}-1.img"
    with open(lun0, "rb") as a, open(lun1, "rb") as b:
        a.seek(16 * MiB - 8)
        assert a.read(8) + b.read(len(marker) - 8) == marker
    plugin.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)))
    plugin.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)))


def test_node_errors(plugin: Plugin, tmp_path: Path) -> None:
    cap = mount_cap()

    def code(call: object, req: object) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as e:
            call(req)  # type: ignore[operator]
        return e.value.code()

    n = plugin.node
    assert code(n.NodeStageVolume, pb.NodeStageVolumeRequest(
        staging_target_path=str(tmp_path), volume_capability=cap)) is grpc.StatusCode.INVALID_ARGUMENT
    assert code(n.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id="vv-x", volume_capability=cap)) is grpc.StatusCode.INVALID_ARGUMENT
    assert code(n.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id="vv-x", staging_target_path=str(tmp_path))) is grpc.StatusCode.INVALID_ARGUMENT
    assert code(n.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id="vv-missing", staging_target_path=str(tmp_path), volume_capability=cap)) is grpc.StatusCode.NOT_FOUND
    assert code(n.NodePublishVolume, pb.NodePublishVolumeRequest(
        volume_id="vv-x", staging_target_path=str(tmp_path), volume_capability=cap)) is grpc.StatusCode.INVALID_ARGUMENT
    assert code(n.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(
        target_path=str(tmp_path))) is grpc.StatusCode.INVALID_ARGUMENT
    assert code(n.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
        volume_id="vv-missing", volume_path=str(tmp_path))) is grpc.StatusCode.NOT_FOUND
    assert code(n.NodeExpandVolume, pb.NodeExpandVolumeRequest(
        volume_id="vv-missing", volume_path=str(tmp_path))) is grpc.StatusCode.NOT_FOUND
    # unpublishing / unstaging what is not there succeeds
    n.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="vv-x", target_path=str(tmp_path / "none")))
    n.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id="vv-x", staging_target_path=str(tmp_path / "none")))
