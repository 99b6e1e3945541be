"""Live cuts and change tracking on the device-mapper composition, with the kernel's own
targets (dm-snapshot and dm-era; Documentation/admin-guide/device-mapper/snapshot.rst
and era.rst).  DmCutComposer is dm.DmComposer plus node/cut.CutCapable.

The stack of one volume (base = dm.dm_name(volume); it never contains '@', so no other
volume's device can be named like these):

    base            the volume's device: staged, mounted, published.  Its table is
                      linear over the LUNs' loops      no tracking, no cut (dm.py's table)
                      linear over base@era             tracking, no cut standing
                      snapshot-origin base@era         one cut or more standing
    base@c<hash>    one per standing cut, read-only: `snapshot base@era <cow loop> P 128`,
                    the frozen view the host copy reads
    base@era        `era <metadata loop> base@real 128`: which 64 KiB chunk each write
                    hits, per era (a counter moved on at every cut)
    base@real       linear over the LUNs' loops: the table base had

Everything below base exists from a volume's first cut until its last cut has ended and
its last tracking was dropped; then base gets its linear table back and the rest goes.

Files, in workdir/dmcut/ (the node's state directory, so a cut's store is sized against
what that filesystem has free):

    state.json          what exists and what is being made or undone (written atomically
                        before each step: a plugin killed at any step leaves nothing
                        settle() or teardown cannot find)
    era.meta            dm-era's metadata (sparse), on a loop device: persistent, so the
                        tracking survives a restart of the plugin
    cow-<hash>          a cut's copy-on-write store: a sparse file of the store limit on a
                        loop device.  Full: dm invalidates the snapshot (status "Invalid"),
                        the volume carries on untouched, cut_status says full
    changed-<hash>      begin_cut(since=X): the chunks written between cut X and this one

The cut (begin_cut): outside the hold, base@real and base@era are made (first cut), the
store attached, era checkpointed (writes from then on carry era E or later: the cut's
tracking starts at E), the snapshot table loaded into base@c<hash> and snapshot-origin
into base's inactive slot.  The hold is three ioctls: suspend base (in-flight writes
complete, new ones wait; lockfs freezes a mounted filesystem, so the image is clean), resume
base@c<hash> (the snapshot goes live), resume base (snapshot-origin goes live; from now on
a chunk's old contents go to the store before it is first overwritten).  With hold=True
base stays suspended until release() (a cut of several volumes at one instant).

changed(since): era's metadata snapshot (take_metadata_snap rolls the era over and commits,
so every write so far is in it) read by thin-provisioning-tools' era_invalidate
--written-since E.  It may name a few chunks written just after the cut too; a resync then
copies them again from the cut's view, which is still right.

Growing (DmComposer.grow) with tracking: base@real gets the longer table, base@era the
longer length (its preresume grows the metadata), base the longer length, under one
suspend of all three.  The era metadata is sized for 16x the volume at its first cut (at
least 64 GiB); growing past that drops the tracking first (the next resync copies in full),
or is refused while a cut stands.

Unstaging while a cut stands ends the cut (teardown removes everything; a copy still
reading the view gets I/O errors and its pair fails cleanly): after NodeUnstageVolume the
volume may be attached elsewhere, and this node must hold nothing of it.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from csi_virtvol import errors, failpoints
from csi_virtvol.node import commands, cow, devices, dm, dmioctl, fs, layout
from csi_virtvol.node.cut import CHUNK, Changed, CutView
from csi_virtvol.node.layout import SECTOR, BackingExtent

logger = logging.getLogger(__name__)

CHUNK_SECTORS = CHUNK // SECTOR      # snapshot chunk and era block: 128 sectors
MIN_STORE = 4 * CHUNK                # a persistent store's header and first metadata chunk, and data
HOLD_MAX = 30.0                      # seconds a held cut keeps the writes waiting if nobody releases it
VIEW_WAIT = 5.0                      # seconds to wait for udev to link /dev/mapper/<view>
DIR = "dmcut"

TopKind = Literal["plain", "era", "origin"]


# -- names, tables, sizes (pure) ------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Names:
    top: str
    real: str
    era: str

    def cut(self, cut_id: str) -> str:
        return f"{self.top}@c{cut_key(cut_id)}"

    @property
    def prefix(self) -> str:
        return self.top + "@"


def names(volume: str) -> Names:
    base = dm.dm_name(volume)
    return Names(top=base, real=base + "@real", era=base + "@era")


def cut_key(cut_id: str) -> str:
    """16 hex digits naming a cut's device and files (cut ids are up to 128 characters;
    a device-mapper name is at most 127 bytes)."""
    return hashlib.sha256(cow.check_cut_id(cut_id).encode()).hexdigest()[:16]


def linear_over(size: int, dev: str) -> str:
    return f"0 {size // SECTOR} linear {dev} 0\n"


def origin_table(size: int, origin: str) -> str:
    return f"0 {size // SECTOR} snapshot-origin {origin}\n"


def snapshot_table(size: int, origin: str, store: str) -> str:
    return f"0 {size // SECTOR} snapshot {origin} {store} P {CHUNK_SECTORS}\n"


def era_table(size: int, metadata: str, origin: str) -> str:
    return f"0 {size // SECTOR} era {metadata} {origin} {CHUNK_SECTORS}\n"


def store_size(limit: int) -> int:
    """The copy-on-write store's bytes for a limit: whole chunks, at least MIN_STORE."""
    size = limit // CHUNK * CHUNK
    if size < MIN_STORE:
        raise errors.InvalidRequest(f"a copy-on-write store of {limit} bytes is too small: "
                                    f"dm-snapshot needs {MIN_STORE} at least")
    return size


