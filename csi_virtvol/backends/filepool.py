"""The file pool: an array that is a directory, whose LUNs are sparse files.

Layout of a pool at ``spec.params["path"]``::

    <path>/                   created (with parents) when missing
    <path>/.lock              flock(2) target serialising create/resize/copy
    <path>/luns/<lun-id>.img  one sparse file per LUN; the LUN id is the name
    <path>/.tmp/.tmp-*        a LUN being created (never listed; swept when stale); linked
                              into luns/ when complete, so that luns/ changes only by whole
                              LUNs appearing or going (older versions built it in luns/)

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
TMP_DIR = ".tmp"  # under the pool root: where LUN files are built

_Fill = Callable[[int], None]  # gives a fresh temp file (by fd) its content

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class FilePoolDriver(PoolDriver):
    """An ArrayDriver (and InternalCopyCapable, AllocationMapCapable) over a directory of sparse files."""

    # Filesystems whose statvfs free-block count follows allocation at once, so that the
    # usage cache sees a writer filling holes (see PoolDriver._usage); btrfs reports its
    # free space per transaction, so there every call scans, as before.
    USAGE_CACHE_FS = ("xfs", "ext4")

    def __init__(self, spec: ArraySpec) -> None:
        super().__init__(spec, kind=KIND, path_param="path", subdirs=(TMP_DIR,))
        self._tmp = os.path.join(self._root, TMP_DIR)
        # every change of luns/ below goes through _mutate
        self._usage_cacheable = filesystem_type(self._root) in self.USAGE_CACHE_FS
        self._sweep_stale_temps()

    # ---- ArrayDriver ---------------------------------------------------------------------

    def create_lun(self, *, name: str, size: int) -> Lun:
        """Idempotent by name.  The file is built and fsync'ed under a temp name first, outside
        the pool lock; the lock covers only the name check, the room check and the link, and
        the directory's fsync follows after it, so concurrent creates overlap their fsyncs."""
        lun_id = self._check_name(name)
        self._check_size(size)
        existing = self.get_lun(lun_id=lun_id)
        if existing is not None:
            return self._same_or_conflict(existing, size=size)
        tmp, reserve = self._build_temp(lun_id, size=size, fill=lambda fd: os.ftruncate(fd, size))
        try:
            with self._locked():
                existing = self.get_lun(lun_id=lun_id)
                if existing is not None:
                    return self._same_or_conflict(existing, size=size)
                self._check_room(apparent=size, reserve=size)
                def link() -> tuple[int, int]:
                    self._publish(tmp, lun_id)
                    return size, reserve
                self._mutate(link)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._fsync_dir()
        logger.info("array %s: created LUN %s (%d bytes)", self._spec.id, lun_id, size)
        return self._lun_or_fail(lun_id)

    def delete_lun(self, *, lun_id: LunId) -> None:
        if not valid_lun_id(lun_id):
            return
        gone: list[bool] = []

        def unlink() -> tuple[int, int] | None:
            try:
                st = os.stat(self._path(lun_id), follow_symlinks=False)
            except FileNotFoundError:
                gone.append(False)
                return 0, 0
            except OSError:
                st = None
            gone.append(self._unlink_lun(lun_id))
            if st is None or not gone[-1]:
                return None
            return -st.st_size, -max(0, st.st_size - st.st_blocks * 512)

        self._mutate(unlink)
        if not gone[-1]:
            return
        self._fsync_dir()
        logger.info("array %s: deleted LUN %s", self._spec.id, lun_id)

    def resize_lun(self, *, lun_id: LunId, size: int) -> Lun:
        def apply(lun: Lun) -> None:
            def grow_file() -> tuple[int, int]:
                self._resize_file(lun.address, size=size, lun_id=lun_id)
                # a size change moves neither luns/ nor free blocks: touch luns/ so that
                # other processes' cached usage (see _usage) notices it
                os.utime(self._luns)
                grow = size - lun.size  # the new part is a hole: apparent and reserved grow by it
                return grow, grow
            self._mutate(grow_file)
        return self._grow(lun_id=lun_id, size=size, apply=apply)

    def wipe_lun(self, *, lun_id: LunId) -> None:
        self._mutate(lambda: self._wipe(lun_id))  # punched holes become reserved again: rescan

    def _wipe(self, lun_id: LunId) -> None:
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
                try:
                    self._materialise(lun_id, size=src.size, fill=lambda fd: _ficlone(fd, src_fd), source=source)
                finally:
                    self._mutate(lambda: None)  # shared blocks: rescan rather than guess
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
        tmp, _ = self._build_temp(lun_id, size=size, fill=fill, source=source)
        try:
            self._publish(tmp, lun_id)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._fsync_dir()

    def _build_temp(self, lun_id: LunId, *, size: int, fill: _Fill, source: str = "") -> tuple[str, int]:
        """A complete, marked and fsync'ed LUN file under a fresh temp name; (its path, the
        bytes of it not yet allocated).  Removed again if building it fails."""
        tmp = os.path.join(self._tmp, f"{TMP_PREFIX}{lun_id}-{uuid.uuid4().hex[:8]}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                fill(fd)
                st = os.fstat(fd)
                if st.st_size != size:
                    raise errors.BackendError(f"array {self._spec.id}: {lun_id} came out with the wrong size")
                os.setxattr(fd, XATTR_ORIGIN, LunOrigin.PROVISIONED.value.encode())
                if source:
                    os.setxattr(fd, XATTR_SOURCE, source.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise self._create_error(e, lun_id, reflink=bool(source)) from e
            raise
        return tmp, max(0, size - st.st_blocks * 512)

    def _probe_abilities(self) -> Ability:
        found = Ability.GROW_LUN
        if probe_reflink(self._root):
            found |= Ability.INTERNAL_COPY
        return found

    def _read_identity(self) -> ArrayIdentity:
        return ArrayIdentity(vendor="Linux", model=filesystem_type(self._root), version=platform.release())

    def _sweep_stale_temps(self) -> None:
        now = time.time()
        for where in (self._tmp, self._luns):
            with contextlib.suppress(OSError):
                for entry in os.scandir(where):
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
