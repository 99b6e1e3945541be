"""What every driver whose LUNs are files in a pool directory shares.

Layout under the pool root::

    <root>/.lock              flock(2) target serialising every change
    <root>/luns/<lun-id>.img  one file per LUN; the LUN id is the name
    <root>/luns/.tmp-*        a LUN being built (never listed)

`PoolDriver` holds the name and size rules, the create/grow/copy skeletons
(idempotent by name, capacity checked under the lock), the scan of ``luns/``,
the origin mark (``user.csi-virtvol.origin``) and the capacity accounting:
the filesystem's free space minus, per LUN, its size minus its allocated
blocks; ``params["capacity"]`` optionally caps the sum of LUN sizes.  A
subclass says how a LUN file becomes a `Lun` (`_lun`), what its size is
(`_lun_size`), and how the array is probed and identified (once each).
"""
from __future__ import annotations

import abc

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from csi_virtvol import errors
from csi_virtvol.transport import flock
from csi_virtvol.backends.base import same_or_conflict
from csi_virtvol.model.array import Ability, ArrayIdentity, ArrayInfo, ArraySpec, CopyCost, Lun, LunOrigin
from csi_virtvol.model.ids import LunId

logger = logging.getLogger(__name__)

SECTOR = 512  # LUN sizes must be a multiple of this
LUN_SUFFIX = ".img"
TMP_PREFIX = ".tmp-"
XATTR_ORIGIN = "user.csi-virtvol.origin"
XATTR_SOURCE = "user.csi-virtvol.source"
SYNC_ATTEMPTS = 3  # syncfs rounds before a full filesystem is believed
USAGE_TTL = 1.0    # seconds a cached usage total is trusted at most (see PoolDriver._usage)

_LUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SIZE = re.compile(r"\s*(\d+)\s*([KMGTP]i?)?[Bb]?\s*")
_UNITS = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


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
class Usage:
    apparent: int  # sum of LUN sizes
    reserved: int  # sum over LUNs of max(0, size - allocated)


