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
import ctypes.util
import errno
import fcntl
import logging
import os
import platform
import re
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from csi_virtvol import errors
from csi_virtvol.model.array import Ability, ArrayIdentity, ArrayInfo, ArraySpec, Lun, LunOrigin
from csi_virtvol.model.ids import LunId

logger = logging.getLogger(__name__)

KIND = "file"
FICLONE = 0x40049409  # _IOW(0x94, 9, int)
SECTOR = 512  # LUN sizes must be a multiple of this (they become loop devices)

XATTR_ORIGIN = "user.csi-virtvol.origin"
XATTR_SOURCE = "user.csi-virtvol.source"
LUN_SUFFIX = ".img"
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 3600.0
SYNC_ATTEMPTS = 3  # syncfs rounds before a full filesystem is believed

_LUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SIZE = re.compile(r"\s*(\d+)\s*([KMGTP]i?)?[Bb]?\s*")
_UNITS = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}

_Fill = Callable[[int], None]  # gives a fresh temp file (by fd) its content

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def valid_lun_id(name: str) -> bool:
    """A LUN id is a file name stem: letters, digits, '.', '_', '-'; not
    starting with '.' or '-' (so never a temp file, '..' or an option)."""
    return bool(_LUN_ID.fullmatch(name)) and not name.endswith(".")


