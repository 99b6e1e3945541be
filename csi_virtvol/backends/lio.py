"""The LIO driver: an array is one iSCSI target of the Linux kernel's SCSI target (LIO).

``spec.params``:

    iqn          the target's IQN (required), e.g. ``iqn.2003-01.org.example:array-a``
    pool         directory of the LUN images (required; made when missing); its
                 filesystem must take user xattrs (ext4, XFS, btrfs; tmpfs >= 6.6)
    portal       where the target listens, ``host:port`` (default ``127.0.0.1:3260``)
    emulate_3pc  ``"false"`` clears the 3PC bit (EXTENDED COPY) on every LUN of the
                 target (default true: LIO's own default)
    capacity     optional cap on the sum of LUN sizes (as for the file pool)

Layout: ``<pool>/luns/<id>.img`` is one LUN (the `_pool.PoolDriver` layout: origin
mark, capacity accounting, names); each image is put on a loop device, the loop
device is an ``iblock`` backstore, and the backstore is LUN *n* of the target's
TPG 1.  A LUN's number is kept in the image's xattr ``user.csi-virtvol.lio-lun``
and the initiators granted access in ``user.csi-virtvol.lio-acl``, so the LIO
configuration, which the kernel forgets on reboot, is rebuilt from the images
when the driver opens the array (a discovered image gets the lowest free number).
`Lun.address` is ``iscsi://<portal>/<iqn>/<n>`` (csi_virtvol.transport.iscsi).
LUN 0 is the array's own probe LUN (``<pool>/.probe.img``, 1 MiB, never listed).

Why a loop device and ``iblock`` rather than a ``fileio`` backstore on the image:
fileio fixes a regular file's size when the backstore is enabled, so a LUN could
not grow online; iblock reads its block device's size on every READ CAPACITY, so
``truncate`` + ``losetup -c`` grows a LUN under a live session.

Why configfs (``/sys/kernel/config/target``) directly and not rtslib-fb: rtslib is
importable only by Debian's /usr/bin/python3, so it would cost one interpreter
start (with its imports; seconds under emulation) per operation, outside the
package's type checking; the handful of configfs steps used here (mkdir, a
symlink, writing ``control``/``enable``/attributes) are LIO's stable user ABI, the
one rtslib itself writes.  rtslib and targetcli see what this driver builds.

Access: the TPG runs with ``generate_node_acls=0``: an initiator sees exactly the
LUNs mapped into its node ACL (`grant_access` / `revoke_access`,
HostAccessCapable).  The driver's own host reaches LUNs over iSCSI too:
`open_path` grants this host's initiator, logs in and returns ``/dev/sdX``.

Abilities come from the LUN itself: standard SCSI INQUIRY (``sg_inq``) on the
probe LUN gives the identity (vendor ``LIO-ORG``, product ``IBLOCK``, revision)
and the 3PC bit.  GROW_LUN always; INTERNAL_COPY when 3PC is set (and
``sg_xcopy`` is installed): `copy_lun_internal` makes a LUN of the source's size
and has the target copy into it by EXTENDED COPY (``sg_xcopy``) between the two
LUNs, both attached here.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from csi_virtvol import errors
from csi_virtvol.backends._pool import (LUN_SUFFIX, TMP_PREFIX, XATTR_ORIGIN, XATTR_SOURCE, PoolDriver, libc,
                                        valid_lun_id)
from csi_virtvol.model.array import Ability, ArrayIdentity, ArraySpec, CopyCost, Lun, LunOrigin
from csi_virtvol.model.ids import LunId
from csi_virtvol.transport import iscsi, sysfs

logger = logging.getLogger(__name__)

KIND = "lio"
TARGET_ROOT = "/sys/kernel/config/target"
HBA = "iblock_0"
TPG = "tpgt_1"
PORT_LINK = "virtvol"      # name of the symlinks this driver makes inside LUN dirs
SO_PREFIX = "virtvol-"
PROBE_LUN = 0
PROBE_SIZE = 2**20
MAX_LUN = 16383
XATTR_LUN = "user.csi-virtvol.lio-lun"
XATTR_ACL = "user.csi-virtvol.lio-acl"
XATTR_COPYING = "user.csi-virtvol.copying"   # set while an EXTENDED COPY fills the LUN
XCOPY_MAX_SEGMENT = 16 * 2**20  # bytes per EXTENDED COPY segment LIO takes
COMMAND_TIMEOUT = 600.0
MODULES = ("target_core_mod", "target_core_iblock", "iscsi_target_mod")
BLKFLSBUF = 0x1261
_PUNCH_HOLE = 0x02
_KEEP_SIZE = 0x01

_INITIATOR = re.compile(r"(iqn\.\d{4}-\d{2}\.[A-Za-z0-9.:_-]+|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})")


@dataclass(frozen=True, slots=True, kw_only=True)
class Inquiry:
    """What the standard INQUIRY data of a LUN says."""

    vendor: str
    product: str
    revision: str
    tpc: bool  # 3PC: the LUN takes EXTENDED COPY

    @property
    def identity(self) -> ArrayIdentity:
        return ArrayIdentity(vendor=self.vendor, model=self.product, version=self.revision)


def parse_inquiry(text: str) -> Inquiry:
    """`sg_inq DEVICE` output -> Inquiry (fields trimmed of INQUIRY's padding)."""
    def field(label: str) -> str:
        m = re.search(rf"^\s*{label}:[ \t]*(.*?)[ \t]*$", text, re.MULTILINE)
        return m.group(1) if m else ""
    tpc = re.search(r"\b3PC=([01])\b", text)
    vendor = field("Vendor identification")
    if not vendor or tpc is None:
        raise errors.BackendError(f"cannot read standard INQUIRY data from: {text[:300]!r}")
    return Inquiry(vendor=vendor, product=field("Product identification"),
                   revision=field("Product revision level"), tpc=tpc.group(1) == "1")


def _bool_param(spec: ArraySpec, key: str, default: bool) -> bool:
    raw = spec.params.get(key, "")
    if not raw:
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise errors.InvalidRequest(f"array {spec.id}: params.{key} is not a boolean: {raw!r}")


class LioDriver(PoolDriver):
    """An ArrayDriver (InternalCopyCapable, HostAccessCapable) over one LIO iSCSI target."""

    def __init__(self, spec: ArraySpec) -> None:
        iqn = spec.params.get("iqn", "")
        if not _INITIATOR.fullmatch(iqn) or not iqn.startswith("iqn."):
            raise errors.InvalidRequest(f"array {spec.id}: params.iqn {iqn!r} is not an iSCSI qualified name")
        host, port = iscsi.split_portal(spec.params.get("portal", "127.0.0.1:3260"))
        self._iqn = iqn
        self._portal = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._emulate_3pc = _bool_param(spec, "emulate_3pc", True)
        self._mutex = threading.RLock()
        self._depth = 0
        self._inq: Inquiry | None = None
        super().__init__(spec, kind=KIND, path_param="pool")
        self._tpg = os.path.join(TARGET_ROOT, "iscsi", self._iqn, TPG)
        with self._locked():
            self._ensure_target()
            for lun_id, path, _ in list(self._scan()):
                self._export(lun_id, path)

    # ---- ArrayDriver ---------------------------------------------------------------------

    def create_lun(self, *, name: str, size: int) -> Lun:
        return self._create(name=name, size=size, make=lambda lun_id: self._materialise(lun_id, size=size))

    def delete_lun(self, *, lun_id: LunId) -> None:
        if not valid_lun_id(lun_id):
            return
        with self._locked():
            path = self._path(lun_id)
            if not os.path.isfile(path):
                return
            number = _get_int_xattr(path, XATTR_LUN)
            if number is not None:
                iscsi.detach(self._address(number))  # this host's own device of it, if any
                self._unexport(number, path)
            self._unlink_lun(lun_id)
            self._fsync_dir()
        logger.info("array %s: deleted LUN %s", self._spec.id, lun_id)

    def resize_lun(self, *, lun_id: LunId, size: int) -> Lun:
        def apply(lun: Lun) -> None:
            path = self._path(lun.id)
            self._resize_file(path, size=size, lun_id=lun_id)
            self._run(["losetup", "-c", self._loop_of(path, create=True)], what=f"grow the loop of {lun_id}")
            if iscsi.device_of(lun.address):
                iscsi.attach(lun.address)  # rescan this host's device of it
        return self._grow(lun_id=lun_id, size=size, apply=apply)

    def wipe_lun(self, *, lun_id: LunId) -> None:
        """Punch the whole image out (its holes read as zeros); write zeros where the
        filesystem cannot.  The loop device reads through the image's page cache,
        which the punch updates, so LIO serves zeros at once; this host's own
        device of the LUN forgets what it cached."""
        lun = self._require_lun(lun_id)
        path = self._path(lun_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                if lun.size and libc().fallocate(fd, _PUNCH_HOLE | _KEEP_SIZE, 0, lun.size) != 0:
                    zeros = bytes(2**20)
                    for off in range(0, lun.size, len(zeros)):
                        os.pwrite(fd, zeros[: min(len(zeros), lun.size - off)], off)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise errors.BackendError(f"array {self._spec.id}: wipe {lun_id}: {e}") from e
        local = iscsi.device_of(lun.address)
        if local:
            _drop_cache(local)
        logger.info("array %s: wiped LUN %s", self._spec.id, lun_id)

    def open_path(self, *, lun_id: LunId) -> str:
        """The LUN as a block device of this host, over iSCSI (this host's
        initiator is granted the LUN first)."""
        lun = self._require_lun(lun_id)
        self.grant_access(lun_id=lun_id, initiator=iscsi.initiator_name())
        return iscsi.attach(lun.address)

    # ---- InternalCopyCapable ----------------------------------------------------------------

    def internal_copy_cost(self, *, source: LunId) -> CopyCost:
        """EXTENDED COPY into a new LUN of the source's size: counted like a new LUN."""
        src = self._require_lun(source)
        return self._copy_cost(size=src.size, apparent=src.size, reserve=src.size)

    def copy_lun_internal(self, *, source: LunId, name: str) -> Lun:
        """A new LUN `name` of the source's size, filled by the target itself with
        EXTENDED COPY between the two LUNs.  Idempotent by name; a copy that was
        interrupted (its LUN still marked) is run again."""
        lun_id = self._check_name(name)
        if Ability.INTERNAL_COPY not in self._probe():
            raise errors.UnsupportedCapability(f"array {self._spec.id}: the target's LUNs do not have 3PC")
        with self._locked():
            src, done = self._copy_begin(source=source, lun_id=lun_id)
            if done is not None and _get_xattr(self._path(lun_id), XATTR_COPYING) is None:
                return done
            if done is None:
                self._check_room(apparent=src.size, reserve=src.size)
                self._materialise(lun_id, size=src.size, source=source)
            dst = self._lun_or_fail(lun_id)
            me = iscsi.initiator_name()
            self.grant_access(lun_id=src.id, initiator=me)
            self.grant_access(lun_id=lun_id, initiator=me)
            src_dev = iscsi.attach(src.address)
            dst_dev = iscsi.attach(dst.address)
            _flush(src_dev)
            self._xcopy(src_dev, dst_dev, what=f"copy {source} to {lun_id}")
            _drop_cache(dst_dev)
            _remove_xattr(self._path(lun_id), XATTR_COPYING)
        logger.info("array %s: EXTENDED COPY of LUN %s -> %s (%d bytes)", self._spec.id, source, lun_id, src.size)
        return self._lun_or_fail(lun_id)

    # ---- HostAccessCapable --------------------------------------------------------------------

    def grant_access(self, *, lun_id: LunId, initiator: str) -> None:
        """Map the LUN (at its own number) into `initiator`'s node ACL; idempotent."""
        _check_initiator(initiator)
        with self._locked():
            lun = self._require_lun(lun_id)
            path = self._path(lun.id)
            acl = _acl_list(path)
            if initiator not in acl:
                _set_xattr(path, XATTR_ACL, "\n".join([*acl, initiator]))
            self._map(initiator, _lun_number(lun.address))
        logger.info("array %s: granted %s LUN %s", self._spec.id, initiator, lun_id)

    def revoke_access(self, *, lun_id: LunId, initiator: str) -> None:
        """Unmap the LUN from `initiator`'s node ACL; idempotent (a missing LUN too).
        The node ACL itself stays (empty), so a session of that initiator to
        other LUNs of the target is not cut."""
        _check_initiator(initiator)
        if not valid_lun_id(lun_id):
            return
        with self._locked():
            path = self._path(lun_id)
            if not os.path.isfile(path):
                return
            acl = _acl_list(path)
            if initiator in acl:
                _set_xattr(path, XATTR_ACL, "\n".join(a for a in acl if a != initiator))
            number = _get_int_xattr(path, XATTR_LUN)
            if number is not None:
                self._unmap(initiator, number)
        logger.info("array %s: revoked %s LUN %s", self._spec.id, initiator, lun_id)

    def initiators(self, *, lun_id: LunId) -> list[str]:
        """The initiators granted the LUN (as recorded with the image)."""
        lun = self._require_lun(lun_id)
        return _acl_list(self._path(lun.id))

    # ---- PoolDriver hooks --------------------------------------------------------------------

    def _lun(self, lun_id: str, *, path: str, st: os.stat_result) -> Lun:
        number = _get_int_xattr(path, XATTR_LUN)
        if number is None or not os.path.isdir(os.path.join(self._tpg, "lun", f"lun_{number}")):
            number = self._export(lun_id, path)
        return Lun(array=self._spec.id, id=LunId(lun_id), size=st.st_size, address=self._address(number),
                   origin=self._origin(path))

    def _probe_abilities(self) -> Ability:
        found = Ability.GROW_LUN
        if self._inquiry().tpc:
            if shutil.which("sg_xcopy"):
                found |= Ability.INTERNAL_COPY
            else:
                logger.warning("array %s: LUNs have 3PC but sg_xcopy (sg3-utils) is missing", self._spec.id)
        return found

    def _read_identity(self) -> ArrayIdentity:
        return self._inquiry().identity

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The pool's flock, re-entrant within this driver (the export of a LUN
        happens on first sight, also from inside create and copy)."""
        with self._mutex:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with super()._locked():
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0

    # ---- INQUIRY ------------------------------------------------------------------------------

    def _inquiry(self) -> Inquiry:
        """Standard INQUIRY of the probe LUN, through this host's initiator."""
        if self._inq is None:
            probe = os.path.join(self._root, ".probe.img")
            with self._locked():
                if not os.path.exists(probe):
                    with open(probe, "wb") as f:
                        f.truncate(PROBE_SIZE)
                self._export_at(probe, PROBE_LUN)
                self._map(iscsi.initiator_name(), PROBE_LUN)
            dev = iscsi.attach(self._address(PROBE_LUN))
            self._inq = parse_inquiry(self._run(["sg_inq", dev], what="INQUIRY of the probe LUN"))
            logger.info("array %s: INQUIRY %s/%s/%s 3PC=%d", self._spec.id, self._inq.vendor,
                        self._inq.product, self._inq.revision, self._inq.tpc)
        return self._inq

    def _xcopy(self, src: str, dst: str, *, what: str) -> None:
        if not os.path.isdir("/sys/module/sg"):  # sg_xcopy issues the command through /dev/sgN
            self._run(["modprobe", "sg"], what="load the SCSI generic driver")
        block = _logical_block_size(src)
        bpt = max(1, min(65535, XCOPY_MAX_SEGMENT // block))
        count = _device_bytes(src) // block
        # the sg nodes, not the disks: given a disk, sg_xcopy looks for the udev link /dev/block/M:m
        self._run(["sg_xcopy", f"if={_sg_of(src)}", f"of={_sg_of(dst)}", f"bs={block}", f"bpt={bpt}",
                   f"count={count}"], what=what)

    # ---- LIO configuration ----------------------------------------------------------------------

    def _address(self, number: int) -> str:
        return iscsi.format_address(portal=self._portal, iqn=self._iqn, lun=number)

    def _ensure_target(self) -> None:
        if not all(os.path.isdir(f"/sys/module/{m}") for m in MODULES) or not os.path.isdir(
                os.path.join(TARGET_ROOT, "core")):
            try:
                self._run(["modprobe", "-a", *MODULES], what="load the LIO modules")
            except errors.BackendError as e:
                raise errors.BackendUnavailable(f"array {self._spec.id}: no LIO target here: {e}") from e
        if not os.path.isdir(os.path.join(TARGET_ROOT, "core")):
            raise errors.BackendUnavailable(f"array {self._spec.id}: {TARGET_ROOT} is not there (configfs?)")
        _mkdir(os.path.join(TARGET_ROOT, "core", HBA))
        fresh = not os.path.isdir(self._tpg)
        _mkdir(self._tpg)
        for key, value in (("authentication", "0"), ("generate_node_acls", "0"),
                           ("demo_mode_write_protect", "1")):
            _write_if_differs(os.path.join(self._tpg, "attrib", key), value)
        _mkdir(os.path.join(self._tpg, "np", self._portal))
        _write_if_differs(os.path.join(self._tpg, "enable"), "1")
        if fresh:
            logger.info("array %s: made LIO target %s on %s", self._spec.id, self._iqn, self._portal)

    def _export(self, lun_id: str, path: str) -> int:
        """Make image `path` LUN n of the TPG (n from its xattr, else the lowest
        free one) with its ACL mappings; idempotent.  Returns n."""
        with self._locked():
            number = _get_int_xattr(path, XATTR_LUN)
            if number is None or self._taken_by_other(number, path):
                number = self._free_number()
                _set_xattr(path, XATTR_LUN, str(number))
                logger.info("array %s: LUN %s gets number %d", self._spec.id, lun_id, number)
            self._export_at(path, number)
            for initiator in _acl_list(path):
                self._map(initiator, number)
            return number

    def _export_at(self, path: str, number: int) -> None:
        so = self._storage_object(path)
        if not os.path.isdir(so):
            loop = self._loop_of(path, create=True)
            _mkdir(so)
            _write(os.path.join(so, "control"), f"udev_path={loop}")
            _write(os.path.join(so, "udev_path"), loop)
            _write(os.path.join(so, "wwn", "vpd_unit_serial"), _serial(path))
            _write(os.path.join(so, "enable"), "1")
        _write_if_differs(os.path.join(so, "attrib", "emulate_3pc"), "1" if self._emulate_3pc else "0")
        lun_dir = os.path.join(self._tpg, "lun", f"lun_{number}")
        _mkdir(lun_dir)
        if not _links_in(lun_dir):
            _symlink(so, os.path.join(lun_dir, PORT_LINK))

    def _unexport(self, number: int, path: str) -> None:
        for mapped in glob.glob(os.path.join(self._tpg, "acls", "*", f"lun_{number}")):
            _remove_lun_dir(mapped)
        lun_dir = os.path.join(self._tpg, "lun", f"lun_{number}")
        if os.path.isdir(lun_dir) and os.path.realpath(self._storage_object(path)) in _links_in(lun_dir):
            _remove_lun_dir(lun_dir)
        so = self._storage_object(path)
        loop = _read(os.path.join(so, "udev_path"))
        with contextlib.suppress(FileNotFoundError):
            _rmdir(so)
        if loop.startswith("/dev/loop"):
            with contextlib.suppress(errors.BackendError):
                self._run(["losetup", "-d", loop], what=f"detach {loop}")

    def _map(self, initiator: str, number: int) -> None:
        acl = os.path.join(self._tpg, "acls", initiator)
        _mkdir(acl)
        mapped = os.path.join(acl, f"lun_{number}")
        _mkdir(mapped)
        if not _links_in(mapped):
            _symlink(os.path.join(self._tpg, "lun", f"lun_{number}"), os.path.join(mapped, PORT_LINK))

    def _unmap(self, initiator: str, number: int) -> None:
        mapped = os.path.join(self._tpg, "acls", initiator, f"lun_{number}")
        if os.path.isdir(mapped):
            _remove_lun_dir(mapped)

    def _storage_object(self, path: str) -> str:
        digest = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:20]
        return os.path.join(TARGET_ROOT, "core", HBA, SO_PREFIX + digest)

    def _taken_by_other(self, number: int, path: str) -> bool:
        if number == PROBE_LUN or not 0 < number <= MAX_LUN:
            return True
        links = _links_in(os.path.join(self._tpg, "lun", f"lun_{number}"))
        return bool(links) and os.path.realpath(self._storage_object(path)) not in links

    def _free_number(self) -> int:
        used = {PROBE_LUN}
        for _, other, _ in self._scan():
            n = _get_int_xattr(other, XATTR_LUN)
            if n is not None:
                used.add(n)
        for d in glob.glob(os.path.join(self._tpg, "lun", "lun_*")):
            with contextlib.suppress(ValueError):
                used.add(int(os.path.basename(d)[4:]))
        for n in range(1, MAX_LUN + 1):
            if n not in used:
                return n
        raise errors.CapacityExceeded(f"array {self._spec.id}: all {MAX_LUN} LUN numbers are taken")

    def _loop_of(self, path: str, *, create: bool) -> str:
        real = os.path.realpath(path)
        for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
            if _read(backing) == real:
                return "/dev/" + backing.split("/")[3]
        if not create:
            return ""
        return self._run(["losetup", "-f", "--show", real], what=f"loop device for {real}").strip()

    # ---- files -------------------------------------------------------------------------------

    def _materialise(self, lun_id: LunId, *, size: int, source: str = "") -> None:
        """A sparse image, marked, linked into place (see filepool); a copy's
        image also carries the in-progress mark until its EXTENDED COPY is done."""
        tmp = os.path.join(self._luns, f"{TMP_PREFIX}{lun_id}-{uuid.uuid4().hex[:8]}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
                os.setxattr(fd, XATTR_ORIGIN, LunOrigin.PROVISIONED.value.encode())
                if source:
                    os.setxattr(fd, XATTR_SOURCE, source.encode())
                    os.setxattr(fd, XATTR_COPYING, source.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(tmp, lun_id)
        except OSError as e:
            raise self._create_error(e, lun_id) from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._fsync_dir()

    def _run(self, argv: Sequence[str], *, what: str) -> str:
        try:
            res = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=COMMAND_TIMEOUT, check=False)
        except FileNotFoundError as e:
            raise errors.BackendUnavailable(f"array {self._spec.id}: {argv[0]} is not installed") from e
        except subprocess.TimeoutExpired as e:
            raise errors.BackendError(f"array {self._spec.id}: {what}: timed out") from e
        if res.returncode != 0:
            msg = (res.stderr.strip() or res.stdout.strip()).replace("\n", "; ")
            raise errors.BackendError(f"array {self._spec.id}: {what}: {argv[0]} rc={res.returncode}: {msg}")
        return res.stdout


# ---- helpers --------------------------------------------------------------------------------

def _lun_number(address: str) -> int:
    return iscsi.parse_address(address).lun


def _check_initiator(initiator: str) -> None:
    if not _INITIATOR.fullmatch(initiator):
        raise errors.InvalidRequest(f"{initiator!r} is not an iSCSI initiator name")


def _serial(path: str) -> str:
    """A stable unit serial (the LUN's NAA designator derives from it)."""
    return str(uuid.UUID(hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32]))


def _get_xattr(path: str, name: str) -> str | None:
    try:
        return os.getxattr(path, name).decode()
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOENT, errno.ENOTSUP):
            return None
        raise errors.BackendError(f"getxattr {name} of {path}: {e}") from e


def _get_int_xattr(path: str, name: str) -> int | None:
    raw = _get_xattr(path, name)
    return int(raw) if raw and raw.isdigit() else None


def _set_xattr(path: str, name: str, value: str) -> None:
    try:
        os.setxattr(path, name, value.encode())
    except OSError as e:
        raise errors.BackendError(f"setxattr {name} of {path}: {e} (the pool needs user xattrs)") from e


def _remove_xattr(path: str, name: str) -> None:
    try:
        os.removexattr(path, name)
    except OSError as e:
        if e.errno != errno.ENODATA:
            raise errors.BackendError(f"removexattr {name} of {path}: {e}") from e


def _acl_list(path: str) -> list[str]:
    raw = _get_xattr(path, XATTR_ACL) or ""
    return [a for a in raw.split("\n") if a]


def _links_in(directory: str) -> set[str]:
    """The resolved targets of the symlinks in a configfs LUN directory."""
    try:
        names = os.listdir(directory)
    except OSError:
        return set()
    return {os.path.realpath(os.path.join(directory, n)) for n in names
            if os.path.islink(os.path.join(directory, n))}


def _remove_lun_dir(directory: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        for n in os.listdir(directory):
            if os.path.islink(os.path.join(directory, n)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, n))
    with contextlib.suppress(FileNotFoundError):
        _rmdir(directory)


def _mkdir(path: str) -> None:
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError as e:
        if e.errno == errno.ENOENT and not os.path.isdir(os.path.dirname(path)):
            _mkdir(os.path.dirname(path))
            _mkdir(path)
            return
        raise errors.BackendError(f"LIO configfs: mkdir {path}: {e}") from e


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise errors.BackendError(f"LIO configfs: rmdir {path}: {e}") from e


def _symlink(target: str, link: str) -> None:
    try:
        os.symlink(target, link)
    except FileExistsError:
        pass
    except OSError as e:
        raise errors.BackendError(f"LIO configfs: link {link} -> {target}: {e}") from e


_read = sysfs.read


def _write(path: str, value: str) -> None:
    try:
        sysfs.write(path, value)
    except FileNotFoundError as e:
        raise errors.BackendError(f"LIO configfs: write {value!r} to {path}: {e}") from e


def _write_if_differs(path: str, value: str) -> None:
    if _read(path) != value:
        _write(path, value)


def _logical_block_size(dev: str) -> int:
    name = os.path.basename(os.path.realpath(dev))
    raw = _read(f"/sys/class/block/{name}/queue/logical_block_size")
    return int(raw) if raw.isdigit() and int(raw) > 0 else 512


def _device_bytes(dev: str) -> int:
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _sg_of(dev: str) -> str:
    """The SCSI generic node (/dev/sgN) of disk `dev`."""
    name = os.path.basename(os.path.realpath(dev))
    deadline = time.monotonic() + 10.0
    while True:
        try:
            sg = sorted(os.listdir(f"/sys/class/block/{name}/device/scsi_generic"))
        except OSError:
            sg = []
        if sg and os.path.exists(f"/dev/{sg[0]}"):
            return f"/dev/{sg[0]}"
        if time.monotonic() > deadline:
            raise errors.BackendError(f"{dev} has no SCSI generic device (is the sg module there?)")
        time.sleep(0.05)


def _flush(dev: str) -> None:
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_cache(dev: str) -> None:
    """Forget this host's cached blocks of `dev` (the target wrote behind it).
    udev first: a write to a disk makes udev re-read it (its inotify watch), and a
    read in flight across the drop would put the old blocks back."""
    if os.path.exists("/run/udev/control"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["udevadm", "settle", "-t", "10"], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30, check=False)
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKFLSBUF, 0)
    except OSError as e:
        logger.warning("BLKFLSBUF %s: %s", dev, e)
    finally:
        os.close(fd)


__all__ = ["LioDriver", "KIND", "Inquiry", "parse_inquiry", "TARGET_ROOT", "PROBE_LUN", "XATTR_LUN",
           "XATTR_ACL", "LUN_SUFFIX"]
