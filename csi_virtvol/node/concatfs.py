"""The userspace concatenation daemon: one FUSE file, `volume`, whose bytes are the
table's extents in order.

    python -m csi_virtvol.node.concatfs --table TABLE.json --mount DIR [--pid-file F]

Run where device-mapper is missing; concat.py starts it detached and puts a loop device on
DIR/volume.  The file is opened with direct_io, so the kernel keeps no page cache for it
(the loop device above and the LUN files below have their own).  fsync and flush fsync
every underlying file, so a FLUSH from the loop device reaches the LUNs.  SIGHUP re-reads
the table; a new table must keep every existing byte in place (append an extent, or grow
the last one), else it is refused and the old one stays.  SIGTERM or an unmount stops it.

Live cuts (node/cow.py, node/cut.py): the control file `.ctl` takes one JSON command per
open (write it, then read the JSON answer).  `cut` holds the writes for an instant (it
waits for the writes in flight and lets no new one start), makes the cut's copy-on-write
store and change-tracking bitmap, and lets the writes go (or keeps them held until
`release`, for a cut of several volumes at one instant; at most HOLD_MAX seconds).  From
then on, before a chunk is first overwritten its old contents go to the store, and
`cut-<id>` (read-only) serves the volume as it was at the cut.  `end` drops the store
(the bitmap stays, for a resync), `untrack` the bitmap, `status` and `changed` report.
The cuts are reloaded from the workdir (the table's directory) when the daemon starts.
"""
from __future__ import annotations

import argparse
import base64
import bisect
import errno
import itertools
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mfusepy

from csi_virtvol import errors as errors_
from csi_virtvol import failpoints
from csi_virtvol.node import cow, layout

logger = logging.getLogger(__name__)

FILE_NAME = layout.CONCAT_FILE_NAME
_FILE_PATH = "/" + FILE_NAME
CTL_NAME = layout.CONCAT_CTL_NAME
_CTL_PATH = "/" + CTL_NAME
CUT_PREFIX = layout.CONCAT_CUT_PREFIX
HOLD_MAX = 30.0   # seconds a held cut keeps the writes waiting at most, if nobody releases it


@dataclass(frozen=True, slots=True, kw_only=True)
class _Piece:
    start: int   # offset in the volume
    length: int
    fd: int
    offset: int  # offset in the backing file


@dataclass(frozen=True, slots=True, kw_only=True)
class _Layout:
    pieces: tuple[_Piece, ...]
    starts: tuple[int, ...]
    size: int