def meta_size(volume_size: int) -> tuple[int, int]:
    """(volume bytes the era metadata can track, its bytes).  dm-era keeps 4 bytes per
    block in its era array plus a bit per block in each write set; 16 bytes per block
    leaves room for the copies its transactions and metadata snapshots hold.  Sized for
    16x the volume (at least 64 GiB) so that growing it keeps the tracking; sparse."""
    blocks = -(-volume_size // CHUNK)
    cap = min(max(16 * blocks, 1 << 20), max(blocks, 1 << 28))
    size = (8 << 20) + 16 * cap
    return cap * CHUNK, -(-size // (1 << 20)) * (1 << 20)


def parse_snapshot_status(params: str) -> tuple[int, int] | None:
    """dm-snapshot's status: (bytes of the store in use, its bytes), or None when the
    snapshot is invalid (its store overflowed, or an I/O error on it)."""
    f = params.split()
    if not f or f[0] in ("Invalid", "Overflow", "Merge"):
        return None
    used, _, total = f[0].partition("/")
    try:
        return int(used) * SECTOR, int(total) * SECTOR
    except ValueError as e:
        raise errors.BackendError(f"unexpected snapshot status {params!r}") from e


def parse_era_status(params: str) -> tuple[int, bool]:
    """dm-era's status `<meta block size> <used>/<total> <current era> <held root | ->`:
    (current era, whether a metadata snapshot is held)."""
    f = params.split()
    try:
        return int(f[2]), f[3] != "-"
    except (IndexError, ValueError) as e:
        raise errors.BackendError(f"unexpected era status {params!r}") from e


def blocks_to_bits(xml_text: str, *, size: int) -> bytes:
    """era_invalidate's <blocks> (<block block=N/>, <range begin=A end=B/>, B exclusive)
    as a Changed bitmap: bit i of byte i//8 = chunk i."""
    nr = -(-size // CHUNK)
    bits = bytearray((nr + 7) // 8)
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as e:
        raise errors.BackendError(f"era_invalidate printed something else: {xml_text[:200]!r}") from e
    for el in root:
        if el.tag == "block":
            lo = int(el.attrib["block"])
            hi = lo + 1
        elif el.tag == "range":
            lo, hi = int(el.attrib["begin"]), int(el.attrib["end"])
        else:
            continue
        for b in range(lo, min(hi, nr)):
            bits[b // 8] |= 1 << (b % 8)
    return bytes(bits)


# -- the state file ------------------------------------------------------------------------

CutPhase = Literal["making", "made", "ending"]
EraPhase = Literal["making", "ready", "removing"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CutRec:
    id: str
    phase: CutPhase
    limit: int        # bytes of its store
    size: int         # the volume's bytes at the cut: the view's size
    era: int = 0      # writes after the cut carry this era or a later one
    at: float = 0.0   # wall clock at the cut, taken while the writes were held
    held: bool = False
    changed: bool = False  # changed-<key> holds the chunks written since `since`

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "phase": self.phase, "limit": self.limit, "size": self.size, "era": self.era,
                "at": self.at, "held": self.held, "changed": self.changed}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CutRec:
        return cls(id=str(d["id"]), phase=d["phase"], limit=int(d["limit"]), size=int(d["size"]),
                   era=int(d.get("era", 0)), at=float(d.get("at", 0.0)), held=bool(d.get("held", False)),
                   changed=bool(d.get("changed", False)))


@dataclass(frozen=True, slots=True, kw_only=True)
class EraRec:
    phase: EraPhase
    capacity: int     # volume bytes its metadata can track
    meta_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "capacity": self.capacity, "meta_size": self.meta_size}


@dataclass(frozen=True, slots=True, kw_only=True)
class State:
    era: EraRec | None = None
    cuts: Mapping[str, CutRec] = field(default_factory=dict)
    tracking: Mapping[str, int] = field(default_factory=dict)   # cut id -> its era

    def standing(self) -> list[CutRec]:
        return [c for c in self.cuts.values() if c.phase == "made"]

    def top_kind(self) -> TopKind:
        """What base's table should be for this state."""
        if self.era is None or self.era.phase != "ready":
            return "plain"
        if self.standing():
            return "origin"
        return "era" if self.tracking else "plain"

    @property
    def empty(self) -> bool:
        return self.era is None and not self.cuts and not self.tracking

    def with_cut(self, rec: CutRec) -> State:
        return dataclasses.replace(self, cuts={**self.cuts, rec.id: rec})

    def without_cut(self, cut_id: str) -> State:
        return dataclasses.replace(self, cuts={k: v for k, v in self.cuts.items() if k != cut_id})

    def to_dict(self) -> dict[str, Any]:
        return {"era": self.era.to_dict() if self.era else None,
                "cuts": {k: v.to_dict() for k, v in self.cuts.items()},
                "tracking": dict(self.tracking)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> State:
        e = d.get("era")
        return cls(era=EraRec(phase=e["phase"], capacity=int(e["capacity"]), meta_size=int(e["meta_size"]))
                   if e else None,
                   cuts={str(k): CutRec.from_dict(v) for k, v in (d.get("cuts") or {}).items()},
                   tracking={str(k): int(v) for k, v in (d.get("tracking") or {}).items()})


def _dir(workdir: str) -> str:
    return os.path.join(workdir, DIR)


def _state_path(workdir: str) -> str:
    return os.path.join(_dir(workdir), "state.json")


def _meta_path(workdir: str) -> str:
    return os.path.join(_dir(workdir), "era.meta")


def _cow_path(workdir: str, cut_id: str) -> str:
    return os.path.join(_dir(workdir), f"cow-{cut_key(cut_id)}")


def _changed_path(workdir: str, cut_id: str) -> str:
    return os.path.join(_dir(workdir), f"changed-{cut_key(cut_id)}")


def load_state(workdir: str) -> State | None:
    try:
        with open(_state_path(workdir), encoding="utf-8") as f:
            return State.from_dict(json.load(f))
    except FileNotFoundError:
        return None


def _save(workdir: str, st: State) -> State:
    os.makedirs(_dir(workdir), exist_ok=True)
    layout.write_json_atomic(_state_path(workdir), st.to_dict())
    return st


# -- process-wide: one operation per volume at a time; the holds this process keeps ------------

_guard = threading.Lock()
_locks: dict[str, threading.RLock] = {}
_held: dict[str, threading.Timer] = {}   # workdir -> the timer that lets go after HOLD_MAX


@contextmanager
def _locked(workdir: str) -> Iterator[None]:
    with _guard:
        lock = _locks.setdefault(workdir, threading.RLock())
    with lock:
        yield


# -- dm helpers --------------------------------------------------------------------------------

def _rows(targets: Sequence[tuple[int, int, str, str]]) -> list[list[str]]:
    return [[str(s), str(n), t, *p.split()] for s, n, t, p in targets]


def _load(name: str, table: str, *, readonly: bool = False) -> None:
    commands.run(["dmsetup", "load", name, *(["--readonly"] if readonly else [])], input=table)


def _create(name: str, table: str) -> None:
    commands.run(["dmsetup", "create", name], input=table)


def _remove(name: str, *, force: bool) -> None:
    """Remove a device; one already gone is fine.  With force, a device still open (a
    reader of an ended cut) gets a table that fails all I/O, which lets go of the devices
    under it, and goes when its last user closes it."""
    if dmioctl.info(name) is None:
        return
    res = commands.run(["dmsetup", "remove", "--retry", name], check=False)
    if res.returncode == 0 or dmioctl.info(name) is None:
        logger.info("removed %s", name)
        return
    if not force:
        raise errors.BackendError(f"cannot remove {name}: {res.stderr.strip()}")
    logger.warning("%s is still open; failing its I/O and removing it when it is closed", name)
    commands.run(["dmsetup", "wipe_table", name])
    commands.run(["dmsetup", "remove", "--deferred", name])


def _ours(n: Names) -> list[str]:
    """Every device of this volume's stack that exists (by name, so nothing recorded is
    needed to find them)."""
    out = commands.run(["dmsetup", "ls"]).stdout
    found = []
    for line in out.splitlines():
        f = line.split()
        if f and f[0].startswith(n.prefix):
            found.append(f[0])
    return found


def _view_path(name: str, minor: int, *, wait: bool) -> str:
    path = f"/dev/mapper/{name}"
    if wait and os.path.exists("/run/udev/control"):
        deadline = time.monotonic() + VIEW_WAIT
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
    return path if os.path.exists(path) else f"/dev/dm-{minor}"


def _detach_files(workdir: str) -> None:
    """Detach every loop device backed by a file of workdir/dmcut (found by path, so a loop
    attached just before a crash is found too)."""
    d = os.path.realpath(_dir(workdir)) + os.sep
    for lo in devices.list_loops():
        if lo.back_file.startswith(d):
            devices.detach(lo.name)


def _presync(top: dmioctl.Info | None) -> None:
    """Write back a filesystem mounted on the volume before the hold, so the freeze inside it
    (lockfs) has as little as possible left to write."""
    if top is None:
        return
    for m in fs.mounts():
        if m.major_minor == top.majmin:
            try:
                fd = os.open(m.mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if _libc().syncfs(fd) != 0:
                    logger.debug("syncfs %s failed", m.mount_point)
            finally:
                os.close(fd)
            return


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _sparse(path: str, size: int) -> None:
    """A new zero-filled sparse file (what a crashed attempt left is replaced)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _volume_size(n: Names) -> int:
    """Bytes of the volume's device as it is now (segments.json runs ahead of it while it
    grows, and stays ahead if that was killed)."""
    return sum(length for _, length, _, _ in dmioctl.table(n.top)) * SECTOR


def _readonly(workdir: str) -> bool:
    try:
        with open(os.path.join(workdir, "segments.json"), encoding="utf-8") as f:
            return bool(json.load(f).get("readonly", False))
    except FileNotFoundError:
        return False


class DmCutComposer(dm.DmComposer):
    """dm.DmComposer that cuts (node/cut.CutCapable) with dm-snapshot and tracks with dm-era."""

    # Its suspend freezes a mounted filesystem itself (lockfs), so the stager does not fsfreeze.
    freezes_filesystem = True

    # -- the composition -------------------------------------------------------------------

    def assemble(
        self, *, workdir: str, name: str, extents: Sequence[BackingExtent], readonly: bool
    ) -> str:
        with _locked(workdir):
            self._settle(workdir, name, keep_holds=True)
            st = load_state(workdir)
            if st is None or st.era is None:
                return super().assemble(workdir=workdir, name=name, extents=extents, readonly=readonly)
            return self._grow_stack(workdir, name, extents, st)

    def teardown(self, *, workdir: str, name: str) -> None:
        n = names(name)
        with _locked(workdir):
            self._forget_hold(workdir)
            stack = _ours(n)
            self._resume_all([n.real, n.era, *sorted(stack), n.top])
            _remove(n.top, force=False)
            for dev in stack:
                if dev not in (n.real, n.era):
                    _remove(dev, force=True)
            _remove(n.era, force=False)
            _remove(n.real, force=False)
            super().teardown(workdir=workdir, name=name)
            _detach_files(workdir)
            shutil.rmtree(_dir(workdir), ignore_errors=True)

    def problem(self, *, workdir: str, name: str) -> str | None:
        found = super().problem(workdir=workdir, name=name)
        if found is not None:
            return found
        st = load_state(workdir)
        if st is not None and st.era is not None and st.era.phase == "ready":
            n = names(name)
            for dev in (n.era, n.real):
                if dmioctl.info(dev) is None:
                    return f"device-mapper device {dev} (change tracking) is gone"
        return None

    def settle(self, *, workdir: str, name: str) -> None:
        """Finish or undo whatever a killed process left half-done in this volume's stack,
        and let go of held writes: before an unmount, and when a plugin starts."""
        with _locked(workdir):
            if workdir in _held:
                self._release(workdir, names(name))
            self._settle(workdir, name, keep_holds=False)

    # -- node/cut.CutCapable ---------------------------------------------------------------------

    def begin_cut(self, *, workdir: str, name: str, cut_id: str, store_limit: int, hold: bool,
                  since: str = "") -> CutView:
        cow.check_cut_id(cut_id)
        limit = store_size(store_limit)
        n = names(name)
        with _locked(workdir):
            if _readonly(workdir):
                raise errors.PreconditionFailed(f"volume {name} is assembled read-only: it needs no cut")
            if dmioctl.info(n.top) is None:
                raise errors.PreconditionFailed(f"volume {name} is not assembled")
            self._settle(workdir, name, keep_holds=True)
            st = load_state(workdir) or State()
            old = st.cuts.get(cut_id)
            if old is not None and old.phase == "made":
                if not hold or old.held:
                    return self._view(workdir, n, old, wait=True)
                # asked to hold again, but its hold is over: that instant cannot be shared any more
                st = self._end(workdir, n, st, cut_id)
            if st.era is None:
                st = self._make_stack(workdir, n, st)
            return self._cut(workdir, n, st, cut_id=cut_id, limit=limit, hold=hold, since=since)

    def release(self, *, workdir: str, name: str) -> None:
        with _locked(workdir):
            if workdir in _held:
                self._release(workdir, names(name))
            else:
                self._settle(workdir, name, keep_holds=False)

    def cut_status(self, *, workdir: str, name: str, cut_id: str) -> CutView | None:
        cow.check_cut_id(cut_id)
        with _locked(workdir):
            self._settle(workdir, name, keep_holds=True)
            st = load_state(workdir)
            rec = st.cuts.get(cut_id) if st is not None else None
            if rec is None or rec.phase != "made":
                return None
            return self._view(workdir, names(name), rec, wait=False)

    def end_cut(self, *, workdir: str, name: str, cut_id: str) -> None:
        cow.check_cut_id(cut_id)
        n = names(name)
        with _locked(workdir):
            st = load_state(workdir)
            if st is None:
                return
            rec = st.cuts.get(cut_id)
            if rec is not None and rec.held and workdir in _held:
                self._release(workdir, n)
            self._settle(workdir, name, keep_holds=True)
            st = load_state(workdir) or State()
            if cut_id in st.cuts:
                st = self._end(workdir, n, st, cut_id)
            self._reconcile(workdir, n, st)

    def changed(self, *, workdir: str, name: str, since: str) -> Changed:
        cow.check_cut_id(since)
        with _locked(workdir):
            self._settle(workdir, name, keep_holds=True)
            st = load_state(workdir)
            era = st.tracking.get(since) if st is not None else None
            if era is None:
                raise errors.NotFound(f"{name}: nothing tracks the writes since cut {since}")
            n = names(name)
            size = _volume_size(n)
            return Changed(chunk=CHUNK, size=size, bits=self._written_since(workdir, n, era, size))

    def drop_tracking(self, *, workdir: str, name: str, since: str) -> None:
        cow.check_cut_id(since)
        with _locked(workdir):
            self._settle(workdir, name, keep_holds=True)
            st = load_state(workdir)
            if st is None or since not in st.tracking:
                return
            st = _save(workdir, dataclasses.replace(st, tracking={k: v for k, v in st.tracking.items()
                                                                  if k != since}))
            self._reconcile(workdir, names(name), st)

    def cuts(self, *, workdir: str, name: str) -> tuple[list[str], list[str]]:
        with _locked(workdir):
            self._settle(workdir, name, keep_holds=True)
            st = load_state(workdir) or State()
            return sorted(c.id for c in st.standing()), sorted(st.tracking)

    # -- the cut ---------------------------------------------------------------------------------

    def _make_stack(self, workdir: str, n: Names, st: State) -> State:
        """base@real and base@era under base (base itself is untouched until a cut)."""
        size = _volume_size(n)
        capacity, msize = meta_size(size)
        era = EraRec(phase="making", capacity=capacity, meta_size=msize)
        st = _save(workdir, dataclasses.replace(st, era=era))
        try:
            _sparse(_meta_path(workdir), msize)
            meta = devices.attach(_meta_path(workdir), direct_io=True)
            failpoints.hit("dmcut-stack-meta")
            _create(n.real, self._plain_table(workdir))
            real = dmioctl.info(n.real)
            if real is None:
                raise errors.BackendError(f"{n.real} vanished as it was made")
            _create(n.era, era_table(size, dm.majmin(meta), real.majmin))
            failpoints.hit("dmcut-stack-era")
        except Exception:
            self._collapse(workdir, n, st)
            raise
        logger.info("%s: change tracking (dm-era, %d MiB of metadata for up to %d GiB) under the volume",
                    n.top, msize >> 20, capacity >> 30)
        return _save(workdir, dataclasses.replace(st, era=dataclasses.replace(era, phase="ready")))

    def _cut(self, workdir: str, n: Names, st: State, *, cut_id: str, limit: int, hold: bool,
             since: str) -> CutView:
        rec = CutRec(id=cut_id, phase="making", limit=limit, size=_volume_size(n))
        st = _save(workdir, st.with_cut(rec))
        failpoints.hit("dmcut-cut-recorded")
        try:
            return self._make_cut(workdir, n, st, rec, hold=hold, since=since)
        except Exception:
            # Undo it now rather than at the next call (the caller gives up the cut anyway).
            try:
                if workdir in _held:
                    self._release(workdir, n)
                st = load_state(workdir) or State()
                st = _save(workdir, dataclasses.replace(
                    st, tracking={k: v for k, v in st.tracking.items() if k != cut_id}))
                if cut_id in st.cuts:
                    st = self._end(workdir, n, st, cut_id)
                self._reconcile(workdir, n, st)
            except errors.VirtvolError as e:
                logger.error("%s: could not undo the failed cut %s: %s", n.top, cut_id, e)
            raise

    def _make_cut(self, workdir: str, n: Names, st: State, rec: CutRec, *, hold: bool, since: str) -> CutView:
        cut_id, size = rec.id, rec.size
        _sparse(_cow_path(workdir, cut_id), rec.limit)
        store = devices.attach(_cow_path(workdir, cut_id), direct_io=True)
        era_dev = dmioctl.info(n.era)
        if era_dev is None:
            raise errors.BackendError(f"{n.era} is gone")
        # Writes from here on carry this era or a later one: some just before the cut too,
        # which only makes a later resync copy a chunk it could have skipped.
        dmioctl.message(n.era, "checkpoint")
        era, _ = parse_era_status(dmioctl.status(n.era)[0][3])
        view = n.cut(cut_id)
        commands.run(["dmsetup", "create", view, "--notable"])
        _load(view, snapshot_table(size, era_dev.majmin, dm.majmin(store)), readonly=True)
        swap = self._kind(n) != "origin"
        if swap:
            _load(n.top, origin_table(size, era_dev.majmin))
        failpoints.hit("dmcut-loaded")
        _presync(dmioctl.info(n.top))
        already = workdir in _held   # this process holds base suspended for another cut: same instant
        t0 = time.monotonic()
        try:
            if not already:
                dmioctl.suspend(n.top, lockfs=True)
            failpoints.hit("dmcut-suspended")
            dmioctl.resume(view)
            at = time.time()
            failpoints.hit("dmcut-activated")
            if not hold and not already:
                dmioctl.resume(n.top)
        except BaseException:
            self._undo_instant(n, swap=swap, suspended=not already)
            raise
        held_ms = (time.monotonic() - t0) * 1000
        if hold and not already:
            self._hold(workdir, n)
        rec = dataclasses.replace(rec, phase="made", era=era, at=at, held=hold)
        st = _save(workdir, dataclasses.replace(st.with_cut(rec), tracking={**st.tracking, cut_id: era}))
        logger.info("%s: cut %s with the writes held %.1f ms (era %d, store up to %d MiB)%s", n.top, cut_id,
                    held_ms, era, rec.limit >> 20, "; they stay held" if hold else "")
        failpoints.hit("dmcut-made")
        if since and since in st.tracking and since != cut_id:
            bits = self._written_since(workdir, n, st.tracking[since], size)
            cow.write_file(_changed_path(workdir, cut_id), bits)
            logger.info("%s: cut %s: %d chunks written since cut %s", n.top, cut_id,
                        sum(bin(b).count("1") for b in bits), since)
            rec = dataclasses.replace(rec, changed=True)
            st = _save(workdir, st.with_cut(rec))
        return self._view(workdir, n, rec, wait=True)

    def _undo_instant(self, n: Names, *, swap: bool, suspended: bool) -> None:
        """A step of the instant failed: base must not stay suspended, nor keep a table
        that nothing stands behind.  What remains is the 'making' cut, for _settle."""
        try:
            if swap:
                info = dmioctl.info(n.top)
                if info is not None and info.inactive:
                    commands.run(["dmsetup", "clear", n.top])
            if suspended:
                dmioctl.resume(n.top)
        except errors.VirtvolError as e:
            logger.error("%s: could not undo a failed cut: %s", n.top, e)

    def _hold(self, workdir: str, n: Names) -> None:
        t = threading.Timer(HOLD_MAX, self._expire, args=(workdir, n))
        t.daemon = True
        with _guard:
            _held[workdir] = t
        t.start()

    def _expire(self, workdir: str, n: Names) -> None:
        logger.warning("%s: writes were held %.0fs and nobody released them; letting them go", n.top, HOLD_MAX)
        with _locked(workdir):
            if workdir in _held:
                self._release(workdir, n)

    def _forget_hold(self, workdir: str) -> None:
        with _guard:
            t = _held.pop(workdir, None)
        if t is not None:
            t.cancel()

    def _release(self, workdir: str, n: Names) -> None:
        self._forget_hold(workdir)
        info = dmioctl.info(n.top)
        if info is not None and info.suspended:
            dmioctl.resume(n.top)
            logger.info("%s: held writes let go", n.top)
        st = load_state(workdir)
        if st is not None and any(c.held for c in st.cuts.values()):
            _save(workdir, dataclasses.replace(st, cuts={k: dataclasses.replace(v, held=False)
                                                         for k, v in st.cuts.items()}))

    def _end(self, workdir: str, n: Names, st: State, cut_id: str) -> State:
        """Drop a cut's view and store; its tracking stays."""
        rec = st.cuts[cut_id]
        st = _save(workdir, st.with_cut(dataclasses.replace(rec, phase="ending", held=False)))
        failpoints.hit("dmcut-ending")
        # The view goes before base stops being its origin: a reader never sees it thaw.
        _remove(n.cut(cut_id), force=True)
        store = devices.find(_cow_path(workdir, cut_id))
        if store is not None:
            devices.detach(store.name)
        _unlink(_cow_path(workdir, cut_id))
        _unlink(_changed_path(workdir, cut_id))
        logger.info("%s: cut %s ended", n.top, cut_id)
        return _save(workdir, st.without_cut(cut_id))

    def _view(self, workdir: str, n: Names, rec: CutRec, *, wait: bool) -> CutView:
        name = n.cut(rec.id)
        info = dmioctl.info(name)
        if info is None or not info.active:
            raise errors.BackendError(f"the view of cut {rec.id} ({name}) is gone")
        used, full = 0, True
        parsed = parse_snapshot_status(dmioctl.status(name)[0][3])
        if parsed is not None:
            used, full = parsed[0], False
        return CutView(cut_id=rec.id, path=_view_path(name, info.minor, wait=wait), size=rec.size,
                       limit=rec.limit, used=used, full=full, at=rec.at,
                       changed=_changed_path(workdir, rec.id) if rec.changed else "")

    def _written_since(self, workdir: str, n: Names, era: int, size: int) -> bytes:
        """The chunks written in era `era` or later, from a metadata snapshot of dm-era."""
        meta = devices.find(_meta_path(workdir))
        if meta is None:
            raise errors.BackendError(f"the loop device of {_meta_path(workdir)} is gone")
        _, held = parse_era_status(dmioctl.status(n.era)[0][3])
        if held:  # left by a killed process
            dmioctl.message(n.era, "drop_metadata_snap")
        dmioctl.message(n.era, "take_metadata_snap")
        try:
            out = commands.run(["era_invalidate", "--metadata-snapshot", "--written-since", str(era),
                                meta.name]).stdout
        finally:
            dmioctl.message(n.era, "drop_metadata_snap")
        return blocks_to_bits(out, size=size)

    # -- tables of base ----------------------------------------------------------------------------

    def _plain_table(self, workdir: str) -> str:
        """Linear over the LUNs' loops, from segments.json (the loops exist: reused)."""
        lines = []
        start = 0
        for s in dm.load_segments(os.path.join(workdir, "segments.json")):
            if devices.is_block_device(s.path):
                dev, off = s.path, s.offset
            else:
                dev, off = devices.attach(s.path, offset=s.offset, sizelimit=s.length, direct_io=True), 0
            lines.append(f"{start // SECTOR} {s.length // SECTOR} linear {dm.majmin(dev)} {off // SECTOR}")
            start += s.length
        if not lines:
            raise errors.BackendError(f"{workdir}: no segments recorded")
        return "\n".join(lines) + "\n"

    def _table_for(self, workdir: str, n: Names, kind: TopKind, size: int) -> str:
        if kind == "plain":
            return self._plain_table(workdir)
        era = dmioctl.info(n.era)
        if era is None:
            raise errors.BackendError(f"{n.era} is gone")
        return origin_table(size, era.majmin) if kind == "origin" else linear_over(size, era.majmin)

    @staticmethod
    def _kind(n: Names) -> TopKind:
        t = dmioctl.table(n.top)
        if len(t) == 1 and t[0][2] == "snapshot-origin":
            return "origin"
        era = dmioctl.info(n.era)
        if era is not None and len(t) == 1 and t[0][2] == "linear" and t[0][3].split()[0] == era.majmin:
            return "era"
        return "plain"

    def _swap_top(self, workdir: str, n: Names, kind: TopKind) -> None:
        """Give base the table of `kind`: load, suspend (in-flight writes complete, new ones
        wait a moment), resume."""
        table = self._table_for(workdir, n, kind, _volume_size(n))
        _load(n.top, table)
        dmioctl.suspend(n.top, lockfs=False)
        dmioctl.resume(n.top)
        logger.info("%s: now %s", n.top, {"plain": "linear over its LUNs", "era": "linear over its tracking",
                                          "origin": "the origin of its cuts"}[kind])

    def _reconcile(self, workdir: str, n: Names, st: State) -> None:
        """Give base the table the state asks for; take the stack apart when nothing
        needs it any more."""
        if dmioctl.info(n.top) is None:
            return
        want = st.top_kind()
        if self._kind(n) != want:
            self._swap_top(workdir, n, want)
        if st.era is not None and not st.cuts and not st.tracking:
            self._collapse(workdir, n, st)

    def _collapse(self, workdir: str, n: Names, st: State) -> None:
        if st.era is not None:
            st = _save(workdir, dataclasses.replace(st, era=dataclasses.replace(st.era, phase="removing")))
        failpoints.hit("dmcut-collapse")
        if dmioctl.info(n.top) is not None and self._kind(n) != "plain":
            self._swap_top(workdir, n, "plain")
        for dev in _ours(n):
            if dev not in (n.real, n.era):
                _remove(dev, force=True)
        _remove(n.era, force=False)
        _remove(n.real, force=False)
        _detach_files(workdir)
        shutil.rmtree(_dir(workdir), ignore_errors=True)
        logger.info("%s: change tracking removed", n.top)

    # -- growing -------------------------------------------------------------------------------------

    def _grow_stack(self, workdir: str, name: str, extents: Sequence[BackingExtent], st: State) -> str:
        n = names(name)
        assert st.era is not None
        size = layout.total_size(extents)
        if size > st.era.capacity:
            if st.cuts:
                raise errors.PreconditionFailed(
                    f"volume {name} cannot grow to {size} bytes while a cut of it stands: its change "
                    f"tracking was sized for {st.era.capacity} bytes; grow it after the snapshot is ready")
            logger.warning("%s: growing past what its change tracking can cover; dropping the tracking "
                           "(the next resync copies in full)", n.top)
            self._collapse(workdir, n, st)
            return dm.DmComposer.assemble(self, workdir=workdir, name=name, extents=extents, readonly=False)
        if workdir in _held:
            raise errors.PreconditionFailed(f"volume {name}: its writes are held for a cut; try again")
        _, table, wanted = self.linear_table(workdir=workdir, extents=extents, readonly=False)
        if _rows(dmioctl.table(n.real)) == wanted and _volume_size(n) == size:
            return dm.device_path(n.top)
        era = dmioctl.info(n.era)
        meta = devices.find(_meta_path(workdir))
        top = dmioctl.info(n.top)
        if era is None or meta is None or top is None:
            raise errors.BackendError(f"volume {name}: its change tracking stack is incomplete")
        real = dmioctl.info(n.real)
        assert real is not None
        _load(n.real, table)
        _load(n.era, era_table(size, dm.majmin(meta.name), real.majmin))
        kind = self._kind(n)
        _load(n.top, {"origin": origin_table(size, era.majmin), "era": linear_over(size, era.majmin),
                      "plain": table}[kind])
        failpoints.hit("dmcut-grow-loaded")
        for dev in (n.top, n.era, n.real):   # top down: nothing is written below a suspended device
            dmioctl.suspend(dev, lockfs=False)
        failpoints.hit("dmcut-grow-suspended")
        for dev in (n.real, n.era, n.top):   # bottom up
            dmioctl.resume(dev)
        logger.info("%s: grown to %d bytes with its change tracking", n.top, size)
        return dm.device_path(n.top)

    # -- recovery --------------------------------------------------------------------------------------

    def _resume_all(self, devs: Sequence[str]) -> None:
        """Drop tables loaded but never swapped in, and resume what is suspended (bottom up)."""
        seen = set()
        for dev in devs:
            if dev in seen:
                continue
            seen.add(dev)
            info = dmioctl.info(dev)
            if info is None:
                continue
            if info.inactive:
                commands.run(["dmsetup", "clear", dev])
            if info.suspended and info.active:
                dmioctl.resume(dev)
                logger.warning("%s: resumed (a killed process left it suspended)", dev)

    def _settle(self, workdir: str, name: str, *, keep_holds: bool) -> None:
        """Bring the stack and state.json back in line after a process was killed at any step.
        A cut not recorded as made is undone (it never reached anyone); a cut whose writes
        were held by a process that is gone is undone too (its instant can no longer be
        shared with the other volumes of its group); an ending cut is finished."""
        st = load_state(workdir)
        if st is None:
            return
        n = names(name)
        if keep_holds and workdir in _held:
            return   # this process holds the writes: all is as it should be
        top = dmioctl.info(n.top)
        if top is None:
            # base is gone (a reboot, or a teardown that was killed): nothing of the stack can serve
            logger.warning("%s is gone; removing what is left of its cuts and tracking", n.top)
            for dev in _ours(n):
                if dev not in (n.real, n.era):
                    _remove(dev, force=True)
            _remove(n.era, force=True)
            _remove(n.real, force=True)
            _detach_files(workdir)
            shutil.rmtree(_dir(workdir), ignore_errors=True)
            return
        lower = [dmioctl.info(d) for d in (n.real, n.era)]
        held = any(c.held for c in st.cuts.values())
        dead_hold = top.suspended and held
        undo = [c.id for c in st.cuts.values()
                if c.phase != "made" or (c.held and dead_hold) or dmioctl.info(n.cut(c.id)) is None]
        dirty = (top.suspended or top.inactive or bool(undo) or held
                 or any(i is not None and (i.suspended or i.inactive) for i in lower))
        if dirty:
            self._forget_hold(workdir)
            self._resume_all([n.real, n.era, *(n.cut(c) for c in st.cuts), n.top])
            if held:
                st = _save(workdir, dataclasses.replace(st, cuts={k: dataclasses.replace(v, held=False)
                                                             for k, v in st.cuts.items()}))
            for cut_id in undo:
                rec = st.cuts[cut_id]
                logger.warning("%s: undoing cut %s (%s when its process was killed)", n.top, cut_id,
                               "held" if rec.phase == "made" else rec.phase)
                if rec.phase == "making" or (rec.phase == "made" and dead_hold):
                    st = _save(workdir, dataclasses.replace(
                        st, tracking={k: v for k, v in st.tracking.items() if k != cut_id}))
                st = self._end(workdir, n, st, cut_id)
        if st.era is not None and (st.era.phase != "ready" or lower[1] is None):
            if st.cuts or st.tracking:
                logger.warning("%s: its change tracking is gone; the cuts and tracking with it", n.top)
                for cut_id in list(st.cuts):
                    st = self._end(workdir, n, st, cut_id)
            self._collapse(workdir, n, dataclasses.replace(st, cuts={}, tracking={}))
            return
        self._reconcile(workdir, n, st)

__all__ = ["DmCutComposer", "State", "CutRec", "EraRec", "names", "cut_key", "meta_size", "store_size",
           "parse_snapshot_status", "parse_era_status", "blocks_to_bits", "load_state"]