class PoolDriver(abc.ABC):
    """Base of the drivers over ``<root>/luns/<id>.img``; not a driver by itself."""

    def __init__(self, spec: ArraySpec, *, kind: str, path_param: str, subdirs: tuple[str, ...] = ()) -> None:
        if spec.kind != kind:
            raise errors.InvalidRequest(f"array {spec.id}: kind {spec.kind!r} is not {kind!r}")
        path = spec.params.get(path_param, "")
        if not path:
            raise errors.InvalidRequest(f"array {spec.id}: params.{path_param} is required")
        self._kind = kind
        self._spec = spec
        self._root = os.path.abspath(path)
        self._luns = os.path.join(self._root, "luns")
        self._cap = parse_size(spec.params["capacity"]) if spec.params.get("capacity") else None
        self._probed: Ability | None = None
        self._identity: ArrayIdentity | None = None
        # (luns/ stamp, monotonic time of the scan, usage): see _usage
        self._usage_cache: tuple[tuple[int, int, int], float, Usage] | None = None
        self._usage_mutex = threading.Lock()
        self._usage_gen = 0  # bumped by every _mutate: a scan that overlapped one is not kept
        try:
            if not os.path.isdir(self._root):
                logger.info("array %s: creating pool directory %s", spec.id, self._root)
            for d in (self._luns, *(os.path.join(self._root, s) for s in subdirs)):
                os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise errors.BackendUnavailable(f"array {spec.id}: cannot use {self._root}: {e}") from e

    # ---- what a subclass supplies -----------------------------------------------------------

    @abc.abstractmethod
    def _lun(self, lun_id: str, *, path: str, st: os.stat_result) -> Lun:
        """Each driver says."""

    def _lun_size(self, path: str, st: os.stat_result) -> int:
        return st.st_size

    @abc.abstractmethod
    def _probe_abilities(self) -> Ability:
        """Each driver says."""

    @abc.abstractmethod
    def _read_identity(self) -> ArrayIdentity:
        """Each driver says."""

    def _probe(self) -> Ability:
        if self._probed is None:
            self._probed = self._probe_abilities()
            logger.info("array %s: probed %s on %s", self._spec.id, self._probed.names(), self._root)
        return self._probed

    def _get_identity(self) -> ArrayIdentity:
        if self._identity is None:
            self._identity = self._read_identity()
        return self._identity

    # ---- shared ArrayDriver parts --------------------------------------------------------------

    @property
    def spec(self) -> ArraySpec:
        return self._spec

    def describe(self) -> ArrayInfo:
        probed = self._probe()
        total, free = self._capacity()
        return ArrayInfo(
            id=self._spec.id, kind=self._kind, identity=self._get_identity(), probed=probed,
            abilities=probed, capacity_total=total, capacity_free=free,
            labels=dict(self._spec.labels), topology=dict(self._spec.topology),
        )

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
        return self._lun(lun_id, path=path, st=st)

    def list_luns(self) -> list[Lun]:
        return sorted((self._lun(i, path=p, st=st) for i, p, st in self._scan()), key=lambda lun: lun.id)

    # ---- skeletons -----------------------------------------------------------------------------

    def _create(self, *, name: str, size: int, make: Callable[[LunId], None]) -> Lun:
        """create_lun: `make` builds a new LUN `name` of `size` bytes, called under
        the lock once the name is free and the room is there."""
        lun_id = self._check_name(name)
        self._check_size(size)
        with self._locked():
            existing = self.get_lun(lun_id=lun_id)
            if existing is not None:
                return self._same_or_conflict(existing, size=size)
            self._check_room(apparent=size, reserve=size)
            make(lun_id)
        logger.info("array %s: created LUN %s (%d bytes)", self._spec.id, lun_id, size)
        return self._lun_or_fail(lun_id)

    def _grow(self, *, lun_id: LunId, size: int, apply: Callable[[Lun], None]) -> Lun:
        """resize_lun: `apply` grows `lun` to `size`, called under the lock once
        the growth is checked and the room is there."""
        self._check_size(size)
        with self._locked():
            lun = self._require_lun(lun_id)
            if size < lun.size:
                raise errors.InvalidRequest(
                    f"array {self._spec.id}: LUN {lun_id} is {lun.size} bytes; cannot shrink to {size}")
            if size == lun.size:
                return lun
            grow = size - lun.size
            self._check_room(apparent=grow, reserve=grow)
            apply(lun)
        logger.info("array %s: grew LUN %s to %d bytes", self._spec.id, lun_id, size)
        return self._lun_or_fail(lun_id)

    def _resize_file(self, path: str, *, size: int, lun_id: LunId) -> None:
        """Set an image file's length (durably): how file-backed LUNs grow."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise errors.BackendError(f"array {self._spec.id}: grow {lun_id}: {e}") from e

    def _copy_begin(self, *, source: LunId, lun_id: LunId) -> tuple[Lun, Lun | None]:
        """Under the lock, before an internal copy: (the source, the finished copy
        when `lun_id` already is one of the source's size)."""
        src = self._require_lun(source)
        existing = self.get_lun(lun_id=lun_id)
        if existing is None:
            return src, None
        if existing.id == src.id:
            raise errors.InvalidRequest(f"array {self._spec.id}: cannot copy {source} onto itself")
        return src, self._same_or_conflict(existing, size=src.size)

    # ---- names, sizes, files -------------------------------------------------------------------

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
        return same_or_conflict(self._spec.id, existing, size=size)

    def _require_lun(self, lun_id: LunId) -> Lun:
        lun = self.get_lun(lun_id=lun_id)
        if lun is None:
            raise errors.NotFound(f"array {self._spec.id}: no LUN {lun_id}")
        return lun

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

    def _unlink_lun(self, lun_id: str) -> bool:
        """Remove the LUN's file; False when it was not there."""
        try:
            os.unlink(self._path(lun_id))
        except FileNotFoundError:
            return False
        except OSError as e:
            raise errors.BackendError(f"array {self._spec.id}: delete {lun_id}: {e}") from e
        return True

    def _create_error(self, e: OSError, lun_id: str, *, reflink: bool = False) -> errors.VirtvolError:
        """The domain error for an OSError met while building LUN `lun_id`."""
        if isinstance(e, FileExistsError):
            return errors.Conflict(f"array {self._spec.id}: LUN {lun_id} appeared concurrently")
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return errors.CapacityExceeded(f"array {self._spec.id}: {lun_id}: {e}")
        if reflink and e.errno in (errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
            return errors.UnsupportedCapability(f"array {self._spec.id}: filesystem cannot reflink ({e})")
        return errors.BackendError(f"array {self._spec.id}: create {lun_id}: {e}")

    def _publish(self, tmp: str, lun_id: str) -> None:
        """Link a finished temp file under the LUN's name.  link(2) fails with
        EEXIST instead of replacing, so two racing creators cannot overwrite each other."""
        try:
            os.link(tmp, self._path(lun_id))
        except OSError as e:
            raise self._create_error(e, lun_id) from e

    # ---- capacity ------------------------------------------------------------------------------

    # Drivers whose every change of the LUN files goes through `_mutate` set this: then `_usage`
    # is served from a cache instead of a stat of every LUN file (O(LUNs) per create otherwise).
    _usage_cacheable = False

    def _luns_stamp(self) -> tuple[int, int, int]:
        """(mtime, ctime) of ``luns/`` in ns and the filesystem's free blocks.  Any entry made
        or removed in ``luns/`` changes the first two (kernels since 6.13 give a fine-grained
        timestamp to a change after a stat, so two changes in one clock tick still differ);
        any block allocated or freed inside a LUN file (a writer filling a hole, a discard
        punching one) changes the third."""
        try:
            st = os.stat(self._luns)
            vfs = os.statvfs(self._luns)
        except OSError as e:
            raise errors.BackendUnavailable(f"array {self._spec.id}: stat {self._luns}: {e}") from e
        return st.st_mtime_ns, st.st_ctime_ns, vfs.f_bfree

    def _usage(self) -> Usage:
        """The pool's usage.  Where `_usage_cacheable`, the last scan is reused while the
        stamp (`_luns_stamp`) is unchanged and the scan is younger than USAGE_TTL; this
        process's own changes adjust it exactly (`_mutate`).  A filesystem that is busy
        elsewhere changes its free blocks all the time and so simply gets a scan per call,
        as without the cache."""
        if not self._usage_cacheable:
            return self._scan_usage()
        stamp = self._luns_stamp()
        with self._usage_mutex:
            c = self._usage_cache
            if c is not None and c[0] == stamp and time.monotonic() - c[1] < USAGE_TTL:
                return c[2]
            gen = self._usage_gen
        taken = time.monotonic()
        usage = self._scan_usage()
        with self._usage_mutex:
            if gen == self._usage_gen:
                self._usage_cache = (stamp, taken, usage)
        return usage

    def _mutate(self, change: Callable[[], tuple[int, int] | None]) -> None:
        """Run `change`, a change of the LUN files that returns how much it added to the
        usage (apparent, reserved), or None when it cannot say; keep the cached usage in step.
        This process's changes run one at a time here, so the cache is adjusted only when it
        was current right before the change, i.e. no other process changed ``luns/`` since."""
        with self._usage_mutex:
            self._usage_gen += 1
            before = self._luns_stamp()
            try:
                delta = change()
            except BaseException:
                self._usage_cache = None
                raise
            c = self._usage_cache
            if delta is None or c is None or c[0] != before:
                self._usage_cache = None
                return
            self._usage_cache = (self._luns_stamp(), c[1], Usage(
                apparent=c[2].apparent + delta[0], reserved=c[2].reserved + delta[1]))

    def _scan_usage(self) -> Usage:
        apparent = reserved = 0
        for _, path, st in self._scan():
            size = self._lun_size(path, st)
            apparent += size
            reserved += max(0, size - st.st_blocks * 512)
        return Usage(apparent=apparent, reserved=reserved)

    def _capacity(self) -> tuple[int, int]:
        try:
            vfs = os.statvfs(self._root)
        except OSError as e:
            raise errors.BackendUnavailable(f"array {self._spec.id}: statvfs {self._root}: {e}") from e
        usage = self._usage()
        total = vfs.f_blocks * vfs.f_frsize
        if self._cap is not None:
            total = min(total, self._cap)
        return total, self._free(usage, vfs.f_bavail * vfs.f_frsize - usage.reserved)

    def _copy_cost(self, *, size: int, apparent: int, reserve: int) -> CopyCost:
        """What a copy that `_check_room(apparent=, reserve=)` would be asked about costs,
        as numbers, before anything is made; `size` is the copy's LUN size (what it
        counts against the capacity cap once it exists)."""
        usage = self._usage()
        fs_free = self._fs_unpromised(usage)
        if reserve > fs_free:  # deleted files' blocks may still be on their way back
            self._syncfs()
            fs_free = self._fs_unpromised(usage)
        room = fs_free
        if self._cap is not None and apparent:
            room = min(room, self._cap - usage.apparent)
        free_now = self._free(usage, fs_free)
        free_after = self._free(Usage(apparent=usage.apparent + size, reserved=usage.reserved + reserve),
                                fs_free - reserve)
        return CopyCost(needs=reserve, room=max(0, room), takes=max(0, free_now - free_after))

    def _fs_unpromised(self, usage: Usage) -> int:
        try:
            vfs = os.statvfs(self._root)
        except OSError as e:
            raise errors.BackendUnavailable(f"array {self._spec.id}: statvfs {self._root}: {e}") from e
        return vfs.f_bavail * vfs.f_frsize - usage.reserved

    def _free(self, usage: Usage, fs_free: int) -> int:
        free = fs_free
        if self._cap is not None:
            free = min(free, self._cap - usage.apparent)
        return max(0, free)

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
            if libc().syncfs(fd) != 0:
                logger.debug("array %s: syncfs: %s", self._spec.id, os.strerror(ctypes.get_errno()))
        finally:
            os.close(fd)

    # ---- locking -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with flock.exclusive(os.path.join(self._root, ".lock"), what=f"array {self._spec.id}"):
            yield

    def _fsync_dir(self) -> None:
        fd = os.open(self._luns, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """libc with fallocate(2) and syncfs(2) typed."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        lib.fallocate.restype = ctypes.c_int
        lib.syncfs.argtypes = [ctypes.c_int]
        lib.syncfs.restype = ctypes.c_int
        _libc = lib
    return _libc
