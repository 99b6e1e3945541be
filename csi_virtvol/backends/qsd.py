"""The qsd array: one qemu-storage-daemon, driven over QMP, serving LUNs over NBD.

``spec.params``:

    pool      directory holding the images (required)
    qmp       the daemon's QMP unix socket (default ``<pool>/qmp.sock``)
    nbd       where the daemon's NBD server listens: ``unix:/path`` (default
              ``unix:<pool>/nbd.sock``) or ``HOST:PORT`` (TCP)
    start     "true": when nothing answers on ``qmp``, start the daemon
              (``--daemonize``, pid in ``<pool>/qsd.pid``); stop it with
              `QsdDriver.shutdown`
    capacity  optional cap (bytes, "10Gi", ...) on the sum of LUN sizes

Layout of the pool::

    <pool>/luns/<lun-id>.img  one image per LUN, qcow2 (the driver makes these)
                              or raw (found there); the format comes from the
                              file's magic, never from its name
    <pool>/mnt/<lun-id>       a regular file over which `open_path` mounts the
                              LUN's NBD export with nbdfuse
    <pool>/.lock              flock(2) serialising every change

The image files are the truth: `list_luns` scans them, and a LUN is attached
to the daemon (``blockdev-add`` + writable ``block-export-add``, export name =
LUN id) when it is created, or lazily when it is first used (a discovered
image, or every image after the daemon restarted).  Node names are derived
from a hash of the LUN id (QEMU allows 31 characters there).

`Lun.address` is the export's NBD URI (``nbd+unix:///<id>?socket=...`` or
``nbd://host:port/<id>``): what another array (remote copy) or a node using
kernel nbd connects to.  `open_path` returns ``<pool>/mnt/<id>``, the export
mounted as a file through nbdfuse, for host copy and for nodes without nbd.
Its size is fixed when it is mounted: `resize_lun` and `wipe_lun` unmount it
(lazily when it is busy; a holder keeps seeing the old mount), and the next
`open_path` mounts it again.

Abilities are probed over QMP: GROW_LUN with ``block_resize``;
INTERNAL_COPY with ``blockdev-backup`` (``sync=full`` into a new qcow2 LUN of
the same daemon: a point-in-time copy, done when the call returns);
REMOTE_COPY with ``blockdev-backup`` and an ``nbd`` block driver (the backup
target is an ``nbd`` node pointing at the other array's export);
DIRTY_TRACKING with ``block-dirty-bitmap-add`` (a dirty bitmap per tracking
name, read back over NBD with ``nbdinfo --map``).

Capacity is as in the file pool: the pool filesystem's free space minus, for
each image, its virtual size minus its allocated blocks; ``capacity`` caps the
sum of virtual sizes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

from csi_virtvol import errors
from csi_virtvol.backends.base import CopyProgress
from csi_virtvol.backends._pool import TMP_PREFIX, XATTR_ORIGIN, XATTR_SOURCE, PoolDriver, valid_lun_id
from csi_virtvol.backends.qmp import QmpError, QmpSession, qmp_session
from csi_virtvol.model.array import Ability, ArrayIdentity, ArrayInfo, ArraySpec, CopyCost, Lun, LunOrigin
from csi_virtvol.model.ids import LunId
from csi_virtvol.transport import nbdfuse
from csi_virtvol.transport.nbduri import NbdServer, esc as _esc, parse_nbd_uri

logger = logging.getLogger(__name__)

KIND = "qsd"
QCOW2_MAGIC = b"QFI\xfb"

START_TIMEOUT = 15.0
JOB_TIMEOUT = 3600.0
POLL = 0.02
BITMAP_GRANULARITY = 64 * 1024


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class QsdDriver(PoolDriver):
    """An ArrayDriver, InternalCopyCapable, RemoteCopyCapable and DirtyTrackingCapable
    over one qemu-storage-daemon."""

    def __init__(self, spec: ArraySpec) -> None:
        super().__init__(spec, kind=KIND, path_param="pool", subdirs=("mnt",))
        self._mnt = os.path.join(self._root, "mnt")
        self._qmp = spec.params.get("qmp") or os.path.join(self._root, "qmp.sock")
        self._nbd = NbdServer.parse(spec.params.get("nbd") or f"unix:{os.path.join(self._root, 'nbd.sock')}")
        self._start = spec.params.get("start", "").lower() in ("true", "yes", "1")
        self._remote_done: dict[str, CopyProgress] = {}
        self._ensure_daemon()

    # ---- daemon -----------------------------------------------------------------------------

    def _ensure_daemon(self) -> None:
        try:
            with qmp_session(self._qmp) as qmp:
                self._ensure_nbd_server(qmp)
            return
        except errors.BackendUnavailable:
            if not self._start:
                raise
        pidfile = os.path.join(self._root, "qsd.pid")
        argv = ["qemu-storage-daemon",
                "--chardev", f"socket,id=qmp0,path={_esc(self._qmp)},server=on,wait=off",
                "--monitor", "chardev=qmp0",
                "--nbd-server", self._nbd.cli(),
                "--pidfile", pidfile, "--daemonize"]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._qmp)
        if self._nbd.unix:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._nbd.unix)
        logger.info("array %s: starting %s", self._spec.id, " ".join(argv))
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise errors.BackendUnavailable(f"array {self._spec.id}: cannot start qemu-storage-daemon: {e}") from e
        if proc.returncode != 0:
            raise errors.BackendUnavailable(
                f"array {self._spec.id}: qemu-storage-daemon failed ({proc.returncode}): {proc.stderr.strip()}")
        with qmp_session(self._qmp) as qmp:
            qmp.execute("query-version")

    def _ensure_nbd_server(self, qmp: QmpSession) -> None:
        try:
            qmp.execute("nbd-server-start", {"addr": self._nbd.qapi_legacy()})
            logger.info("array %s: started NBD server on %s", self._spec.id, self._nbd)
        except QmpError as e:
            if "already running" not in e.desc:
                raise

    def shutdown(self) -> None:
        """Unmount every nbdfuse mount of this pool and stop the daemon (QMP quit)."""
        with contextlib.suppress(OSError):
            for entry in os.scandir(self._mnt):
                if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                    self._unmount(entry.name)
        with contextlib.suppress(errors.BackendUnavailable), qmp_session(self._qmp) as qmp:
            qmp.execute("quit")
        pidfile = os.path.join(self._root, "qsd.pid")
        with contextlib.suppress(OSError, ValueError):
            with open(pidfile, encoding="ascii") as f:
                pid = int(f.read().strip())
            for _ in range(int(START_TIMEOUT / POLL)):
                with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                    if f.read().rpartition(")")[2].split()[0] == "Z":
                        break  # exited; only its parent's reaping is left
                time.sleep(POLL)

    # ---- ArrayDriver ---------------------------------------------------------------------

    def create_lun(self, *, name: str, size: int) -> Lun:
        def make(lun_id: LunId) -> None:
            self._install(self._new_image(lun_id, size=size), lun_id)
        return self._create(name=name, size=size, make=make)

    def delete_lun(self, *, lun_id: LunId) -> None:
        if not valid_lun_id(lun_id):
            return
        with self._locked():
            if self.get_lun(lun_id=lun_id) is None:
                return
            self._unmount(lun_id)
            with self._session() as qmp:
                self._detach(qmp, lun_id)
            self._unlink_lun(lun_id)
            for leftover in (lun_id, f".{lun_id}.pid", f".{lun_id}.log"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._mnt, leftover))
        logger.info("array %s: deleted LUN %s", self._spec.id, lun_id)

    def resize_lun(self, *, lun_id: LunId, size: int) -> Lun:
        def apply(lun: Lun) -> None:
            self._unmount(lun_id)  # nbdfuse fixed the file's size when it mounted
            with self._session() as qmp:
                # an NBD export holds its node's size fixed: resize between exports
                node = self._attach(qmp, lun_id)
                self._unexport(qmp, lun_id)
                qmp.execute("block_resize", {"node-name": node, "size": size})
                self._attach(qmp, lun_id)
        return self._grow(lun_id=lun_id, size=size, apply=apply)

    def wipe_lun(self, *, lun_id: LunId) -> None:
        with self._locked():
            lun = self._require_lun(lun_id)
            self._unmount(lun_id)
            with self._session() as qmp:
                self._detach(qmp, lun_id)
            path = self._path(lun_id)
            try:
                if _image_format(path) == "qcow2":
                    tmp = self._new_image(lun_id, size=lun.size, origin=self._origin(path))
                    os.replace(tmp, path)
                else:
                    os.truncate(path, 0)
                    os.truncate(path, lun.size)
            except OSError as e:
                raise errors.BackendError(f"array {self._spec.id}: wipe {lun_id}: {e}") from e
        logger.info("array %s: wiped LUN %s", self._spec.id, lun_id)

    def open_path(self, *, lun_id: LunId) -> str:
        with self._locked():
            self._require_lun(lun_id)
            with self._session() as qmp:
                self._attach(qmp, lun_id)
            return self._mount(lun_id)

    # ---- InternalCopyCapable ----------------------------------------------------------------

    def internal_copy_cost(self, *, source: LunId) -> CopyCost:
        """A full backup into a new qcow2 LUN: the source's size, counted like a new LUN."""
        src = self._require_lun(source)
        return self._copy_cost(size=src.size, apparent=src.size, reserve=src.size)

    def copy_lun_internal(self, *, source: LunId, name: str) -> Lun:
        """blockdev-backup sync=full of `source` into a new qcow2 LUN `name`: the
        content of `source` at the call, independent of it afterwards.  Idempotent by name."""
        lun_id = self._check_name(name)
        with self._locked():
            src, done = self._copy_begin(source=source, lun_id=lun_id)
            if done is not None:
                return done
            if Ability.INTERNAL_COPY not in self._probe():
                raise errors.UnsupportedCapability(f"array {self._spec.id}: daemon has no blockdev-backup")
            self._check_room(apparent=src.size, reserve=src.size)
            tmp = self._new_image(lun_id, size=src.size, source=source)
            tmp_node = "t" + _h(tmp)
            try:
                with self._session() as qmp:
                    src_node = self._attach(qmp, src.id)
                    qmp.execute("blockdev-add", {
                        "driver": "qcow2", "node-name": tmp_node,
                        "file": {"driver": "file", "filename": tmp}})
                try:
                    self._run_backup(job="c" + _h(tmp), device=src_node, target=tmp_node)
                finally:
                    with self._session() as qmp:
                        qmp.execute("blockdev-del", {"node-name": tmp_node})
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            self._install(tmp, lun_id)
        logger.info("array %s: backed up LUN %s -> %s", self._spec.id, source, lun_id)
        return self._lun_or_fail(lun_id)

    def _run_backup(self, *, job: str, device: str, target: str) -> None:
        """Run a full backup job to its end.  The daemon's monitor serves one
        client at a time, so every poll is a session of its own: other callers
        (progress of a remote copy, a probe) get in between."""
        with self._session() as qmp:
            qmp.execute("blockdev-backup", {"job-id": job, "device": device, "target": target,
                                            "sync": "full", "auto-dismiss": False})
        deadline = time.monotonic() + JOB_TIMEOUT
        try:
            while True:
                with self._session() as qmp:
                    info = _find_job(qmp, job)
                if info is None:
                    raise errors.BackendError(f"array {self._spec.id}: backup job {job} vanished")
                if info["status"] == "concluded":
                    if info.get("error"):
                        raise errors.BackendError(f"array {self._spec.id}: backup failed: {info['error']}")
                    return
                if time.monotonic() > deadline:
                    raise errors.BackendError(f"array {self._spec.id}: backup {job} timed out")
                time.sleep(POLL)
        except BaseException:
            with contextlib.suppress(errors.VirtvolError), self._session() as qmp:
                qmp.execute("job-cancel", {"id": job})
                self._wait_concluded(qmp, job)
            raise
        finally:
            with contextlib.suppress(errors.VirtvolError), self._session() as qmp:
                qmp.execute("job-dismiss", {"id": job})

    def _wait_concluded(self, qmp: QmpSession, job: str) -> None:
        for _ in range(int(START_TIMEOUT / POLL)):
            info = _find_job(qmp, job)
            if info is None or info["status"] == "concluded":
                return
            time.sleep(POLL)

    # ---- RemoteCopyCapable --------------------------------------------------------------------

    def can_reach(self, *, target: ArrayInfo) -> bool:
        """Another qsd array: its exports are NBD, which this daemon's nbd driver speaks.
        (Reachability of the address itself shows when the copy starts.)"""
        return target.kind == KIND and target.id != self._spec.id

    def start_remote_copy(self, *, source: LunId, target_address: str, job: str,
                          since: str = "") -> None:
        """Push `source` into the NBD export `target_address` (a target LUN's
        `Lun.address`, same size) with blockdev-backup; `job` names it.

        ``since=""``: sync=full, every byte.  ``since=NAME`` (a tracking started
        with `start_tracking`, an extension of the RemoteCopyCapable protocol):
        differential resync, sync=bitmap, only the regions written since the
        tracking started or since the last successful resync with it; on success
        the copied regions are cleared from that bitmap (writes made during the
        copy stay set for the next one)."""
        server, export = parse_nbd_uri(target_address)
        if Ability.REMOTE_COPY not in self._probe():
            raise errors.UnsupportedCapability(f"array {self._spec.id}: daemon cannot back up to NBD")
        with self._locked():
            self._require_lun(source)
            with self._session() as qmp:
                if _find_job(qmp, _job_id(job)) is not None:
                    return  # already running: idempotent by job name
                self._remote_done.pop(job, None)
                src_node = self._attach(qmp, source)
                sync: dict[str, Any] = {"sync": "full"}
                if since:
                    if _bitmap(since) not in _bitmaps(qmp, src_node):
                        raise errors.NotFound(f"array {self._spec.id}: LUN {source} has no tracking {since!r}")
                    sync = {"sync": "bitmap", "bitmap": _bitmap(since), "bitmap-mode": "on-success"}
                node = "r" + _h(job)
                if any(n["node-name"] == node for n in qmp.execute("query-named-block-nodes", {"flat": True})):
                    qmp.execute("blockdev-del", {"node-name": node})  # of a job dismissed without it (a crash)
                qmp.execute("blockdev-add", {"driver": "nbd", "node-name": node,
                                             "server": server.qapi(), "export": export})
                try:
                    qmp.execute("blockdev-backup", {"job-id": _job_id(job), "device": src_node,
                                                    "target": node, "auto-dismiss": False, **sync})
                except BaseException:
                    with contextlib.suppress(QmpError):
                        qmp.execute("blockdev-del", {"node-name": node})
                    raise
        logger.info("array %s: remote copy %s: %s -> %s", self._spec.id, job, source, target_address)

    def remote_copy_progress(self, *, job: str) -> CopyProgress:
        if job in self._remote_done:
            return self._remote_done[job]
        with self._session() as qmp:
            info = _find_job(qmp, _job_id(job))
            if info is None:
                raise errors.NotFound(f"array {self._spec.id}: no remote copy {job}")
            total = int(info.get("total-progress", 0))
            done_bytes = int(info.get("current-progress", 0))
            if info["status"] != "concluded":
                return CopyProgress(bytes_total=total, bytes_done=done_bytes, done=False)
            progress = CopyProgress(bytes_total=total, bytes_done=done_bytes, done=True,
                                    error=str(info.get("error", "")))
            self._finish_remote(qmp, job)
        self._remote_done[job] = progress
        return progress

    def cancel_remote_copy(self, *, job: str) -> None:
        self._remote_done.pop(job, None)
        with self._session() as qmp:
            if _find_job(qmp, _job_id(job)) is None:
                return
            with contextlib.suppress(QmpError):
                qmp.execute("job-cancel", {"id": _job_id(job)})
            self._wait_concluded(qmp, _job_id(job))
            self._finish_remote(qmp, job)
        logger.info("array %s: cancelled remote copy %s", self._spec.id, job)

    def _finish_remote(self, qmp: QmpSession, job: str) -> None:
        with contextlib.suppress(QmpError):
            qmp.execute("job-dismiss", {"id": _job_id(job)})
        with contextlib.suppress(QmpError):
            qmp.execute("blockdev-del", {"node-name": "r" + _h(job)})

    # ---- DirtyTrackingCapable -------------------------------------------------------------------

    def start_tracking(self, *, lun_id: LunId, name: str) -> None:
        """Start a dirty bitmap `name` on the LUN (persistent in qcow2 images, so it
        survives a daemon restart).  Idempotent: a running bitmap is left as it is."""
        with self._locked():
            self._require_lun(lun_id)
            if Ability.DIRTY_TRACKING not in self._probe():
                raise errors.UnsupportedCapability(f"array {self._spec.id}: daemon has no dirty bitmaps")
            with self._session() as qmp:
                node = self._attach(qmp, lun_id)
                if _bitmap(name) in _bitmaps(qmp, node):
                    return
                qmp.execute("block-dirty-bitmap-add", {
                    "node": node, "name": _bitmap(name), "granularity": BITMAP_GRANULARITY,
                    "persistent": _image_format(self._path(lun_id)) == "qcow2"})
        logger.info("array %s: tracking changes of %s as %s", self._spec.id, lun_id, name)

    def changed_ranges(self, *, lun_id: LunId, name: str) -> Iterator[tuple[int, int]]:
        """(offset, length) of every region written since `start_tracking`, in
        order, merged, at the bitmap's granularity (64 KiB).  The bitmap keeps
        recording: asking does not reset it.

        Read over NBD: the bitmap is merged into a disabled copy (an enabled
        bitmap cannot be exported), which a read-only export offers as the
        ``qemu:dirty-bitmap:`` meta context to ``nbdinfo --map``; export and copy
        are removed before this returns."""
        with self._locked():
            self._require_lun(lun_id)
            with self._session() as qmp:
                node = self._attach(qmp, lun_id)
                if _bitmap(name) not in _bitmaps(qmp, node):
                    raise errors.NotFound(f"array {self._spec.id}: LUN {lun_id} has no tracking {name!r}")
                tag = uuid.uuid4().hex[:12]
                frozen, export_id, export = f"virtvol-read-{tag}", f"x{tag}", f"{lun_id}.dirty-{tag}"
                qmp.execute("block-dirty-bitmap-add", {"node": node, "name": frozen, "disabled": True,
                                                       "granularity": BITMAP_GRANULARITY})
                try:
                    qmp.execute("block-dirty-bitmap-merge", {"node": node, "target": frozen,
                                                             "bitmaps": [_bitmap(name)]})
                    qmp.execute("block-export-add", {"type": "nbd", "id": export_id, "node-name": node,
                                                     "name": export, "writable": False, "bitmaps": [frozen]})
                    try:
                        ranges = self._read_dirty_map(export, frozen)
                    finally:
                        self._remove_export(qmp, export_id)
                finally:
                    with contextlib.suppress(QmpError):
                        qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": frozen})
        return iter(ranges)

    def stop_tracking(self, *, lun_id: LunId, name: str) -> None:
        """Drop the bitmap; a LUN or bitmap that is not there is not an error."""
        with self._locked():
            if self.get_lun(lun_id=lun_id) is None:
                return
            with self._session() as qmp:
                node = self._attach(qmp, lun_id)
                if _bitmap(name) in _bitmaps(qmp, node):
                    qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": _bitmap(name)})
        logger.info("array %s: stopped tracking %s of %s", self._spec.id, name, lun_id)

    # ---- AllocationMapCapable ---------------------------------------------------------------

    def allocated_ranges(self, *, lun_id: LunId, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """The LUN's data ranges in the window: the export's ``base:allocation``
        map (``nbdinfo --map``), every extent that is not a hole, clipped."""
        with self._locked():
            self._require_lun(lun_id)
            with self._session() as qmp:
                self._attach(qmp, lun_id)
        end = offset + length
        out: list[tuple[int, int]] = []
        for off, size in self._read_nbd_map(lun_id, "base:allocation", want_set=False):
            lo, hi = max(off, offset), min(off + size, end)
            if lo < hi:
                out.append((lo, hi - lo))
        return iter(out)

    def _read_dirty_map(self, export: str, bitmap: str) -> list[tuple[int, int]]:
        return self._read_nbd_map(export, f"qemu:dirty-bitmap:{bitmap}", want_set=True)

    def _read_nbd_map(self, export: str, context: str, *, want_set: bool) -> list[tuple[int, int]]:
        """The merged extents of `context` on `export` whose type bit 0 (dirty;
        for base:allocation, hole) is set (`want_set`) or clear."""
        argv = ["nbdinfo", "--json", f"--map={context}", self._nbd.uri(export)]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=JOB_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise errors.BackendError(f"array {self._spec.id}: nbdinfo: {e}") from e
        if proc.returncode != 0:
            raise errors.BackendError(f"array {self._spec.id}: nbdinfo --map: {proc.stderr.strip()}")
        try:
            entries = json.loads(proc.stdout)
        except ValueError as e:
            raise errors.BackendError(f"array {self._spec.id}: nbdinfo --map: bad JSON") from e
        out: list[tuple[int, int]] = []
        for entry in entries:
            if bool(int(entry["type"]) & 1) is not want_set:
                continue
            off, length = int(entry["offset"]), int(entry["length"])
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((off, length))
        return out

    # ---- QMP: nodes and exports ---------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self) -> Iterator[QmpSession]:
        with qmp_session(self._qmp) as qmp:
            yield qmp

    def _attach(self, qmp: QmpSession, lun_id: str) -> str:
        """Make sure the LUN's image is a node of the daemon and exported; returns the node name."""
        node, export_id = "n" + _h(lun_id), "e" + _h(lun_id)
        nodes = {n["node-name"] for n in qmp.execute("query-named-block-nodes", {"flat": True})}
        if node not in nodes:
            path = self._path(lun_id)
            # discard=unmap: an NBD trim (hole punched through nbdfuse) frees the
            # clusters and they read back as zeros; QEMU's default ignores it
            qmp.execute("blockdev-add", {"driver": _image_format(path), "node-name": node, "discard": "unmap",
                                         "file": {"driver": "file", "filename": path, "discard": "unmap"}})
        exports = {e["id"] for e in qmp.execute("query-block-exports")}
        if export_id not in exports:
            qmp.execute("block-export-add", {"type": "nbd", "id": export_id, "node-name": node,
                                             "name": lun_id, "writable": True})
        return node

    def _detach(self, qmp: QmpSession, lun_id: str) -> None:
        self._unexport(qmp, lun_id)
        node = "n" + _h(lun_id)
        if any(n["node-name"] == node for n in qmp.execute("query-named-block-nodes", {"flat": True})):
            qmp.execute("blockdev-del", {"node-name": node})

    def _unexport(self, qmp: QmpSession, lun_id: str) -> None:
        self._remove_export(qmp, "e" + _h(lun_id))

    def _remove_export(self, qmp: QmpSession, export_id: str) -> None:
        if any(e["id"] == export_id for e in qmp.execute("query-block-exports")):
            with contextlib.suppress(QmpError):
                qmp.execute("block-export-del", {"id": export_id, "mode": "hard"})
            for _ in range(int(START_TIMEOUT / POLL)):  # deletion finishes asynchronously
                if not any(e["id"] == export_id for e in qmp.execute("query-block-exports")):
                    break
                time.sleep(POLL)

    # ---- nbdfuse ------------------------------------------------------------------------------

    def _mount(self, lun_id: str) -> str:
        try:
            return nbdfuse.mount(self._nbd.uri(lun_id), os.path.join(self._mnt, lun_id))
        except errors.VirtvolError as e:
            raise type(e)(f"array {self._spec.id}: LUN {lun_id}: {e}") from e

    def _unmount(self, lun_id: str) -> None:
        nbdfuse.unmount(os.path.join(self._mnt, lun_id))

    # ---- files --------------------------------------------------------------------------------

    def _install(self, tmp: str, lun_id: str) -> None:
        """Publish the finished image `tmp` as LUN `lun_id` and attach it to the daemon."""
        try:
            self._publish(tmp, lun_id)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        with self._session() as qmp:
            self._attach(qmp, lun_id)

    def _new_image(self, lun_id: str, *, size: int, origin: LunOrigin = LunOrigin.PROVISIONED,
                   source: str = "") -> str:
        tmp = os.path.join(self._luns, f"{TMP_PREFIX}{lun_id}-{uuid.uuid4().hex[:8]}")
        proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tmp, str(size)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise errors.BackendError(f"array {self._spec.id}: qemu-img create {lun_id}: {proc.stderr.strip()}")
        try:
            if origin is LunOrigin.PROVISIONED:
                os.setxattr(tmp, XATTR_ORIGIN, LunOrigin.PROVISIONED.value.encode())
            if source:
                os.setxattr(tmp, XATTR_SOURCE, source.encode())
        except OSError as e:
            os.unlink(tmp)
            raise errors.BackendError(f"array {self._spec.id}: xattr on {tmp}: {e}") from e
        return tmp

    def _lun(self, lun_id: str, *, path: str, st: os.stat_result) -> Lun:
        return Lun(array=self._spec.id, id=LunId(lun_id), size=_virtual_size(path, st),
                   address=self._nbd.uri(lun_id), origin=self._origin(path))

    def _lun_size(self, path: str, st: os.stat_result) -> int:
        return _virtual_size(path, st)

    # ---- probe --------------------------------------------------------------------------------

    def _probe_abilities(self) -> Ability:
        with self._session() as qmp:
            commands = {c["name"] for c in qmp.execute("query-commands")}
            found = Ability.NONE
            if "block_resize" in commands:
                found |= Ability.GROW_LUN
            if {"blockdev-backup", "blockdev-add", "query-jobs", "job-dismiss"} <= commands:
                found |= Ability.INTERNAL_COPY
                if _has_nbd_driver(qmp):
                    found |= Ability.REMOTE_COPY
            if "block-dirty-bitmap-add" in commands:
                found |= Ability.DIRTY_TRACKING
        return found

    def _read_identity(self) -> ArrayIdentity:
        with self._session() as qmp:
            v = qmp.execute("query-version")
        q = v["qemu"]
        return ArrayIdentity(vendor="QEMU", model="qsd", version=f"{q['major']}.{q['minor']}.{q['micro']}")


# ---- helpers -------------------------------------------------------------------------------------

def _bitmap(name: str) -> str:
    return f"virtvol-{name}"


def _bitmaps(qmp: QmpSession, node: str) -> set[str]:
    for info in qmp.execute("query-named-block-nodes", {"flat": True}):
        if info.get("node-name") == node:
            return {str(b["name"]) for b in info.get("dirty-bitmaps", [])}
    return set()


def _job_id(job: str) -> str:
    return "j" + _h(job)


def _find_job(qmp: QmpSession, job: str) -> dict[str, Any] | None:
    for info in qmp.execute("query-jobs"):
        if info.get("id") == job:
            return dict(info)
    return None


def _has_nbd_driver(qmp: QmpSession) -> bool:
    """True when blockdev-add accepts driver "nbd" (BlockdevDriver lists it)."""
    schema = qmp.execute("query-qmp-schema")
    by_name = {e.get("name"): e for e in schema}
    add = by_name.get("blockdev-add")
    if add is None:
        return False
    args = by_name.get(add.get("arg-type"))
    if args is None:
        return False
    for member in args.get("members", []):
        if member.get("name") == "driver":
            enum = by_name.get(member.get("type"), {})
            return "nbd" in enum.get("values", [])
    return False


def _image_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise errors.BackendError(f"cannot read {path}: {e}") from e
    return "qcow2" if magic == QCOW2_MAGIC else "raw"


def _virtual_size(path: str, st: os.stat_result) -> int:
    try:
        with open(path, "rb") as f:
            header = f.read(32)
    except OSError:
        return st.st_size
    if len(header) == 32 and header[:4] == QCOW2_MAGIC:
        return int(struct.unpack(">Q", header[24:32])[0])
    return st.st_size


def stop_daemon(spec: ArraySpec) -> None:
    """Stop the daemon of `spec` (and its nbdfuse mounts) without starting one."""
    if not spec.params.get("pool"):
        return
    pool = os.path.abspath(spec.params["pool"])
    mnt = os.path.join(pool, "mnt")
    with contextlib.suppress(OSError):
        for entry in os.scandir(mnt):
            nbdfuse.unmount_lazily(entry.path)
    qmp = spec.params.get("qmp") or os.path.join(pool, "qmp.sock")
    with contextlib.suppress(errors.BackendUnavailable), qmp_session(qmp) as session:
        session.execute("quit")


__all__ = ["QsdDriver", "KIND", "NbdServer", "parse_nbd_uri", "stop_daemon"]
