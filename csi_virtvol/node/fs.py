"""Filesystems on the volume's block device: probe, format (only when blank), mount,
bind, unmount, grow, stats, mount group and a health check."""
from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass

from csi_virtvol import errors
from csi_virtvol.node import commands, devices

logger = logging.getLogger(__name__)

SUPPORTED_FS = ("ext4", "xfs")
DEFAULT_FS = "ext4"


# -- /proc/self/mountinfo ------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MountInfo:
    mount_point: str
    root: str             # the path inside the source filesystem (bind mounts: not "/")
    source: str
    fs_type: str
    options: frozenset[str]        # per-mount options (ro, nosuid, ...)
    super_options: frozenset[str]  # per-superblock options
    major_minor: str

    @property
    def readonly(self) -> bool:
        return "ro" in self.options or "ro" in self.super_options


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountInfo]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().splitlines()
    result = []
    for line in lines:
        left, _, right = line.partition(" - ")
        a, b = left.split(), right.split()
        if len(a) < 6 or len(b) < 3:
            continue
        result.append(MountInfo(
            mount_point=_unescape(a[4]), root=_unescape(a[3]), source=_unescape(b[1]),
            fs_type=b[0], options=frozenset(a[5].split(",")),
            super_options=frozenset(b[2].split(",")), major_minor=a[2],
        ))
    return result


def mount_info(path: str) -> MountInfo | None:
    """The topmost mount at exactly path, or None."""
    want = os.path.normpath(path)
    found = None
    for m in mounts():
        if m.mount_point == want:
            found = m
    return found


def is_mounted(path: str) -> bool:
    return mount_info(path) is not None


# -- probing and formatting ------------------------------------------------------------


def probe(device: str) -> str | None:
    """The filesystem (or partition table, as "pt:<type>") on device; None when blank."""
    res = commands.run(["blkid", "-p", "-o", "export", device], check=False)
    if res.returncode == 2:  # nothing recognised
        return None
    if res.returncode != 0:
        raise errors.BackendError(f"blkid -p {device} failed ({res.returncode}): {res.stderr.strip()}")
    fields = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    if "TYPE" in fields:
        return fields["TYPE"]
    if "PTTYPE" in fields:
        return "pt:" + fields["PTTYPE"]
    return "unknown"


def ensure_fs(device: str, fs_type: str) -> str:
    """Make fs_type on device if, and only if, the device is blank; never reformat.
    Returns the filesystem the device holds afterwards."""
    fs_type = fs_type or DEFAULT_FS
    if fs_type not in SUPPORTED_FS:
        raise errors.UnsupportedCapability(f"filesystem {fs_type!r}; supported: {', '.join(SUPPORTED_FS)}")
    found = probe(device)
    if found is not None:
        if found != fs_type:
            logger.warning("%s already holds %s (asked for %s); keeping it", device, found, fs_type)
        if found not in SUPPORTED_FS:
            raise errors.PreconditionFailed(f"{device} holds {found}, which this driver cannot mount")
        return found
    logger.info("formatting blank %s as %s", device, fs_type)
    if fs_type == "ext4":
        commands.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1", device])
    else:
        commands.run(["mkfs.xfs", "-q", "-K", device])
    return fs_type


# -- mounting ------------------------------------------------------------------------


def fs_mount_options(fs_type: str) -> list[str]:
    # Clones made by array copy carry the source's XFS UUID; without nouuid the second
    # of the two would not mount on the same node.
    return ["nouuid"] if fs_type == "xfs" else []


def mount(
    source: str,
    target: str,
    *,
    fs_type: str | None = None,
    flags: Sequence[str] = (),
    readonly: bool = False,
) -> None:
    """Mount source at target (a directory, made if missing); already mounted = done."""
    os.makedirs(target, exist_ok=True)
    existing = mount_info(target)
    if existing is not None:
        if existing.source != source and os.path.realpath(existing.source) != os.path.realpath(source):
            raise errors.AlreadyExists(f"{target} already has {existing.source} mounted")
        return
    opts = list(flags)
    if fs_type:
        opts += fs_mount_options(fs_type)
    if readonly:
        opts.append("ro")
    argv = ["mount"]
    if fs_type:
        argv += ["-t", fs_type]
    if opts:
        argv += ["-o", ",".join(dict.fromkeys(opts))]
    commands.run(argv + [source, target])
    logger.info("mounted %s at %s (%s)", source, target, ",".join(opts) or "defaults")


def bind_mount(source: str, target: str, *, readonly: bool = False, flags: Sequence[str] = ()) -> None:
    """Bind source onto target.  A block device source binds onto a file target (made if
    missing); a directory source onto a directory target."""
    if mount_info(target) is not None:
        return
    if devices.is_block_device(source) or os.path.isfile(source):
        os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
        if not os.path.exists(target):
            with open(target, "a", encoding="utf-8"):
                pass
    else:
        os.makedirs(target, exist_ok=True)
    opts = ["bind", *flags]
    if readonly:
        opts.append("ro")
    commands.run(["mount", "-o", ",".join(dict.fromkeys(opts)), source, target])
    if readonly:
        info = mount_info(target)
        if info is not None and "ro" not in info.options:  # older mount(8): remount needed
            commands.run(["mount", "-o", "remount,bind,ro", target])
    logger.info("bound %s onto %s%s", source, target, " read-only" if readonly else "")