class ConcatOperations(mfusepy.Operations):  # type: ignore[misc]
    """FUSE callbacks.  Layout swaps are atomic (one attribute), so readers never lock.
    So are the swaps of the cut and tracking maps (a new dict each time)."""

    use_ns = True

    def __init__(self, table: layout.Table, *, workdir: str | None = None) -> None:
        self._readonly = table.readonly
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self._extents: tuple[layout.BackingExtent, ...] = ()
        self._layout = _Layout(pieces=(), starts=(), size=0)
        self._now = time.time_ns()
        self._workdir = workdir
        self._cuts: dict[str, cow.CowStore] = {}
        self._tracks: dict[str, cow.Bitmap] = {}
        self._cow_lock = threading.Lock()     # preserving a chunk vs reading it live for a view
        self._gate = threading.Condition()    # writes in flight vs a cut holding them
        self._writers = 0
        self._holding = False
        self._hold_timer: threading.Timer | None = None
        self._ctl_lock = threading.Lock()     # one control command at a time
        self._replies: dict[int, bytes] = {}
        self._handles = itertools.count(1)
        self._broken: set[str] = set()        # cut directories found unreadable at start
        self.reload(table)
        if workdir is not None:
            self._load_cuts(workdir)

    def _load_cuts(self, workdir: str) -> None:
        cow.remove_unfinished(workdir)  # a cut made halfway when the last daemon died: never answered
        for cut_id in cow.list_cuts(workdir):
            try:
                self._cuts = {**self._cuts, cut_id: cow.CowStore(cow.cut_dir(workdir, cut_id))}
            except (OSError, ValueError, KeyError) as e:
                # listed (so the node plugin ends it) but never served: its view would be wrong
                logger.error("cut %s cannot be loaded (%s); its view will not be served", cut_id, e)
                self._broken.add(cut_id)
        for cut_id in cow.list_tracking(workdir):
            track = cow.Bitmap(cow.bitmap_path(workdir, cut_id), size=self.size)
            if track.untrusted:
                logger.warning("the writes tracked since cut %s were not all flushed when the machine went "
                               "down: every chunk counts as changed, so its next resync copies the whole volume",
                               cut_id)
            self._tracks = {**self._tracks, cut_id: track}
        if self._cuts or self._tracks:
            logger.info("reloaded cuts %s, tracking %s", sorted(self._cuts), sorted(self._tracks))

    # -- table -------------------------------------------------------------------------

    def reload(self, table: layout.Table) -> None:
        if self._extents and not layout.is_extension(self._extents, table.extents):
            raise ValueError("the new table moves existing bytes; refused")
        layout.validate(table.extents)
        pieces = []
        start = 0
        for e in table.extents:
            pieces.append(_Piece(start=start, length=e.length, fd=self._fd(e.path), offset=e.offset))
            start += e.length
        self._extents = table.extents
        self._layout = _Layout(
            pieces=tuple(pieces), starts=tuple(p.start for p in pieces), size=start
        )
        for b in self._tracks.values():
            b.grow(start)
        logger.info("serving %d extents, %d bytes", len(pieces), start)

    def _fd(self, path: str) -> int:
        with self._fd_lock:
            fd = self._fds.get(path)
            if fd is None:
                flags = (os.O_RDONLY if self._readonly else os.O_RDWR) | os.O_CLOEXEC
                fd = os.open(path, flags)
                self._fds[path] = fd
            return fd

    def close_all(self) -> None:
        self._release_hold()
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        for c in self._cuts.values():
            c.close()
        for b in self._tracks.values():
            b.sync()
            b.close()

    @property
    def size(self) -> int:
        return self._layout.size

    def _spans(self, lay: _Layout, offset: int, size: int) -> list[tuple[_Piece, int, int]]:
        """(piece, offset within piece, bytes) covering volume[offset:offset+size]."""
        out = []
        end = min(offset + size, lay.size)
        i = bisect.bisect_right(lay.starts, offset) - 1
        pos = offset
        while pos < end:
            p = lay.pieces[i]
            within = pos - p.start
            n = min(p.length - within, end - pos)
            out.append((p, within, n))
            pos += n
            i += 1
        return out

    def _read_live(self, lay: _Layout, offset: int, size: int) -> bytes:
        chunks = []
        for piece, within, n in self._spans(lay, offset, size):
            data = os.pread(piece.fd, n, piece.offset + within)
            if len(data) < n:  # a sparse LUN file shorter than its extent reads as zeros
                data += bytes(n - len(data))
            chunks.append(data)
        return b"".join(chunks)

    def _write_live(self, lay: _Layout, data: bytes, offset: int) -> int:
        view = memoryview(data)
        done = 0
        for piece, within, n in self._spans(lay, offset, len(data)):
            chunk = view[done:done + n]
            pos = piece.offset + within
            while chunk:
                w = os.pwrite(piece.fd, chunk, pos)
                chunk = chunk[w:]
                pos += w
            done += n
        return done

    # -- holding writes for the instant of a cut -----------------------------------------

    def _enter_write(self) -> None:
        with self._gate:
            while self._holding:
                self._gate.wait()
            self._writers += 1

    def _leave_write(self) -> None:
        with self._gate:
            self._writers -= 1
            if not self._writers:
                self._gate.notify_all()

    def _hold(self) -> None:
        """Let no new write start, and wait for those in flight (the block path's suspend)."""
        with self._gate:
            while self._holding:
                self._gate.wait()
            self._holding = True
            while self._writers:
                self._gate.wait()

    def _release_hold(self) -> None:
        with self._gate:
            if self._hold_timer is not None:
                self._hold_timer.cancel()
                self._hold_timer = None
            if self._holding:
                self._holding = False
                self._gate.notify_all()

    def _expire_hold(self) -> None:
        logger.warning("writes were held %.0fs and nobody released them; letting them go", HOLD_MAX)
        self._release_hold()

    # -- cuts ------------------------------------------------------------------------------

    def _cut_of(self, path: str) -> cow.CowStore:
        c = self._cuts.get(path[1 + len(CUT_PREFIX):]) if path.startswith("/" + CUT_PREFIX) else None
        if c is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return c

    def _preserve(self, lay: _Layout, offset: int, end: int) -> None:
        """Before volume[offset:end] is overwritten: the old contents of each chunk that no
        cut has yet preserved go to that cut's store.  Called with _cow_lock held."""
        first, last = offset // cow.CHUNK, (end - 1) // cow.CHUNK
        for c in self._cuts.values():
            if c.full:
                continue
            for k in range(first, last + 1):
                start = k * cow.CHUNK
                if start >= c.meta.size or c.has(k):
                    continue
                old = self._read_live(lay, start, min(cow.CHUNK, c.meta.size - start))
                if not c.preserve(k, old):
                    logger.error("cut %s: its copy-on-write store is full (%d bytes); the cut is lost, "
                                 "the volume carries on", c.meta.id, c.meta.limit)
                    break

    def _needs_preserving(self, offset: int, end: int) -> bool:
        first, last = offset // cow.CHUNK, (end - 1) // cow.CHUNK
        for c in self._cuts.values():
            if c.full:
                continue
            for k in range(first, min(last, (c.meta.size - 1) // cow.CHUNK) + 1):
                if not c.has(k):
                    return True
        return False

    def _read_cut(self, c: cow.CowStore, size: int, offset: int) -> bytes:
        if c.full:
            raise mfusepy.FuseOSError(errno.EIO)
        end = min(offset + size, c.meta.size)
        out = []
        pos = offset
        while pos < end:
            k = pos // cow.CHUNK
            within = pos - k * cow.CHUNK
            n = min(cow.CHUNK - within, end - pos)
            data = c.read(k)
            if data is None:
                with self._cow_lock:  # no write may overwrite the chunk while it is read live
                    data = c.read(k)
                    if data is None:
                        out.append(self._read_live(self._layout, pos, n))
                        pos += n
                        continue
            out.append(data[within:within + n])
            pos += n
        if c.full:  # it filled while reading: what was read live may be newer than the cut
            raise mfusepy.FuseOSError(errno.EIO)
        return b"".join(out)

    def control(self, req: dict[str, Any]) -> dict[str, Any]:
        """One control command (see the module's doc); raises ValueError/KeyError/OSError."""
        if self._workdir is None:
            raise ValueError("this daemon has no workdir: cuts are off")
        op = req.get("op")
        with self._ctl_lock:
            if op == "cut":
                cut_id = cow.check_cut_id(str(req["id"]))
                limit = int(req["limit"])
                if limit < cow.RECORD:
                    raise ValueError(f"a copy-on-write store of {limit} bytes holds no chunk")
                if self._readonly:
                    raise ValueError("a read-only volume needs no cut")
                if cut_id not in self._cuts:
                    self._hold()
                    try:
                        failpoints.hit("daemon-cut-held")
                        t0 = time.monotonic()
                        store = cow.CowStore.create(self._workdir, cut_id=cut_id, size=self.size, limit=limit,
                                                    at=time.time())
                        track = cow.Bitmap(cow.bitmap_path(self._workdir, cut_id), size=self.size)
                        track.sync()
                        since = str(req.get("since") or "")
                        if since and since in self._tracks:  # written between that cut and this one
                            cow.write_file(os.path.join(store.dir, "changed.bitmap"), self._tracks[since].bits())
                        with self._cow_lock:
                            self._tracks = {**self._tracks, cut_id: track}
                            self._cuts = {**self._cuts, cut_id: store}
                    except BaseException:
                        self._release_hold()
                        raise
                    failpoints.hit("daemon-cut-made")
                    logger.info("cut %s made in %.1f ms (%d bytes, store up to %d bytes)", cut_id,
                                (time.monotonic() - t0) * 1000, self.size, limit)
                    if req.get("hold"):
                        with self._gate:
                            self._hold_timer = threading.Timer(HOLD_MAX, self._expire_hold)
                            self._hold_timer.daemon = True
                            self._hold_timer.start()
                    else:
                        self._release_hold()
                return self._status(cut_id)
            if op == "release":
                self._release_hold()
                return {}
            if op == "status":
                return self._status(cow.check_cut_id(str(req["id"])))
            if op == "end":
                cut_id = cow.check_cut_id(str(req["id"]))
                with self._cow_lock:
                    ending = self._cuts.get(cut_id)
                    self._cuts = {k: v for k, v in self._cuts.items() if k != cut_id}
                failpoints.hit("daemon-cut-ending")
                if ending is not None:
                    ending.remove()
                else:
                    cow.remove_cut(self._workdir, cut_id)
                self._broken.discard(cut_id)
                return {}
            if op == "untrack":
                cut_id = cow.check_cut_id(str(req["id"]))
                with self._cow_lock:
                    dropping = self._tracks.get(cut_id)
                    self._tracks = {k: v for k, v in self._tracks.items() if k != cut_id}
                if dropping is not None:
                    dropping.remove()
                return {}
            if op == "changed":
                cut_id = cow.check_cut_id(str(req["id"]))
                tracked = self._tracks.get(cut_id)
                if tracked is None:
                    raise KeyError(f"nothing tracks the writes since cut {cut_id}")
                return {"chunk": cow.CHUNK, "size": self.size,
                        "bits": base64.b64encode(tracked.bits()).decode()}
            if op == "list":
                return {"cuts": sorted({*self._cuts, *self._broken}), "tracking": sorted(self._tracks)}
            raise ValueError(f"unknown control command {op!r}")

    def _status(self, cut_id: str) -> dict[str, Any]:
        c = self._cuts.get(cut_id)
        if c is None:
            return {"id": cut_id, "exists": False, "tracking": cut_id in self._tracks}
        return {"id": cut_id, "exists": True, "view": "/" + CUT_PREFIX + cut_id, "size": c.meta.size,
                "limit": c.meta.limit, "used": c.used, "full": c.full, "at": c.meta.at,
                "changed": os.path.join(c.dir, "changed.bitmap")
                if os.path.exists(os.path.join(c.dir, "changed.bitmap")) else "",
                "tracking": cut_id in self._tracks}

    # -- FUSE --------------------------------------------------------------------------

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        common = {"st_uid": os.getuid(), "st_gid": os.getgid(),
                  "st_atime": self._now, "st_mtime": self._now, "st_ctime": self._now}
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, **common}
        if path == _FILE_PATH:
            size = self._layout.size
            mode = 0o400 if self._readonly else 0o600
            return {"st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": size,
                    "st_blocks": (size + 511) // 512, "st_blksize": 4096, **common}
        if path == _CTL_PATH and self._workdir is not None:
            return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 0, **common}
        if path.startswith("/" + CUT_PREFIX):
            size = self._cut_of(path).meta.size
            return {"st_mode": stat.S_IFREG | 0o400, "st_nlink": 1, "st_size": size,
                    "st_blocks": (size + 511) // 512, "st_blksize": 4096, **common}
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: Any) -> list[str]:
        if path != "/":
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        extra = [CTL_NAME] if self._workdir is not None else []
        return [".", "..", FILE_NAME, *extra, *(CUT_PREFIX + c for c in sorted(self._cuts))]

    def open(self, path: str, fi: Any) -> int:
        if path == _CTL_PATH and self._workdir is not None:
            fi.direct_io = 1
            fi.fh = next(self._handles)
            return 0
        if path.startswith("/" + CUT_PREFIX):
            self._cut_of(path)
            if (fi.flags & os.O_ACCMODE) != os.O_RDONLY:
                raise mfusepy.FuseOSError(errno.EROFS)
            fi.direct_io = 1
            fi.fh = 0
            return 0
        if path != _FILE_PATH:
            raise mfusepy.FuseOSError(errno.ENOENT)
        if self._readonly and (fi.flags & os.O_ACCMODE) != os.O_RDONLY:
            raise mfusepy.FuseOSError(errno.EROFS)
        fi.direct_io = 1
        fi.fh = 0
        return 0

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        if path == _CTL_PATH:
            return self._replies.get(fh.fh, b"")[offset:offset + size]
        if path != _FILE_PATH:
            failpoints.hit("daemon-view-read")
            return self._read_cut(self._cut_of(path), size, offset)
        lay = self._layout
        if offset >= lay.size:
            return b""
        return self._read_live(lay, offset, size)

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        if path == _CTL_PATH:
            try:
                answer = self.control(json.loads(bytes(data)))
            except (ValueError, KeyError, OSError, TypeError, errors_.InvalidRequest) as e:
                answer = {"error": str(e), "kind": type(e).__name__}
            self._replies[fh.fh] = json.dumps(answer).encode()
            return len(data)
        if path != _FILE_PATH:
            raise mfusepy.FuseOSError(errno.EROFS)
        if self._readonly:
            raise mfusepy.FuseOSError(errno.EROFS)
        lay = self._layout
        if offset >= lay.size:
            raise mfusepy.FuseOSError(errno.ENOSPC)
        end = min(offset + len(data), lay.size)
        self._enter_write()
        try:
            for b in self._tracks.values():
                b.mark(offset, end - offset)
            if self._cuts and self._needs_preserving(offset, end):
                with self._cow_lock:
                    self._preserve(lay, offset, end)
                    failpoints.hit("daemon-preserved")  # the old data is durable; the write not yet made
                    return self._write_live(lay, data, offset)
            return self._write_live(lay, data, offset)
        finally:
            self._leave_write()

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        if path == _CTL_PATH:
            return 0
        if length != self._layout.size:
            raise mfusepy.FuseOSError(errno.EPERM)
        return 0

    def fsync(self, path: str, datasync: int, fh: Any) -> int:
        if path != _FILE_PATH:
            return 0
        with self._fd_lock:
            fds = list(self._fds.values())
        for fd in fds:
            if datasync:
                os.fdatasync(fd)
            else:
                os.fsync(fd)
        for b in self._tracks.values():
            b.sync()
        return 0

    def flush(self, path: str, fh: Any) -> int:
        if self._readonly or path != _FILE_PATH:
            return 0
        return self.fsync(path, 0, fh)

    def release(self, path: str, fh: Any) -> int:
        if path == _CTL_PATH:
            self._replies.pop(fh.fh, None)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        blocks = self._layout.size // 4096
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": 1, "f_ffree": 0, "f_namemax": 255}


def _watch_sighup(ops: ConcatOperations, table_path: str) -> None:
    """Runs in its own thread: SIGHUP is blocked everywhere and taken here by sigwait."""
    while True:
        signal.sigwait({signal.SIGHUP})
        try:
            ops.reload(layout.Table.load(table_path))
        except Exception:
            logger.exception("reload of %s failed; keeping the old table", table_path)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m csi_virtvol.node.concatfs")
    ap.add_argument("--table", required=True)
    ap.add_argument("--mount", required=True)
    ap.add_argument("--pid-file")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    table = layout.Table.load(args.table)
    ops = ConcatOperations(table, workdir=os.path.dirname(os.path.abspath(args.table)))
    # Block SIGHUP before libfuse starts its threads: they inherit the mask, so only
    # the watcher's sigwait ever sees it (libfuse would otherwise exit on SIGHUP).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    threading.Thread(target=_watch_sighup, args=(ops, args.table), daemon=True,
                     name="sighup").start()
    if args.pid_file:
        layout.write_json_atomic(args.pid_file, os.getpid())
    logger.info("mounting %s (%d bytes) at %s", args.table, ops.size, args.mount)
    options: dict[str, Any] = {
        "foreground": True,
        "fsname": "virtvol-concat",
        "subtype": "virtvol",
        "attr_timeout": 0,
        "entry_timeout": 0,
        "negative_timeout": 0,
        "default_permissions": True,
        # libfuse mounts through fusermount3, which stays behind and detaches the mount
        # if this daemon dies: a killed daemon must not leave a mount point that answers
        # every stat with ENOTCONN (that breaks unrelated tools, e.g. mkfs.btrfs).
        "auto_unmount": True,
    }
    if table.readonly:
        options["ro"] = True
    try:
        mfusepy.FUSE(ops, args.mount, raw_fi=True, **options)
    except RuntimeError as e:
        # libfuse's loop reports the signal that ended it (SIGTERM, SIGINT) as an error.
        logger.info("FUSE loop ended: %s", e)
    finally:
        ops.close_all()
        if args.pid_file:
            try:
                os.unlink(args.pid_file)
            except FileNotFoundError:
                pass
    logger.info("unmounted %s", args.mount)
    return 0


if __name__ == "__main__":
    sys.exit(main())