def parse_size(text: str) -> int:
    """``"1073741824"``, ``"1Gi"``, ``"500M"``, ``"2GiB"`` -> bytes."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise errors.InvalidRequest(f"not a size: {text!r}")
    return int(m.group(1)) * (_UNITS[m.group(2)] if m.group(2) else 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Usage:
    apparent: int  # sum of LUN file sizes
    reserved: int  # sum over LUNs of max(0, apparent - allocated)


class FilePoolDriver:
    """An ArrayDriver (and InternalCopyCapable) over a directory of sparse files."""

    def __init__(self, spec: ArraySpec) -> None:
        if spec.kind != KIND:
            raise errors.InvalidRequest(f"array {spec.id}: kind {spec.kind!r} is not {KIND!r}")
        path = spec.params.get("path", "")
        if not path:
            raise errors.InvalidRequest(f"array {spec.id}: params.path is required")
        self._spec = spec
        self._root = os.path.abspath(path)
        self._luns = os.path.join(self._root, "luns")
        self._cap = parse_size(spec.params["capacity"]) if spec.params.get("capacity") else None
        self._probed: Ability | None = None
        self._identity: ArrayIdentity | None = None
        try:
            if not os.path.isdir(self._root):
                logger.info("array %s: creating pool directory %s", spec.id, self._root)
            os.makedirs(self._luns, exist_ok=True)
        except OSError as e:
            raise errors.BackendUnavailable(f"array {spec.id}: cannot use {self._root}: {e}") from e
        self._sweep_stale_temps()

    # ---- ArrayDriver ---------------------------------------------------------------------

    @property
    def spec(self) -> ArraySpec:
        return self._spec

    def describe(self) -> ArrayInfo:
        probed = self._probe()
        total, free = self._capacity()
        return ArrayInfo(
            id=self._spec.id, kind=KIND, identity=self._get_identity(), probed=probed,
            abilities=probed, capacity_total=total, capacity_free=free,
            labels=dict(self._spec.labels), topology=dict(self._spec.topology),
        )

    def create_lun(self, *, name: str, size: int) -> Lun:
        lun_id = self._check_name(name)
        self._check_size(size)
        with self._locked():
            existing = self.get_lun(lun_id=lun_id)
            if existing is not None:
                return self._same_or_conflict(existing, size=size)
            self._check_room(apparent=size, reserve=size)
            self._materialise(lun_id, size=size, fill=lambda fd: os.ftruncate(fd, size))
        logger.info("array %s: created LUN %s (%d bytes)", self._spec.id, lun_id, size)
        return self._lun_or_fail(lun_id)

    def delete_lun(self, *, lun_id: LunId) -> None:
        if not valid_lun_id(lun_id):
            return
        try:
            os.unlink(self._path(lun_id))
        except FileNotFoundError:
            return
        except OSError as e:
            raise errors.BackendError(f"array {self._spec.id}: delete {lun_id}: {e}") from e
        self._fsync_dir()
        logger.info("array %s: deleted LUN %s", self._spec.id, lun_id)

    def get_lun(self, *, lun_id: LunId) -> Lun | None:
        if not valid_lun_id(lun_id):
            return None
        path = self._path(lun_id)
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise errors.BackendError(f"array {self._spec.id}: stat {path}: {e}") from e
        if not stat.S_ISREG(st.st_mode):
            return None
        return self._lun(lun_id, path=path, size=st.st_size)

    def list_luns(self) -> list[Lun]:
        out: list[Lun] = []
        for lun_id, path, st in self._scan():
            out.append(self._lun(lun_id, path=path, size=st.st_size))
        return sorted(out, key=lambda lun: lun.id)

    def resize_lun(self, *, lun_id: LunId, size: int) -> Lun:
        self._check_size(size)
        with self._locked():
            lun = self.get_lun(lun_id=lun_id)
            if lun is None:
                raise errors.NotFound(f"array {self._spec.id}: no LUN {lun_id}")
            if size < lun.size:
                raise errors.InvalidRequest(
                    f"array {self._spec.id}: LUN {lun_id} is {lun.size} bytes; cannot shrink to {size}")
            if size == lun.size:
                return lun
            grow = size - lun.size
            self._check_room(apparent=grow, reserve=grow)
            try:
                fd = os.open(lun.address, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                raise errors.BackendError(f"array {self._spec.id}: grow {lun_id}: {e}") from e
        logger.info("array %s: grew LUN %s to %d bytes", self._spec.id, lun_id, size)
        return self._lun_or_fail(lun_id)

    def wipe_lun(self, *, lun_id: LunId) -> None:
        lun = self.get_lun(lun_id=lun_id)
        if lun is None:
            raise errors.NotFound(f"array {self._spec.id}: no LUN {lun_id}")
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
        lun = self.get_lun(lun_id=lun_id)
        if lun is None:
            raise errors.NotFound(f"array {self._spec.id}: no LUN {lun_id}")
        return lun.address

    # ---- InternalCopyCapable ----------------------------------------------------------------

    def copy_lun_internal(self, *, source: LunId, name: str) -> Lun:
        """Reflink the whole of `source` into a new LUN `name` (constant time).
        Idempotent by name: an existing `name` of the source's size is returned."""
        lun_id = self._check_name(name)
        with self._locked():
            src = self.get_lun(lun_id=source)
            if src is None:
                raise errors.NotFound(f"array {self._spec.id}: no LUN {source}")
            existing = self.get_lun(lun_id=lun_id)
            if existing is not None:
                if existing.id == src.id:
                    raise errors.InvalidRequest(f"array {self._spec.id}: cannot copy {source} onto itself")
                return self._same_or_conflict(existing, size=src.size)
            try:
                src_fd = os.open(src.address, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise errors.BackendError(f"array {self._spec.id}: open {source}: {e}") from e
            try:
                allocated = os.fstat(src_fd).st_blocks * 512
                # A reflink clone takes no new space: it is thin, like an array's snapshot, so
                # the pool's capacity cap (thick, for provisioned LUNs) does not refuse it; the
                # filesystem must still be able to fill its holes later.
                self._check_room(apparent=0, reserve=max(0, src.size - allocated))
                self._materialise(lun_id, size=src.size, fill=lambda fd: _ficlone(fd, src_fd),
                                  source=source)
            finally:
                os.close(src_fd)
        logger.info("array %s: reflinked LUN %s -> %s", self._spec.id, source, lun_id)
        return self._lun_or_fail(lun_id)

    # ---- internals ---------------------------------------------------------------------------

    def _path(self, lun_id: str) -> str:
        return os.path.join(self._luns, lun_id + LUN_SUFFIX)

    def _check_name(self, name: str) -> LunId:
        if not valid_lun_id(name):
            raise errors.InvalidRequest(
                f"array {self._spec.id}: LUN name {name!r} must match {_LUN_ID.pattern} and not end in '.'")
        return LunId(name)

    def _check_size(self, size: int) -> None:
        if size <= 0 or size % SECTOR:
            raise errors.OutOfRange(
                f"array {self._spec.id}: LUN size {size} must be a positive multiple of {SECTOR}")

    def _same_or_conflict(self, existing: Lun, *, size: int) -> Lun:
        if existing.size != size:
            raise errors.AlreadyExists(
                f"array {self._spec.id}: LUN {existing.id} exists with {existing.size} bytes, not {size}")
        return existing

    def _lun(self, lun_id: str, *, path: str, size: int) -> Lun:
        return Lun(array=self._spec.id, id=LunId(lun_id), size=size, address=path,
                   origin=self._origin(path))

    def _lun_or_fail(self, lun_id: LunId) -> Lun:
        lun = self.get_lun(lun_id=lun_id)
        if lun is None:  # deleted by someone else right after we made it
            raise errors.BackendError(f"array {self._spec.id}: LUN {lun_id} vanished after creation")
        return lun

    def _origin(self, path: str) -> LunOrigin:
        try:
            mark = os.getxattr(path, XATTR_ORIGIN, follow_symlinks=False)
        except OSError:
            return LunOrigin.DISCOVERED
        return LunOrigin.PROVISIONED if mark == LunOrigin.PROVISIONED.value.encode() else LunOrigin.DISCOVERED

    def _scan(self) -> Iterator[tuple[str, str, os.stat_result]]:
        try:
            entries = list(os.scandir(self._luns))
        except OSError as e:
            raise errors.BackendUnavailable(f"array {self._spec.id}: cannot list {self._luns}: {e}") from e
        for entry in entries:
            if not entry.name.endswith(LUN_SUFFIX):
                continue
            lun_id = entry.name[: -len(LUN_SUFFIX)]
            if not valid_lun_id(lun_id):
                if not entry.name.startswith("."):
                    logger.warning("array %s: ignoring %s (not a valid LUN id)", self._spec.id, entry.path)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield lun_id, entry.path, st

    def _materialise(self, lun_id: LunId, *, size: int, fill: _Fill, source: str = "") -> None:
        """Build the LUN under a temp name, mark it, then link it into place.

        link(2) fails with EEXIST instead of replacing, so two racing creators
        cannot overwrite each other; a crash leaves only a `.tmp-` file."""
        tmp = os.path.join(self._luns, f"{TMP_PREFIX}{lun_id}-{uuid.uuid4().hex[:8]}")
        final = self._path(lun_id)
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
            os.link(tmp, final)
        except FileExistsError as e:
            raise errors.Conflict(f"array {self._spec.id}: LUN {lun_id} appeared concurrently") from e
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise errors.CapacityExceeded(f"array {self._spec.id}: {lun_id}: {e}") from e
            if e.errno in (errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOTTY) and source:
                raise errors.UnsupportedCapability(
                    f"array {self._spec.id}: filesystem cannot reflink ({e})") from e
            raise errors.BackendError(f"array {self._spec.id}: create {lun_id}: {e}") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._fsync_dir()

    def _usage(self) -> _Usage:
        apparent = reserved = 0
        for _, _, st in self._scan():
            apparent += st.st_size
            reserved += max(0, st.st_size - st.st_blocks * 512)
        return _Usage(apparent=apparent, reserved=reserved)

    def _capacity(self) -> tuple[int, int]:
        try:
            vfs = os.statvfs(self._root)
        except OSError as e:
            raise errors.BackendUnavailable(f"array {self._spec.id}: statvfs {self._root}: {e}") from e
        usage = self._usage()
        total = vfs.f_blocks * vfs.f_frsize
        free = vfs.f_bavail * vfs.f_frsize - usage.reserved
        if self._cap is not None:
            total = min(total, self._cap)
            free = min(free, self._cap - usage.apparent)
        return total, max(0, free)

    def _check_room(self, *, apparent: int, reserve: int) -> None:
        usage = self._usage()
        if self._cap is not None and apparent and usage.apparent + apparent > self._cap:
            raise errors.CapacityExceeded(
                f"array {self._spec.id}: {usage.apparent} + {apparent} bytes exceeds capacity {self._cap}")
        fs_free = 0
        for attempt in range(SYNC_ATTEMPTS + 1):
            vfs = os.statvfs(self._root)
            fs_free = vfs.f_bavail * vfs.f_frsize - usage.reserved
            if reserve <= fs_free:
                return
            if attempt < SYNC_ATTEMPTS:
                # XFS and btrfs free a deleted file's blocks in the background;
                # syncfs(2) makes them count before we say "full"
                self._syncfs()
        raise errors.CapacityExceeded(
            f"array {self._spec.id}: needs {reserve} bytes, filesystem has {max(0, fs_free)} unpromised")

    def _syncfs(self) -> None:
        fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _libc_fn().syncfs(fd) != 0:
                logger.debug("array %s: syncfs: %s", self._spec.id, os.strerror(ctypes.get_errno()))
        finally:
            os.close(fd)

    def _probe(self) -> Ability:
        if self._probed is None:
            found = Ability.GROW_LUN
            if probe_reflink(self._root):
                found |= Ability.INTERNAL_COPY
            self._probed = found
            logger.info("array %s: probed %s on %s", self._spec.id, found.names(), self._root)
        return self._probed

    def _get_identity(self) -> ArrayIdentity:
        if self._identity is None:
            self._identity = ArrayIdentity(vendor="Linux", model=filesystem_type(self._root),
                                           version=platform.release())
        return self._identity

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(os.path.join(self._root, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise errors.BackendUnavailable(f"array {self._spec.id}: lock: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _fsync_dir(self) -> None:
        fd = os.open(self._luns, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


_libc: ctypes.CDLL | None = None


def _libc_fn() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        lib.fallocate.restype = ctypes.c_int
        lib.syncfs.argtypes = [ctypes.c_int]
        lib.syncfs.restype = ctypes.c_int
        _libc = lib
    return _libc


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE|KEEP_SIZE); False when the filesystem cannot."""
    rc = _libc_fn().fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


__all__ = ["FilePoolDriver", "KIND", "FICLONE", "SECTOR", "valid_lun_id", "parse_size",
           "probe_reflink", "filesystem_type"]