def unmount(target: str, *, busy_retries: int = 5) -> None:
    """Unmount every mount stacked at target; nothing mounted = done.  A target that stays
    busy is detached lazily."""
    for _ in range(16):
        if mount_info(target) is None:
            return
        for attempt in range(busy_retries + 1):
            res = commands.run(["umount", target], check=False)
            if res.returncode == 0 or mount_info(target) is None:
                break
            if "busy" not in res.stderr.lower():
                raise errors.BackendError(f"umount {target} failed: {res.stderr.strip()}")
            if attempt < busy_retries:
                time.sleep(0.1)
        else:
            logger.warning("%s stays busy; unmounting lazily", target)
            commands.run(["umount", "-l", target])
        logger.info("unmounted %s", target)
    raise errors.BackendError(f"{target} still mounted after 16 unmounts")


# -- growing, stats, group ---------------------------------------------------------------


def grow(*, device: str, mount_point: str, fs_type: str) -> None:
    """Grow a mounted filesystem online to fill its device."""
    if fs_type == "ext4":
        try:
            commands.run(["resize2fs", device])
        except errors.BackendError as e:
            if "Permission denied" in str(e) and not has_capability(CAP_SYS_RESOURCE):
                raise errors.PreconditionFailed(
                    f"the device of {mount_point} grew, but growing ext4 while mounted needs "
                    "CAP_SYS_RESOURCE, which this node plugin lacks; the filesystem is grown "
                    "offline the next time the volume is staged"
                ) from e
            raise
    elif fs_type == "xfs":
        commands.run(["xfs_growfs", mount_point])
    else:
        raise errors.UnsupportedCapability(f"growing {fs_type}")
    logger.info("grew %s on %s", fs_type, device)


CAP_SYS_RESOURCE = 24


def grow_offline(device: str, fs_type: str) -> bool:
    """Before mounting: grow an ext4 filesystem that is smaller than its device
    (an online grow that could not run).  Returns whether it grew."""
    if fs_type != "ext4":
        return False  # XFS can only grow mounted, and xfs_growfs needs no extra capability
    out = commands.run(["dumpe2fs", "-h", device]).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    try:
        fs_bytes = int(fields["Block count"]) * int(fields["Block size"])
    except (KeyError, ValueError) as e:
        raise errors.BackendError(f"cannot read the ext4 size of {device}") from e
    with open(device, "rb") as f:
        dev_bytes = f.seek(0, os.SEEK_END)
    if dev_bytes - fs_bytes < 1 << 20:
        return False
    fsck = commands.run(["e2fsck", "-f", "-p", device], check=False)
    if fsck.returncode not in (0, 1):
        raise errors.BackendError(f"e2fsck -f -p {device} exited {fsck.returncode}: {fsck.stderr.strip()}")
    commands.run(["resize2fs", device])
    logger.info("grew ext4 on %s offline from %d to %d bytes", device, fs_bytes, dev_bytes)
    return True


def has_capability(cap: int) -> bool:
    """Whether this process has capability number cap in its effective set."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeStats:
    total_bytes: int
    available_bytes: int | None = None
    used_bytes: int | None = None
    total_inodes: int | None = None
    available_inodes: int | None = None
    used_inodes: int | None = None


def stats(path: str) -> VolumeStats:
    """statvfs for a mount; size for a block device (or a file a device is bound onto)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise errors.NotFound(f"{path} does not exist") from e
    except OSError as e:
        raise errors.BackendError(f"cannot stat {path}: {e}") from e
    if stat.S_ISBLK(st.st_mode):
        return VolumeStats(total_bytes=devices.device_size(path))
    if not stat.S_ISDIR(st.st_mode):
        raise errors.NotFound(f"{path} is neither a mount nor a block device")
    if not is_mounted(path):
        raise errors.NotFound(f"nothing is mounted at {path}")
    v = os.statvfs(path)
    return VolumeStats(
        total_bytes=v.f_blocks * v.f_frsize,
        available_bytes=v.f_bavail * v.f_frsize,
        used_bytes=(v.f_blocks - v.f_bfree) * v.f_frsize,
        total_inodes=v.f_files,
        available_inodes=v.f_favail,
        used_inodes=v.f_files - v.f_ffree,
    )


def set_mount_group(root: str, gid: int) -> None:
    """fsGroup semantics on the filesystem root: group gid, group rwx, setgid so new files
    inherit the group."""
    os.chown(root, -1, gid)
    mode = stat.S_IMODE(os.stat(root).st_mode)
    os.chmod(root, mode | stat.S_ISGID | stat.S_IRWXG)
    logger.info("gave %s to group %d", root, gid)


def parse_group(group: str) -> int:
    try:
        gid = int(group)
    except ValueError as e:
        raise errors.InvalidRequest(f"volume_mount_group {group!r} is not a numeric gid") from e
    if gid < 0:
        raise errors.InvalidRequest(f"volume_mount_group {gid} is negative")
    return gid


# -- health ------------------------------------------------------------------------------


def mount_problem(path: str, *, expect_readonly: bool) -> str | None:
    """Why the mount at path is unhealthy, or None."""
    info = mount_info(path)
    if info is None:
        return f"{path} is not mounted"
    if info.readonly and not expect_readonly:
        return f"{path} is mounted read-only (the filesystem may have hit errors)"
    try:
        os.statvfs(path)
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.EIO, errno.ESTALE):
            return f"{path} does not answer: {e.strerror}"
        raise errors.BackendError(f"statvfs {path}: {e}") from e
    return None
