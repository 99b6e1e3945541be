"""The file pool: an array that is a directory, whose LUNs are sparse files.

Layout of a pool at ``spec.params["path"]``::

    <path>/                   created (with parents) when missing
    <path>/.lock              flock(2) target serialising create/resize/copy
    <path>/luns/<lun-id>.img  one sparse file per LUN; the LUN id is the name
    <path>/luns/.tmp-*        a LUN being created (never listed; swept when stale)

A LUN the driver provisioned carries the extended attribute
``user.csi-virtvol.origin = provisioned``, set on the temporary file before it
is linked under its final name, so a LUN either appears complete with its mark
or not at all.  Any other ``*.img`` file in ``luns/`` is reported as
``LunOrigin.DISCOVERED``.  The pool's filesystem must support user xattrs
(XFS, ext4, btrfs and tmpfs >= 6.6 do).

Capacity is the filesystem's free space (statvfs) minus *reservations*: for
every LUN, its apparent size minus its allocated blocks, i.e. space promised
to a sparse file but not yet taken.  ``params["capacity"]`` optionally caps the
pool: then the sum of apparent sizes may not exceed it either.  Reflinked
copies share blocks, so after an internal copy the filesystem may need more
space than was reserved as either side is rewritten; this is the usual
overcommit of reflink and is not hidden.

Abilities are probed on the pool's filesystem, never configured:
GROW_LUN always; INTERNAL_COPY when FICLONE works there (XFS with
reflink=1, btrfs; not ext4).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import platform
import re
import time
import uuid
from collections.abc import Callable, Iterator

from csi_virtvol import errors
from csi_virtvol.backends._pool import LUN_SUFFIX as LUN_SUFFIX
from csi_virtvol.backends._pool import SECTOR, PoolDriver, libc, parse_size, valid_lun_id
from csi_virtvol.backends._pool import SYNC_ATTEMPTS as SYNC_ATTEMPTS
from csi_virtvol.backends._pool import TMP_PREFIX as TMP_PREFIX
from csi_virtvol.backends._pool import XATTR_ORIGIN as XATTR_ORIGIN
from csi_virtvol.backends._pool import XATTR_SOURCE as XATTR_SOURCE
from csi_virtvol.model.array import Ability, ArrayIdentity, ArraySpec, CopyCost, Lun, LunOrigin
from csi_virtvol.model.ids import LunId

logger = logging.getLogger(__name__)

KIND = "file"
FICLONE = 0x40049409  # _IOW(0x94, 9, int)
STALE_TMP_SECONDS = 3600.0

_Fill = Callable[[int], None]  # gives a fresh temp file (by fd) its content

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class FilePoolDriver(PoolDriver):
    """An ArrayDriver (and InternalCopyCapable, AllocationMapCapable) over a directory of sparse files."""

    def __init__(self, spec: ArraySpec) -> None:
        super().__init__(spec, kind=KIND, path_param="path")
        self._sweep_stale_temps()

    # ---- ArrayDriver ---------------------------------------------------------------------

    def create_lun(self, *, name: str, size: int) -> Lun:
        return self._create(name=name, size=size, make=lambda lun_id: self._materialise(
            lun_id, size=size, fill=lambda fd: os.ftruncate(fd, size)))

    def delete_lun(self, *, lun_id: LunId) -> None:
        if not valid_lun_id(lun_id) or not self._unlink_lun(lun_id):
            return
        self._fsync_dir()
        logger.info("array %s: deleted LUN %s", self._spec.id, lun_id)

    def resize_lun(self, *, lun_id: LunId, size: int) -> Lun:
        def apply(lun: Lun) -> None:
            self._resize_file(lun.address, size=size, lun_id=lun_id)
        return self._grow(lun_id=lun_id, size=size, apply=apply)

    def wipe_lun(self, *, lun_id: LunId) -> None:
        lun = self._require_lun(lun_id)
        try:
            fd = os.open(lun.address, os.O_WRONLY | os.O_CLOEXEC)
            try:
                if lun.size and not _punch_hole(fd, 0, lun.size):
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, lun.size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise errors.BackendError(f"array {self._spec.id}: wipe {lun_id}: {e}") from e
        logger.info("array %s: wiped LUN %s", self._spec.id, lun_id)

    def open_path(self, *, lun_id: LunId) -> str:
        return self._require_lun(lun_id).address

    # ---- InternalCopyCapable ----------------------------------------------------------------

    def copy_lun_internal(self, *, source: LunId, name: str) -> Lun:
        """Reflink the whole of `source` into a new LUN `name` (constant time).
        Idempotent by name: an existing `name` of the source's size is returned."""
        lun_id = self._check_name(name)
        with self._locked():
            src, done = self._copy_begin(source=source, lun_id=lun_id)
            if done is not None:
                return done
            try:
                src_fd = os.open(src.address, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise errors.BackendError(f"array {self._spec.id}: open {source}: {e}") from e
            try:
                # A reflink clone takes no new space: it is thin, like an array's snapshot, so
                # the pool's capacity cap (thick, for provisioned LUNs) does not refuse it; the
                # filesystem must still be able to fill its holes later.
                self._check_room(apparent=0, reserve=_clone_reserve(src.size, os.fstat(src_fd)))
                self._materialise(lun_id, size=src.size, fill=lambda fd: _ficlone(fd, src_fd),
                                  source=source)
            finally:
                os.close(src_fd)
        logger.info("array %s: reflinked LUN %s -> %s", self._spec.id, source, lun_id)
        return self._lun_or_fail(lun_id)

    def internal_copy_cost(self, *, source: LunId) -> CopyCost:
        """A reflink clone needs the source's unwritten part promised (see copy_lun_internal)."""
        src = self._require_lun(source)
        try:
            st = os.stat(src.address)
        except OSError as e:
            raise errors.BackendError(f"array {self._spec.id}: stat {source}: {e}") from e
        return self._copy_cost(size=src.size, apparent=0, reserve=_clone_reserve(src.size, st))

    # ---- AllocationMapCapable ---------------------------------------------------------------

    def allocated_ranges(self, *, lun_id: LunId, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """The LUN file's data ranges in the window, from SEEK_DATA/SEEK_HOLE
        (filesystem block granularity; a filesystem without them reports all data)."""
        lun = self._require_lun(lun_id)
        try:
            return iter(data_ranges(lun.address, offset=offset, length=length))
        except OSError as e:
            raise errors.BackendError(f"array {self._spec.id}: map {lun_id}: {e}") from e

    # ---- internals ---------------------------------------------------------------------------

    def _lun(self, lun_id: str, *, path: str, st: os.stat_result) -> Lun:
        return Lun(array=self._spec.id, id=LunId(lun_id), size=st.st_size, address=path,
                   origin=self._origin(path))

    def _materialise(self, lun_id: LunId, *, size: int, fill: _Fill, source: str = "") -> None:
        """Build the LUN under a temp name, mark it, then link it into place, so
        a crash leaves only a `.tmp-` file."""
        tmp = os.path.join(self._luns, f"{TMP_PREFIX}{lun_id}-{uuid.uuid4().hex[:8]}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                fill(fd)
                if os.fstat(fd).st_size != size:
                    raise errors.BackendError(f"array {self._spec.id}: {lun_id} came out with the wrong size")
                os.setxattr(fd, XATTR_ORIGIN, LunOrigin.PROVISIONED.value.encode())
                if source:
                    os.setxattr(fd, XATTR_SOURCE, source.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(tmp, lun_id)
        except OSError as e:
            raise self._create_error(e, lun_id, reflink=bool(source)) from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._fsync_dir()

    def _probe_abilities(self) -> Ability:
        found = Ability.GROW_LUN
        if probe_reflink(self._root):
            found |= Ability.INTERNAL_COPY
        return found

    def _read_identity(self) -> ArrayIdentity:
        return ArrayIdentity(vendor="Linux", model=filesystem_type(self._root), version=platform.release())

    def _sweep_stale_temps(self) -> None:
        now = time.time()
        with contextlib.suppress(OSError):
            for entry in os.scandir(self._luns):
                if entry.name.startswith(TMP_PREFIX):
                    with contextlib.suppress(OSError):
                        if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TMP_SECONDS:
                            os.unlink(entry.path)
                            logger.info("array %s: removed stale %s", self._spec.id, entry.path)


# ---- filesystem helpers (module functions so tests can check the probe independently) ----

def _clone_reserve(size: int, st: os.stat_result) -> int:
    """What a reflink clone of a file of `size` bytes with stat `st` must have promised:
    the part its blocks do not cover yet (holes the clone may fill later)."""
    return max(0, size - st.st_blocks * 512)


def _ficlone(dst_fd: int, src_fd: int) -> None:
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def probe_reflink(directory: str) -> bool:
    """True when FICLONE works between two files in `directory`."""
    tag = uuid.uuid4().hex[:8]
    src = os.path.join(directory, f".probe-{tag}-src")
    dst = os.path.join(directory, f".probe-{tag}-dst")
    try:
        with open(src, "wb") as f:
            f.write(b"csi-virtvol reflink probe\n")
            f.flush()
            os.fsync(f.fileno())
        with open(src, "rb") as s, open(dst, "wb") as d:
            _ficlone(d.fileno(), s.fileno())
        return True
    except OSError as e:
        logger.debug("no FICLONE in %s: %s", directory, e)
        return False
    finally:
        for p in (src, dst):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding `path`, from /proc/self/mountinfo
    (the longest mount point that is a prefix of the real path)."""
    real = os.path.realpath(path)
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return fstype
    for line in lines:
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        mnt = _unescape(fields[4])
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, fstype = mnt, fields[sep + 1]
    return fstype


def data_ranges(path: str, *, offset: int, length: int) -> list[tuple[int, int]]:
    """(offset, length) of the data (not holes) of file `path` inside
    [offset, offset + length), by lseek(SEEK_DATA / SEEK_HOLE)."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = min(offset + length, os.fstat(fd).st_size)
        pos = offset
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            out.append((data, hole - data))
            pos = hole
    finally:
        os.close(fd)
    return out


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE|KEEP_SIZE); False when the filesystem cannot."""
    rc = libc().fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


__all__ = ["FilePoolDriver", "KIND", "FICLONE", "SECTOR", "valid_lun_id", "parse_size",
           "probe_reflink", "filesystem_type", "data_ranges"]
