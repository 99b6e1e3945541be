"""The LVM thin driver: an array is a thin pool of a volume group; LUNs are thin volumes.

``spec.params``:

    vg          the volume group (required; made by the administrator)
    pool        its thin pool (required; ``lvcreate -T VG/POOL``)
    overcommit  how many times the pool's data size may be handed out as
                virtual LUN size (optional float, default 1: no overcommit)
    lock_dir    where the driver's flock file lives (default /run/lock)

The node the VG lives on is the administrator's choice: put it into
``spec.topology`` (node-local arrays are what LVM gives).

LUN sizes must be whole multiples of the VG's extent size (LVM rounds
anything else up, and the LUN would then be bigger than asked for); make the
VG with ``vgcreate -s 1M`` or smaller so the core's MiB-aligned LUNs fit.

Every thin volume of the pool is a LUN; one the driver made carries the LV tag
``csi-virtvol.provisioned`` (set by the same ``lvcreate`` that makes it, so a
LUN has its mark from its first instant); any other is ``DISCOVERED``.
Volumes of the VG outside the pool are not this array's and are never touched.

Capacity is thick accounting over the pool: ``total = pool data size *
overcommit``, ``free = total - sum of the virtual sizes of its thin
volumes``.  Creating or growing a LUN past ``free`` is refused.  A thin
snapshot is not refused by that cap (it takes no space when made, like the
file pool's reflink), but its virtual size counts once it exists.

Abilities are probed: GROW_LUN always (``lvextend``), INTERNAL_COPY when the
kernel has the ``thin`` device-mapper target (thin snapshots:
``lvcreate -s VG/LV``, activated at once).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from csi_virtvol import errors
from csi_virtvol.transport import flock
from csi_virtvol.backends.base import same_or_conflict
from csi_virtvol.model.array import Ability, ArrayIdentity, ArrayInfo, ArraySpec, CopyCost, Lun, LunOrigin
from csi_virtvol.model.ids import LunId

logger = logging.getLogger(__name__)

KIND = "lvm"
VENDOR = "Linux"
MODEL = "lvm-thin"
TAG_PROVISIONED = "csi-virtvol.provisioned"
COMMAND_TIMEOUT = 120.0
DEVICE_WAIT_SECONDS = 10.0

_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1", "LC_ALL": "C"}
_LV_NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]{0,126}")
# LVM reserves these for its own hidden volumes (lib/misc/lvm-string.c)
_RESERVED_PREFIXES = ("snapshot", "pvmove")
_RESERVED_PARTS = ("_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_mimage", "_mlog", "_pmspare",
                   "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig")
_DM_NAME_MAX = 127
_VERSION = re.compile(r"LVM version:\s*([0-9][0-9.]*)")
_LV_FIELDS = ("lv_name,lv_size,lv_attr,pool_lv,origin,lv_tags,lv_path,lv_dm_path,lv_active,"
              "chunk_size,discards,vg_extent_size")


def valid_lv_name(name: str) -> bool:
    """A name LVM accepts for a thin volume and that cannot be mistaken for an
    option or one of LVM's hidden sub-volumes."""
    if not _LV_NAME.fullmatch(name) or name in (".", ".."):
        return False
    if name.startswith(_RESERVED_PREFIXES):
        return False
    return not any(part in name for part in _RESERVED_PARTS)


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name LVM gives VG/LV (dashes doubled, joined by one)."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def parse_lvm_version(text: str) -> str:
    """``LVM version:     2.03.16(2) (2022-05-18)`` -> ``2.03.16``."""
    m = _VERSION.search(text)
    return m.group(1).rstrip(".") if m else "unknown"


def thin_snapshot_cost(*, source_size: int, free: int) -> CopyCost:
    """A thin snapshot of a volume of `source_size` bytes in a pool with `free` bytes
    unprovisioned (thick accounting): made whatever `free` is, then counted at its
    virtual size, so later LUNs have that much less."""
    return CopyCost(needs=0, room=max(0, free), takes=min(source_size, max(0, free)))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Lv:
    name: str
    size: int
    attr: str
    pool: str
    origin: str
    tags: tuple[str, ...]
    path: str
    dm_path: str
    active: bool

    @property
    def is_thin_volume(self) -> bool:
        return self.attr.startswith("V")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Pool:
    size: int
    extent: int
    chunk: int
    discards: str


