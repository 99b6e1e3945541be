"""Stage, write, restage, read back, expand and unstage through the userspace
concatenation (FUSE daemon + loop device), with real loop devices and filesystems."""
from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from csi_virtvol import errors
from csi_virtvol.node import concat, devices, fs
from csi_virtvol.node.layout import BackingExtent
from csi_virtvol.node.stager import Stager

from node_helpers import MiB, drop_caches, guard_pattern, make_lun, read_extents

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _workdir(stager: Stager, volume_id: str) -> str:
    return stager._workdir(volume_id)


def _assert_gone(stager: Stager, volume_id: str, root: Path, pid: int | None) -> None:
    workdir = _workdir(stager, volume_id)
    assert not os.path.exists(workdir)
    assert stager._composer.device(workdir=workdir, name=volume_id) is None
    assert [lo for lo in devices.list_loops() if lo.back_file.startswith(str(root))] == []
    assert [m for m in fs.mounts() if m.mount_point.startswith(str(root))] == []
    if pid is not None:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"


def _write_tree(root: str, rng: random.Random) -> dict[str, str]:
    """Files of assorted sizes, one larger than any extent so it spans the boundaries."""
    digests = {}
    for i, size in enumerate([1, 4095, 65537, 3 * MiB + 17, 45 * MiB + 4097]):
        data = rng.randbytes(size)
        name = f"f{i}"
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def _read_tree(root: str, digests: dict[str, str]) -> None:
    for name, digest in digests.items():
        with open(os.path.join(root, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name


# -- raw bytes at the right offsets ---------------------------------------------------


def test_block_bytes_land_at_extent_offsets(
    stager: Stager, three_extents: list[BackingExtent], node_root: Path
) -> None:
    staging = str(node_root / "staging")
    vol = stager.stage("vol-raw", three_extents, staging, access="block")
    size = sum(e.length for e in three_extents)
    assert devices.device_size(vol.device) == size
    assert vol.device.startswith("/dev/loop" if stager.composer_kind == "fuse" else "/dev/")

    rng = random.Random(7)
    image = bytearray(os.urandom(size))
    fd = os.open(vol.device, os.O_RDWR)
    try:
        os.pwrite(fd, image, 0)
        # then small writes straddling each boundary, 512 bytes either side
        bounds = [three_extents[0].length, three_extents[0].length + three_extents[1].length]
        for b in bounds:
            patch = rng.randbytes(1024)
            os.pwrite(fd, patch, b - 512)
            image[b - 512:b + 512] = patch
        os.fsync(fd)
    finally:
        os.close(fd)

    # the LUN files hold each extent's bytes at the extent's own offset
    assert read_extents(three_extents) == bytes(image)
    # and nothing outside the extents was touched
    for seed, e in enumerate(three_extents, start=1):
        with open(e.path, "rb") as f:
            head = f.read(e.offset)
            f.seek(e.offset + e.length)
            tail = f.read()
        pat = guard_pattern(seed)
        assert head == (pat * (e.offset // 4096 + 1))[: e.offset]
        assert tail == (pat * (len(tail) // 4096 + 2))[(e.offset + e.length) % 4096:][: len(tail)]

    # reading the device (caches dropped) gives back the image
    drop_caches()
    with open(vol.device, "rb") as f:
        assert f.read() == bytes(image)
    stager.unstage("vol-raw", staging)


# -- filesystems across extents, restaged --------------------------------------------------


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
@pytest.mark.parametrize("shape", ["one", "three"])
def test_mount_write_unstage_restage_read_back(
    stager: Stager, node_root: Path, fs_type: str, shape: str, request: pytest.FixtureRequest
) -> None:
    extents = request.getfixturevalue("one_extent" if shape == "one" else "three_extents")
    staging = str(node_root / "staging")
    vol = stager.stage("vol-fs", extents, staging, access="mount", fs_type=fs_type,
                       mount_flags=["noatime"])
    info = fs.mount_info(staging)
    assert info is not None and info.fs_type == fs_type and "noatime" in info.options
    assert fs.probe(vol.device) == fs_type
    digests = _write_tree(staging, random.Random(fs_type + shape))
    pid = concat.daemon_pid(_workdir(stager, "vol-fs"))
    stager.unstage("vol-fs", staging)
    _assert_gone(stager, "vol-fs", node_root, pid)

    drop_caches()
    vol2 = stager.stage("vol-fs", extents, staging, access="mount", fs_type=fs_type)
    assert vol2.fs_type == fs_type
    _read_tree(staging, digests)  # also proves the second stage did not reformat
    stager.unstage("vol-fs", staging)


def test_existing_filesystem_is_never_reformatted(
    stager: Stager, one_extent: list[BackingExtent], node_root: Path
) -> None:
    staging = str(node_root / "staging")
    stager.stage("v", one_extent, staging, fs_type="xfs")
    (Path(staging) / "keep").write_bytes(b"still here")
    stager.unstage("v", staging)
    vol = stager.stage("v", one_extent, staging, fs_type="ext4")  # asks for another fs
    assert vol.fs_type == "xfs"
    assert (Path(staging) / "keep").read_bytes() == b"still here"
    stager.unstage("v", staging)


# -- fsync reaches the LUNs -----------------------------------------------------------------


@pytest.fixture
def pool(node_root: Path) -> Path:
    """The LUN files' own filesystem on its own loop device, so its writes can be counted."""
    img = node_root / "pool.img"
    with open(img, "wb") as f:
        f.truncate(512 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    mnt = node_root / "pool"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    return mnt


def _written_sectors(mount_point: Path) -> int:
    info = fs.mount_info(str(mount_point))
    assert info is not None
    with open(f"/sys/block/{os.path.basename(info.source)}/stat") as f:
        return int(f.read().split()[6])


def test_fsync_through_the_mount_reaches_the_lun_files(stager: Stager, pool: Path, node_root: Path) -> None:
    a = make_lun(pool / "a", 40 * MiB, seed=1, used=(MiB, 32 * MiB))
    b = make_lun(pool / "b", 40 * MiB, seed=2, used=(2 * MiB, 32 * MiB))
    extents = [BackingExtent(path=str(a), offset=MiB, length=32 * MiB),
               BackingExtent(path=str(b), offset=2 * MiB, length=32 * MiB)]
    os.sync()
    staging = str(node_root / "staging")
    stager.stage("v", extents, staging, fs_type="ext4")
    os.sync()

    data = random.Random(3).randbytes(8 * MiB)
    before = _written_sectors(pool)
    with open(os.path.join(staging, "data"), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    after = _written_sectors(pool)
    # the daemon fsynced the LUN files: the data went down to the pool's device now
    assert (after - before) * 512 >= len(data)

    # and every 1 KiB block (ext4's block size at this size) of the file is in the LUN
    # files, read directly
    image = read_extents(extents)
    blocks = {image[i:i + 1024] for i in range(0, len(image), 1024)}
    assert all(data[i:i + 1024] in blocks for i in range(0, len(data), 1024))
    stager.unstage("v", staging)


# -- block access publish -------------------------------------------------------------------


def test_block_publish_read_write_and_read_only(
    stager: Stager, three_extents: list[BackingExtent], node_root: Path
) -> None:
    staging = str(node_root / "staging")
    vol = stager.stage("blk", three_extents, staging, access="block")
    target = str(node_root / "pods" / "p1" / "dev")
    stager.publish("blk", staging, target, access="block")
    stager.publish("blk", staging, target, access="block")  # idempotent
    assert devices.is_block_device(target)
    payload = random.Random(1).randbytes(MiB)
    off = three_extents[0].length - MiB // 2  # across the first boundary
    fd = os.open(target, os.O_RDWR)
    try:
        os.pwrite(fd, payload, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    drop_caches()
    with open(vol.device, "rb") as f:
        f.seek(off)
        assert f.read(MiB) == payload
    assert stager.stats(target).total_bytes == vol.size

    ro_target = str(node_root / "pods" / "p2" / "dev")
    stager.publish("blk", staging, ro_target, access="block", readonly=True)
    with pytest.raises(OSError) as e:
        fd = os.open(ro_target, os.O_WRONLY)  # the kernel refuses at open or at write
        try:
            os.pwrite(fd, b"x" * 4096, 0)
        finally:
            os.close(fd)
    assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    with open(ro_target, "rb") as f:
        f.seek(off)
        assert f.read(MiB) == payload

    for t in (target, ro_target):
        stager.unpublish(t)
        assert not os.path.exists(t)
        stager.unpublish(t)  # missing is fine
    assert devices.find_all(vol.device) == []  # the read-only loop went with its target
    stager.unstage("blk", staging)
    assert [lo for lo in devices.list_loops() if lo.back_file.startswith(str(node_root))] == []


def test_mount_publish_bind_and_read_only(
    stager: Stager, one_extent: list[BackingExtent], node_root: Path
) -> None:
    staging = str(node_root / "staging")
    stager.stage("m", one_extent, staging, fs_type="ext4", mount_group="4321")
    st = os.stat(staging)
    assert st.st_gid == 4321 and st.st_mode & 0o2070 == 0o2070
    target = str(node_root / "pods" / "p1" / "vol")
    stager.publish("m", staging, target)
    Path(target, "hello").write_text("world")
    assert Path(staging, "hello").read_text() == "world"
    ro = str(node_root / "pods" / "p2" / "vol")
    stager.publish("m", staging, ro, readonly=True)
    with pytest.raises(OSError) as e:
        Path(ro, "nope").write_text("x")
    assert e.value.errno == errno.EROFS
    s = stager.stats(target)
    assert s.total_bytes > 0 and s.used_inodes is not None and s.total_inodes
    for t in (target, ro):
        stager.unpublish(t)
        assert not os.path.exists(t)
    with pytest.raises(errors.NotFound):
        stager.stats(target)
    stager.unstage("m", staging)


# -- expand online ---------------------------------------------------------------------------


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_expand_online_grow_last_then_append(
    stager: Stager, three_extents: list[BackingExtent], node_root: Path, fs_type: str
) -> None:
    if fs_type == "ext4" and not fs.has_capability(fs.CAP_SYS_RESOURCE):
        # this sandbox drops CAP_SYS_RESOURCE; test_vm.py runs this test in a VM with it
        pytest.skip("growing ext4 online needs CAP_SYS_RESOURCE")
    staging = str(node_root / "staging")
    extents = list(three_extents)
    stager.stage("x", extents, staging, fs_type=fs_type)
    digests = _write_tree(staging, random.Random(11))
    total0 = stager.stats(staging).total_bytes

    # the array grew the last LUN; the volume's last extent grows in place
    last = extents[-1]
    with open(last.path, "r+b") as f:
        f.truncate(last.offset + last.length + 64 * MiB)
    extents[-1] = BackingExtent(path=last.path, offset=last.offset, length=last.length + 64 * MiB)
    size = stager.expand("x", extents)
    assert size == sum(e.length for e in extents)
    total1 = stager.stats(staging).total_bytes
    assert total1 > total0 + 48 * MiB

    # then a new LUN is appended as a fourth extent
    d = make_lun(node_root / "lun-d", 72 * MiB, seed=4, used=(8 * MiB, 64 * MiB))
    extents.append(BackingExtent(path=str(d), offset=8 * MiB, length=64 * MiB))
    size = stager.expand("x", extents)
    assert size == sum(e.length for e in extents)
    assert stager.stats(staging).total_bytes > total1 + 48 * MiB
    assert stager.expand("x", extents) == size  # idempotent

    # fill most of the new space, then read everything back after a restage
    more = random.Random(12).randbytes(100 * MiB)
    with open(os.path.join(staging, "more"), "wb") as f:
        f.write(more)
        os.fsync(f.fileno())
    stager.unstage("x", staging)
    drop_caches()
    stager.stage("x", extents, staging, fs_type=fs_type)
    _read_tree(staging, digests)
    assert hashlib.sha256(Path(staging, "more").read_bytes()).digest() == hashlib.sha256(more).digest()

    with pytest.raises(errors.InvalidRequest):
        stager.expand("x", extents[:2])
    stager.unstage("x", staging)


# -- idempotency, restarts, cleanup, health ---------------------------------------------------


def test_stage_is_idempotent_and_survives_a_plugin_restart(
    stager: Stager, three_extents: list[BackingExtent], node_root: Path
) -> None:
    fuse = stager.composer_kind == "fuse"
    staging = str(node_root / "staging")
    state = str(node_root / "state")
    v1 = stager.stage("r", three_extents, staging)
    pid = concat.daemon_pid(_workdir(stager, "r"))
    assert (pid is not None) == fuse
    v2 = stager.stage("r", three_extents, staging)
    assert v2.device == v1.device

    # a new plugin process: a fresh Stager over the same state dir
    again = Stager(state, composer="fuse" if fuse else "dm")
    assert again.get("r") == v2
    v3 = again.stage("r", three_extents, staging)
    assert v3.device == v1.device
    assert concat.daemon_pid(_workdir(again, "r")) == pid

    # a crash halfway: the filesystem got unmounted, the record says "staging"
    fs.unmount(staging)
    again._save(v3.__class__(**{**{f: getattr(v3, f) for f in v3.__slots__}, "phase": "staging"}))
    assert again.condition("r").abnormal
    v4 = again.stage("r", three_extents, staging)
    assert v4.phase == "staged" and fs.is_mounted(staging)
    assert not again.condition("r").abnormal

    with pytest.raises(errors.AlreadyExists):
        again.stage("r", three_extents, staging, access="block")
    with pytest.raises(errors.AlreadyExists):
        again.stage("r", three_extents[:2], staging)

    again.unstage("r", staging)
    _assert_gone(again, "r", node_root, pid)
    again.unstage("r", staging)  # missing is fine
    stager.unstage("never-staged", str(node_root / "nowhere"))


def test_condition_reports_a_dead_daemon_and_unstage_still_cleans_up(
    stager: Stager, one_extent: list[BackingExtent], node_root: Path, fuse_only: None
) -> None:
    staging = str(node_root / "staging")
    stager.stage("d", one_extent, staging, fs_type="ext4")
    assert stager.condition("d").abnormal is False
    pid = concat.daemon_pid(_workdir(stager, "d"))
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):  # until the kernel has finished it off
        if concat.daemon_pid(_workdir(stager, "d")) is None:
            break
        time.sleep(0.05)
    # fusermount3 (auto_unmount) detaches the dead daemon's mount: no mount point is
    # left that answers ENOTCONN to whoever walks the mount table.
    mnt = os.path.join(_workdir(stager, "d"), "mnt")
    for _ in range(200):
        if fs.mount_info(mnt) is None:
            break
        time.sleep(0.05)
    assert fs.mount_info(mnt) is None
    loop = stager.get("d").device  # type: ignore[union-attr]
    assert devices.backing_file(loop) == "/volume"  # what the kernel says once the mount is gone
    cond = stager.condition("d")
    assert cond.abnormal and "daemon" in cond.message
    stager.unstage("d", staging)
    _assert_gone(stager, "d", node_root, pid)
    assert devices.backing_file(loop) is None, f"{loop} was left attached"
    with pytest.raises(errors.NotFound):
        stager.condition("d")


def test_condition_reports_a_read_only_remount(
    stager: Stager, one_extent: list[BackingExtent], node_root: Path
) -> None:
    staging = str(node_root / "staging")
    stager.stage("ro", one_extent, staging, fs_type="ext4")
    subprocess.run(["mount", "-o", "remount,ro", staging], check=True)
    cond = stager.condition("ro")
    assert cond.abnormal and "read-only" in cond.message
    stager.unstage("ro", staging)


def test_bad_requests(stager: Stager, one_extent: list[BackingExtent], node_root: Path) -> None:
    staging = str(node_root / "staging")
    e = one_extent[0]
    with pytest.raises(errors.InvalidRequest):
        stager.stage("b", [BackingExtent(path=e.path, offset=100, length=e.length)], staging)
    with pytest.raises(errors.OutOfRange):
        stager.stage("b", [BackingExtent(path=e.path, offset=e.offset, length=1 << 40)], staging)
    with pytest.raises(errors.UnsupportedCapability):
        stager.stage("b", one_extent, staging, fs_type="vfat")
    with pytest.raises(errors.NotFound):
        stager.expand("b", one_extent)
    with pytest.raises(errors.PreconditionFailed):
        stager.publish("b", staging, str(node_root / "t"))
    assert stager.get("b") is None
    assert [lo for lo in devices.list_loops() if lo.back_file.startswith(str(node_root))] == []


def test_read_only_stage(stager: Stager, three_extents: list[BackingExtent], node_root: Path) -> None:
    staging = str(node_root / "staging")
    stager.stage("ro2", three_extents, staging, fs_type="xfs")
    Path(staging, "kept").write_bytes(b"data")
    stager.unstage("ro2", staging)
    before = read_extents(three_extents)

    vol = stager.stage("ro2", three_extents, staging, fs_type="xfs", readonly=True)
    assert Path(staging, "kept").read_bytes() == b"data"
    with pytest.raises(OSError) as e:
        Path(staging, "new").write_bytes(b"x")
    assert e.value.errno == errno.EROFS
    assert not stager.condition("ro2").abnormal
    with pytest.raises(OSError):
        fd = os.open(vol.device, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 4096, 0)
        finally:
            os.close(fd)
    with pytest.raises(errors.PreconditionFailed):
        stager.expand("ro2", [*three_extents[:-1], BackingExtent(
            path=three_extents[-1].path, offset=three_extents[-1].offset,
            length=three_extents[-1].length + MiB)])
    stager.unstage("ro2", staging)
    assert read_extents(three_extents) == before  # nothing was written, not even a log


def test_blank_volume_cannot_be_staged_read_only(
    stager: Stager, one_extent: list[BackingExtent], node_root: Path
) -> None:
    with pytest.raises(errors.PreconditionFailed):
        stager.stage("blank", one_extent, str(node_root / "staging"), readonly=True)
    stager.unstage("blank", str(node_root / "staging"))
