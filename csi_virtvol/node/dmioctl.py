"""The few device-mapper ioctls the live cut needs in-process (linux/dm-ioctl.h).

A cut holds the application's writes from the suspend of its volume's device to the
resume.  Each `dmsetup` run costs a process start (a millisecond or two on a real host,
~60 ms under emulation) plus its udev handshake; three of them inside the hold made the
hold ~0.5 s in the test VM.  Through these ioctls the hold is what the kernel needs.
The rest (create, load, remove: outside any hold) stays with dmsetup, which waits for
udev to make the /dev/mapper links.

    info(name)              exists? suspended? which tables? open count, dev number
    suspend(name, lockfs)   flush and hold I/O (lockfs: freeze the filesystem on it too)
    resume(name)            swap in the inactive table, if one is loaded, and let I/O go
    status(name)            the targets' status lines (dmsetup status)
    table(name, inactive)   the table (dmsetup table [--inactive]), devices as major:minor
    message(name, text)     a target message (dmsetup message NAME 0 TEXT)
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from csi_virtvol import errors

CONTROL = "/dev/mapper/control"

# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags,
# event_nr, padding, dev, name[128], uuid[129], data[7]
_HEAD = struct.Struct("=3IIIIiIIIQ128s129s7s")
assert _HEAD.size == 312
_SPEC = struct.Struct("=QQiI16s")   # struct dm_target_spec: sector_start, length, status, next, target_type
_MSG = struct.Struct("=Q")          # struct dm_target_msg: sector, then the message

_VERSION = (4, 0, 0)
_BUF = 16384

_DEV_SUSPEND, _DEV_STATUS, _TABLE_STATUS, _TARGET_MSG = 6, 7, 12, 14

READONLY = 1 << 0
SUSPEND = 1 << 1
STATUS_TABLE = 1 << 4
ACTIVE_PRESENT = 1 << 5
INACTIVE_PRESENT = 1 << 6
BUFFER_FULL = 1 << 8
SKIP_LOCKFS = 1 << 10
NOFLUSH = 1 << 11
QUERY_INACTIVE_TABLE = 1 << 12


def _request(nr: int) -> int:
    return (3 << 30) | (_HEAD.size << 16) | (0xFD << 8) | nr   # _IOWR(DM_IOCTL, nr, struct dm_ioctl)


@dataclass(frozen=True, slots=True, kw_only=True)
class Info:
    name: str
    suspended: bool
    active: bool      # a live table is loaded
    inactive: bool    # a table waits to be swapped in at the next resume
    readonly: bool
    open_count: int
    major: int
    minor: int
    targets: int

    @property
    def majmin(self) -> str:
        return f"{self.major}:{self.minor}"


def _call(nr: int, name: str, *, flags: int = 0, payload: bytes = b"", size: int = _BUF) -> bytearray:
    raw = name.encode()
    if not raw or len(raw) > 127:
        raise errors.InvalidRequest(f"device-mapper name {name!r}: 1 to 127 bytes")
    size = max(size, _HEAD.size + len(payload) + 8)
    buf = bytearray(size)
    _HEAD.pack_into(buf, 0, *_VERSION, size, _HEAD.size, 0, 0, flags, 0, 0, 0, raw, b"", b"")
    buf[_HEAD.size:_HEAD.size + len(payload)] = payload
    try:
        fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise errors.BackendError(f"cannot open {CONTROL}: {e.strerror}") from e
    try:
        fcntl.ioctl(fd, _request(nr), buf, True)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise errors.NotFound(f"device-mapper device {name} does not exist") from e
        raise errors.BackendError(f"device-mapper ioctl {nr} on {name} failed: {e.strerror}") from e
    finally:
        os.close(fd)
    return buf


def _flags(buf: bytearray) -> int:
    return int(_HEAD.unpack_from(buf, 0)[7])


def info(name: str) -> Info | None:
    """The device's state, or None when it does not exist."""
    try:
        buf = _call(_DEV_STATUS, name, size=_HEAD.size)
    except errors.NotFound:
        return None
    f = _HEAD.unpack_from(buf, 0)
    flags, dev = int(f[7]), int(f[10])
    return Info(name=name, suspended=bool(flags & SUSPEND), active=bool(flags & ACTIVE_PRESENT),
                inactive=bool(flags & INACTIVE_PRESENT), readonly=bool(flags & READONLY),
                open_count=int(f[6]), major=os.major(dev), minor=os.minor(dev), targets=int(f[5]))


def suspend(name: str, *, lockfs: bool) -> None:
    """Flush the device's queued and in-flight I/O and hold new I/O until resume().  With
    lockfs the kernel also freezes a filesystem mounted on it (and thaws it at resume)."""
    _call(_DEV_SUSPEND, name, flags=SUSPEND | (0 if lockfs else SKIP_LOCKFS), size=_HEAD.size)


def resume(name: str) -> None:
    """Let the device's I/O go; a loaded inactive table becomes the live one first."""
    _call(_DEV_SUSPEND, name, size=_HEAD.size)


def _targets(buf: bytearray) -> list[tuple[int, int, str, str]]:
    f = _HEAD.unpack_from(buf, 0)
    count, start = int(f[5]), int(f[4])
    out = []
    pos = start
    for _ in range(count):
        sector, length, _st, nxt, ttype = _SPEC.unpack_from(buf, pos)
        params_at = pos + _SPEC.size
        end = buf.index(0, params_at)
        out.append((int(sector), int(length), ttype.rstrip(b"\0").decode(), buf[params_at:end].decode()))
        pos = start + int(nxt)
    return out


def _table_call(name: str, flags: int) -> list[tuple[int, int, str, str]]:
    size = _BUF
    while True:
        buf = _call(_TABLE_STATUS, name, flags=flags, size=size)
        if not _flags(buf) & BUFFER_FULL:
            return _targets(buf)
        size *= 4
        if size > 1 << 24:
            raise errors.BackendError(f"the status of {name} does not fit in {size} bytes")


def status(name: str) -> list[tuple[int, int, str, str]]:
    """(start sector, sectors, target type, status) of each target of the live table."""
    return _table_call(name, 0)


def table(name: str, *, inactive: bool = False) -> list[tuple[int, int, str, str]]:
    """(start sector, sectors, target type, arguments) of each target; devices are major:minor."""
    return _table_call(name, STATUS_TABLE | (QUERY_INACTIVE_TABLE if inactive else 0))


def message(name: str, text: str) -> str:
    """Send a message to the target at sector 0; return what the target answers, if anything."""
    payload = _MSG.pack(0) + text.encode() + b"\0"
    buf = _call(_TARGET_MSG, name, payload=payload)
    f = _HEAD.unpack_from(buf, 0)
    if not int(f[7]) & (1 << 16):  # DM_DATA_OUT_FLAG: the target answered
        return ""
    start = int(f[4])
    end = buf.index(0, start)
    return buf[start:end].decode()


__all__ = ["Info", "info", "suspend", "resume", "status", "table", "message"]
