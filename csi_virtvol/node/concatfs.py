"""The userspace concatenation daemon: one FUSE file, `volume`, whose bytes are the
table's extents in order.

    python -m csi_virtvol.node.concatfs --table TABLE.json --mount DIR [--pid-file F]

Run where device-mapper is missing; concat.py starts it detached and puts a loop device on
DIR/volume.  The file is opened with direct_io, so the kernel keeps no page cache for it
(the loop device above and the LUN files below have their own).  fsync and flush fsync
every underlying file, so a FLUSH from the loop device reaches the LUNs.  SIGHUP re-reads
the table; a new table must keep every existing byte in place (append an extent, or grow
the last one), else it is refused and the old one stays.  SIGTERM or an unmount stops it.
"""
from __future__ import annotations

import argparse
import bisect
import errno
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

from csi_virtvol.node import layout

logger = logging.getLogger(__name__)

FILE_NAME = layout.CONCAT_FILE_NAME
_FILE_PATH = "/" + FILE_NAME


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
    """FUSE callbacks.  Layout swaps are atomic (one attribute), so readers never lock."""

    use_ns = True

    def __init__(self, table: layout.Table) -> None:
        self._readonly = table.readonly
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self._extents: tuple[layout.BackingExtent, ...] = ()
        self._layout = _Layout(pieces=(), starts=(), size=0)
        self._now = time.time_ns()
        self.reload(table)

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
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

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
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: Any) -> list[str]:
        if path != "/":
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", FILE_NAME]

    def open(self, path: str, fi: Any) -> int:
        if path != _FILE_PATH:
            raise mfusepy.FuseOSError(errno.ENOENT)
        if self._readonly and (fi.flags & os.O_ACCMODE) != os.O_RDONLY:
            raise mfusepy.FuseOSError(errno.EROFS)
        fi.direct_io = 1
        fi.fh = 0
        return 0

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        lay = self._layout
        if offset >= lay.size:
            return b""
        chunks = []
        for piece, within, n in self._spans(lay, offset, size):
            data = os.pread(piece.fd, n, piece.offset + within)
            if len(data) < n:  # a sparse LUN file shorter than its extent reads as zeros
                data += bytes(n - len(data))
            chunks.append(data)
        return b"".join(chunks)

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        if self._readonly:
            raise mfusepy.FuseOSError(errno.EROFS)
        lay = self._layout
        if offset >= lay.size:
            raise mfusepy.FuseOSError(errno.ENOSPC)
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

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        if length != self._layout.size:
            raise mfusepy.FuseOSError(errno.EPERM)
        return 0

    def fsync(self, path: str, datasync: int, fh: Any) -> int:
        with self._fd_lock:
            fds = list(self._fds.values())
        for fd in fds:
            if datasync:
                os.fdatasync(fd)
            else:
                os.fsync(fd)
        return 0

    def flush(self, path: str, fh: Any) -> int:
        if self._readonly:
            return 0
        return self.fsync(path, 0, fh)

    def release(self, path: str, fh: Any) -> int:
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
    ops = ConcatOperations(table)
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