@dataclass(frozen=True, slots=True, kw_only=True)
class _Scan:
    """One `lvs` of the VG: the pool, its thin volumes, and every LV name in the VG."""

    pool: _Pool
    thin: dict[str, _Lv]
    names: frozenset[str]


class LvmThinDriver:
    """An ArrayDriver (and InternalCopyCapable) over one LVM thin pool."""

    def __init__(self, spec: ArraySpec) -> None:
        if spec.kind != KIND:
            raise errors.InvalidRequest(f"array {spec.id}: kind {spec.kind!r} is not {KIND!r}")
        vg = spec.params.get("vg", "")
        pool = spec.params.get("pool", "")
        if not vg or not pool:
            raise errors.InvalidRequest(f"array {spec.id}: params.vg and params.pool are required")
        if not _LV_NAME.fullmatch(vg) or not valid_lv_name(pool):
            raise errors.InvalidRequest(f"array {spec.id}: {vg!r}/{pool!r} is not a VG/LV name")
        try:
            self._overcommit = float(spec.params.get("overcommit", "1"))
        except ValueError as e:
            raise errors.InvalidRequest(f"array {spec.id}: params.overcommit is not a number") from e
        if not math.isfinite(self._overcommit) or self._overcommit <= 0:
            raise errors.InvalidRequest(f"array {spec.id}: params.overcommit must be > 0")
        self._spec = spec
        self._vg = vg
        self._pool = pool
        self._lock_path = os.path.join(spec.params.get("lock_dir", "/run/lock"),
                                       f"csi-virtvol-lvm-{dm_name(vg, pool)}.lock")
        self._probed: Ability | None = None
        self._identity: ArrayIdentity | None = None
        self._scan()  # fail early (BackendUnavailable) when the pool is not there

    # ---- ArrayDriver ---------------------------------------------------------------------

    @property
    def spec(self) -> ArraySpec:
        return self._spec

    def describe(self) -> ArrayInfo:
        probed = self._probe()
        scan = self._scan()
        total, free = self._capacity(scan.pool, scan.thin)
        return ArrayInfo(
            id=self._spec.id, kind=KIND, identity=self._get_identity(), probed=probed,
            abilities=probed, capacity_total=total, capacity_free=free,
            labels=dict(self._spec.labels), topology=dict(self._spec.topology),
        )

    def create_lun(self, *, name: str, size: int) -> Lun:
        self._check_name(name)
        with self._locked():
            scan = self._scan()
            self._check_size(size, scan.pool)
            if name in scan.thin:
                return self._same_or_conflict(self._lun(scan.thin[name]), size=size)
            self._check_free_name(scan, name)
            self._check_room(scan.pool, scan.thin, grow=size)
            self._lvm(["lvcreate", "-q", "--type", "thin", "-V", f"{size}b",
                       "--thinpool", f"{self._vg}/{self._pool}", "-n", name,
                       "--addtag", TAG_PROVISIONED, "-ay", "-kn"], what=f"create {name}")
        logger.info("array %s: created thin LUN %s/%s (%d bytes)", self._spec.id, self._vg, name, size)
        return self._made(name, size=size)

    def delete_lun(self, *, lun_id: LunId) -> None:
        if not valid_lv_name(lun_id):
            return
        with self._locked():
            if lun_id not in self._scan().thin:
                return  # missing, or not a thin volume of this pool: not ours to remove
            self._lvm(["lvremove", "-q", "-f", f"{self._vg}/{lun_id}"], what=f"delete {lun_id}")
        logger.info("array %s: deleted LUN %s/%s", self._spec.id, self._vg, lun_id)

    def get_lun(self, *, lun_id: LunId) -> Lun | None:
        if not valid_lv_name(lun_id):
            return None
        lv = self._scan().thin.get(lun_id)
        return None if lv is None else self._lun(lv)

    def list_luns(self) -> list[Lun]:
        return sorted((self._lun(lv) for lv in self._scan().thin.values()), key=lambda lun: lun.id)

    def resize_lun(self, *, lun_id: LunId, size: int) -> Lun:
        with self._locked():
            scan = self._scan()
            self._check_size(size, scan.pool)
            lv = scan.thin.get(lun_id) if valid_lv_name(lun_id) else None
            if lv is None:
                raise errors.NotFound(f"array {self._spec.id}: no LUN {lun_id}")
            if size < lv.size:
                raise errors.InvalidRequest(
                    f"array {self._spec.id}: LUN {lun_id} is {lv.size} bytes; cannot shrink to {size}")
            if size == lv.size:
                return self._lun(lv)
            self._check_room(scan.pool, scan.thin, grow=size - lv.size)
            self._lvm(["lvextend", "-q", "-L", f"{size}b", f"{self._vg}/{lun_id}"], what=f"grow {lun_id}")
        logger.info("array %s: grew LUN %s/%s to %d bytes", self._spec.id, self._vg, lun_id, size)
        return self._lun(dataclasses.replace(lv, size=size))

    def wipe_lun(self, *, lun_id: LunId) -> None:
        """Unmap every chunk (reads back as zeros, frees pool space); where the pool
        ignores discards, or for a partial chunk at the end, write zeros instead."""
        scan = self._scan()
        lv = scan.thin.get(lun_id) if valid_lv_name(lun_id) else None
        if lv is None:
            raise errors.NotFound(f"array {self._spec.id}: no LUN {lun_id}")
        lun, pool = self._lun(lv), scan.pool
        dev = self._activated(lv)
        if pool.discards == "ignore":
            self._run(["blkdiscard", "-z", dev], what=f"zero {lun_id}")
        else:
            self._run(["blkdiscard", dev], what=f"discard {lun_id}")
            tail = lun.size % pool.chunk if pool.chunk else 0
            if tail:
                self._run(["blkdiscard", "-z", "-o", str(lun.size - tail), "-l", str(tail), dev],
                          what=f"zero the tail of {lun_id}")
        logger.info("array %s: wiped LUN %s/%s", self._spec.id, self._vg, lun_id)

    def open_path(self, *, lun_id: LunId) -> str:
        """The LUN's block device, activated (thin snapshots and volumes someone
        deactivated are activated here, ignoring the activation-skip flag)."""
        lv = self._scan().thin.get(lun_id) if valid_lv_name(lun_id) else None
        if lv is None:
            raise errors.NotFound(f"array {self._spec.id}: no LUN {lun_id}")
        return self._activated(lv)

    def _activated(self, lv: _Lv) -> str:
        lun_id = lv.name
        if not lv.active:
            self._lvm(["lvchange", "-q", "-ay", "-K", f"{self._vg}/{lun_id}"], what=f"activate {lun_id}")
        path = lv.path or f"/dev/{self._vg}/{lun_id}"
        mapper = lv.dm_path or f"/dev/mapper/{dm_name(self._vg, lun_id)}"
        deadline = time.monotonic() + DEVICE_WAIT_SECONDS
        while True:  # udev makes the nodes a little after LVM returns
            for candidate in (path, mapper):
                if os.path.exists(candidate):
                    return candidate
            if time.monotonic() > deadline:
                raise errors.BackendError(f"array {self._spec.id}: LUN {lun_id} is active but neither "
                                          f"{path} nor {mapper} appeared (is udev running?)")
            time.sleep(0.05)

    # ---- InternalCopyCapable ----------------------------------------------------------------

    def copy_lun_internal(self, *, source: LunId, name: str) -> Lun:
        """A thin snapshot of `source` named `name`, activated (no activation-skip
        flag): the point-in-time content, sharing chunks until either side writes.
        Idempotent by name: an existing `name` of the source's size is returned."""
        self._check_name(name)
        if Ability.INTERNAL_COPY not in self._probe():
            raise errors.UnsupportedCapability(f"array {self._spec.id}: no dm thin target for snapshots")
        with self._locked():
            scan = self._scan()
            src = scan.thin.get(source) if valid_lv_name(source) else None
            if src is None:
                raise errors.NotFound(f"array {self._spec.id}: no LUN {source}")
            if name in scan.thin:
                if name == source:
                    raise errors.InvalidRequest(f"array {self._spec.id}: cannot copy {source} onto itself")
                return self._same_or_conflict(self._lun(scan.thin[name]), size=src.size)
            self._check_free_name(scan, name)
            self._lvm(["lvcreate", "-q", "-s", f"{self._vg}/{source}", "-n", name,
                       "--addtag", TAG_PROVISIONED, "-kn", "-ay"], what=f"snapshot {source} as {name}")
        logger.info("array %s: thin snapshot %s/%s -> %s", self._spec.id, self._vg, source, name)
        return self._made(name, size=src.size)

    def internal_copy_cost(self, *, source: LunId) -> CopyCost:
        """A thin snapshot is never refused by the thick cap (needs nothing), but its
        virtual size counts against it once it exists."""
        scan = self._scan()
        src = scan.thin.get(source) if valid_lv_name(source) else None
        if src is None:
            raise errors.NotFound(f"array {self._spec.id}: no LUN {source}")
        _, free = self._capacity(scan.pool, scan.thin)
        return thin_snapshot_cost(source_size=src.size, free=free)

    # ---- internals ---------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if not valid_lv_name(name) or len(dm_name(self._vg, name)) > _DM_NAME_MAX:
            raise errors.InvalidRequest(
                f"array {self._spec.id}: LUN name {name!r} is not a usable LV name in VG {self._vg}")

    def _check_size(self, size: int, pool: _Pool) -> None:
        if size <= 0 or size % pool.extent:
            raise errors.OutOfRange(
                f"array {self._spec.id}: LUN size {size} must be a positive multiple of the "
                f"VG's extent size {pool.extent}")

    def _same_or_conflict(self, existing: Lun, *, size: int) -> Lun:
        return same_or_conflict(self._spec.id, existing, size=size)

    def _lun(self, lv: _Lv) -> Lun:
        origin = LunOrigin.PROVISIONED if TAG_PROVISIONED in lv.tags else LunOrigin.DISCOVERED
        return Lun(array=self._spec.id, id=LunId(lv.name), size=lv.size,
                   address=f"/dev/{self._vg}/{lv.name}", origin=origin)

    def _made(self, name: str, *, size: int) -> Lun:
        """The LUN `lvcreate` just made (without another `lvs`: it costs a second in a VM)."""
        return Lun(array=self._spec.id, id=LunId(name), size=size, address=f"/dev/{self._vg}/{name}",
                   origin=LunOrigin.PROVISIONED)

    def _check_free_name(self, scan: _Scan, name: str) -> None:
        if name in scan.names:  # the pool itself, or a volume outside the pool
            raise errors.AlreadyExists(
                f"array {self._spec.id}: VG {self._vg} has a logical volume {name} that is not a LUN here")

    def _capacity(self, pool: _Pool, lvs: dict[str, _Lv]) -> tuple[int, int]:
        total = int(pool.size * self._overcommit)
        total -= total % pool.extent
        used = sum(lv.size for lv in lvs.values())
        return total, max(0, total - used)

    def _check_room(self, pool: _Pool, lvs: dict[str, _Lv], *, grow: int) -> None:
        total, free = self._capacity(pool, lvs)
        if grow > free:
            raise errors.CapacityExceeded(
                f"array {self._spec.id}: needs {grow} bytes, thin pool {self._vg}/{self._pool} has "
                f"{free} of {total} unprovisioned (overcommit {self._overcommit:g})")

    def _scan(self) -> _Scan:
        """One `lvs` of the whole VG: the pool's geometry and its thin volumes."""
        try:
            rows = self._report("lvs", _LV_FIELDS, self._vg, key="lv")
        except errors.NotFound as e:
            raise errors.BackendUnavailable(f"array {self._spec.id}: volume group {self._vg}: {e}") from e
        pool: _Pool | None = None
        thin: dict[str, _Lv] = {}
        for row in rows:
            if row["lv_name"] == self._pool:
                if not row["lv_attr"].startswith("t"):
                    break
                pool = _Pool(size=int(row["lv_size"]), extent=int(row["vg_extent_size"]),
                             chunk=int(row["chunk_size"] or 0), discards=row["discards"])
                continue
            lv = _Lv(name=row["lv_name"], size=int(row["lv_size"]), attr=row["lv_attr"],
                     pool=row["pool_lv"], origin=row["origin"],
                     tags=tuple(t for t in row["lv_tags"].split(",") if t), path=row["lv_path"],
                     dm_path=row["lv_dm_path"], active=row["lv_active"] == "active")
            if lv.is_thin_volume and lv.pool == self._pool and valid_lv_name(lv.name):
                thin[lv.name] = lv
        if pool is None:
            raise errors.BackendUnavailable(
                f"array {self._spec.id}: {self._vg}/{self._pool} is not a thin pool")
        return _Scan(pool=pool, thin=thin, names=frozenset(row["lv_name"] for row in rows))

    def _report(self, command: str, fields: str, target: str, *, key: str) -> list[dict[str, str]]:
        out = self._lvm([command, "--reportformat", "json", "--units", "b", "--nosuffix",
                         "-o", fields, target], what=f"{command} {target}")
        try:
            doc = json.loads(out)
            rows: list[dict[str, str]] = []
            for report in doc["report"]:
                rows.extend(report.get(key, []))
            return rows
        except (ValueError, KeyError, TypeError) as e:
            raise errors.BackendError(f"array {self._spec.id}: cannot parse {command} output: {e}") from e

    def _lvm(self, argv: Sequence[str], *, what: str) -> str:
        return self._run(["lvm", *argv], what=what)

    def _run(self, argv: Sequence[str], *, what: str) -> str:
        try:
            res = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 env={**os.environ, **_ENV}, timeout=COMMAND_TIMEOUT, check=False)
        except FileNotFoundError as e:
            raise errors.BackendUnavailable(f"array {self._spec.id}: {argv[0]} is not installed") from e
        except subprocess.TimeoutExpired as e:
            raise errors.BackendError(f"array {self._spec.id}: {what}: timed out") from e
        if res.returncode == 0:
            return res.stdout
        msg = (res.stderr.strip() or res.stdout.strip()).replace("\n", "; ")
        low = msg.lower()
        text = f"array {self._spec.id}: {what}: {msg}"
        if "already exists" in low:
            raise errors.AlreadyExists(text)
        if "insufficient free space" in low or "out of data space" in low or "not enough" in low:
            raise errors.CapacityExceeded(text)
        if "failed to find" in low or "not found" in low:
            raise errors.NotFound(text)
        if "in use" in low or "is open" in low:
            raise errors.PreconditionFailed(text)
        raise errors.BackendError(text)

    def _probe(self) -> Ability:
        if self._probed is None:
            found = Ability.GROW_LUN
            if "thin" in self._dm_targets():
                found |= Ability.INTERNAL_COPY
            self._probed = found
            logger.info("array %s: probed %s on thin pool %s/%s", self._spec.id, found.names(),
                        self._vg, self._pool)
        return self._probed

    def _dm_targets(self) -> set[str]:
        try:
            out = self._run(["dmsetup", "targets"], what="list device-mapper targets")
        except (errors.BackendError, errors.BackendUnavailable) as e:
            logger.warning("array %s: %s", self._spec.id, e)
            return set()
        return {line.split()[0] for line in out.splitlines() if line.strip()}

    def _get_identity(self) -> ArrayIdentity:
        if self._identity is None:
            version = parse_lvm_version(self._lvm(["version"], what="lvm version"))
            self._identity = ArrayIdentity(vendor=VENDOR, model=MODEL, version=version)
        return self._identity

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise check-then-act (capacity, idempotency) between drivers of this pool
        on this host; LVM's own VG lock only covers a single command."""
        with flock.exclusive(self._lock_path, what=f"array {self._spec.id}"):
            yield


__all__ = ["LvmThinDriver", "KIND", "thin_snapshot_cost", "VENDOR", "MODEL", "TAG_PROVISIONED", "valid_lv_name", "dm_name",
           "parse_lvm_version"]
