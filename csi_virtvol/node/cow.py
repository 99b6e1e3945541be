"""The data structures of a live cut, on files, shared by every composition that cuts.

A cut fixes a volume's image at one instant while the application keeps writing.  From
the cut on, before a chunk (CHUNK bytes of the volume) is overwritten for the first time,
its old contents are appended to the cut's copy-on-write store (CowStore), so a frozen
view can read the image at the cut: preserved chunks from the store, the others from the
live LUNs.  A Bitmap records which chunks were written since a cut (change tracking); it
outlives the copy-on-write store, so a later resync copies only those chunks.

Both are plain files in the volume's node workdir, so a restart of the process that
serves the volume finds them again:

    workdir/cuts/<cut id>/meta.json   {"id", "size", "limit", "chunk"}
    workdir/cuts/<cut id>/cow         records of RECORD bytes: a HEADER-byte header
                                      (magic, chunk number, crc32 of the data), then CHUNK
                                      bytes of data; the record is fdatasync'ed before
                                      the write that overwrites the chunk goes ahead
    workdir/cuts/<cut id>/full        present once the store hit its limit
    workdir/tracking/<cut id>.bitmap  one bit per chunk, written since the cut
    workdir/tracking/<cut id>.bitmap.dirty
                                      "dirty <boot id>" from the first new bit after a
                                      flush until the bits are fdatasync'ed, else "clean"

A torn last record (a crash while appending) fails its crc and is dropped on load: the
write it was guarding never happened, because the write waits for the record.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from csi_virtvol import errors

CHUNK = 64 * 1024
MARKER = ".dirty"   # <bitmap>.dirty, a tracking bitmap's write-intent marker: see Bitmap
HEADER = 4096
RECORD = HEADER + CHUNK
MAGIC = b"VVCOW001"
_HEAD = struct.Struct("<8sQI")

CUT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_cut_id(cut_id: str) -> str:
    if not CUT_ID.match(cut_id):
        raise errors.InvalidRequest(f"cut id {cut_id!r}: letters, digits, '.', '_' and '-' only")
    return cut_id


def chunks_of(size: int) -> int:
    return (size + CHUNK - 1) // CHUNK


def cut_dir(workdir: str, cut_id: str) -> str:
    return os.path.join(workdir, "cuts", check_cut_id(cut_id))


def bitmap_path(workdir: str, cut_id: str) -> str:
    return os.path.join(workdir, "tracking", check_cut_id(cut_id) + ".bitmap")


def list_cuts(workdir: str) -> list[str]:
    try:
        names = os.listdir(os.path.join(workdir, "cuts"))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if CUT_ID.match(n) and not n.endswith(".tmp"))


def list_tracking(workdir: str) -> list[str]:
    try:
        names = os.listdir(os.path.join(workdir, "tracking"))
    except FileNotFoundError:
        return []
    return sorted(n[: -len(".bitmap")] for n in names if n.endswith(".bitmap"))


def remove_cut(workdir: str, cut_id: str) -> None:
    """Drop a cut's directory (its store) from disk; what is gone is fine.  Only for a cut no
    daemon serves: one the daemon serves goes through its `end` command."""
    shutil.rmtree(cut_dir(workdir, cut_id), ignore_errors=True)


def remove_tracking(workdir: str, cut_id: str) -> None:
    _unlink_bitmap(bitmap_path(workdir, cut_id))


def _unlink_bitmap(path: str) -> None:
    """A tracking bitmap and its marker (Bitmap); what is gone is fine."""
    for p in (path, path + MARKER):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def remove_unfinished(workdir: str) -> None:
    """Drop the `<cut id>.tmp` directories of cuts a dead daemon was making: a cut is made
    whole (renamed into place) before the daemon answers, so nobody knows these."""
    try:
        names = os.listdir(os.path.join(workdir, "cuts"))
    except FileNotFoundError:
        return
    for n in names:
        if n.endswith(".tmp"):
            shutil.rmtree(os.path.join(workdir, "cuts", n), ignore_errors=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class CutMeta:
    id: str
    size: int    # the volume's size at the cut: the frozen view's size
    limit: int   # bytes the copy-on-write store may grow to
    at: float = 0.0  # wall clock at the cut, taken while the writes were held

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "size": self.size, "limit": self.limit, "chunk": CHUNK, "at": self.at}

    @classmethod
    def load(cls, path: str) -> CutMeta:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if int(d.get("chunk", CHUNK)) != CHUNK:
            raise errors.BackendError(f"{path}: chunk size {d.get('chunk')} is not {CHUNK}")
        return cls(id=str(d["id"]), size=int(d["size"]), limit=int(d["limit"]), at=float(d.get("at", 0.0)))


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CowStore:
    """The old contents of the chunks overwritten since one cut.  Thread-safe: callers
    serialize preserve() against readers of the same chunk (see concatfs)."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.meta = CutMeta.load(os.path.join(directory, "meta.json"))
        self._fd = os.open(os.path.join(directory, "cow"), os.O_RDWR | os.O_CLOEXEC)
        self._index: dict[int, int] = {}  # chunk -> slot
        self._lock = threading.Lock()
        self.full = os.path.exists(os.path.join(directory, "full"))
        self._load()

    @classmethod
    def create(cls, workdir: str, *, cut_id: str, size: int, limit: int, at: float) -> CowStore:
        """Make the cut's directory atomically (written as .tmp, then renamed)."""
        final = cut_dir(workdir, cut_id)
        if os.path.isdir(final):
            return cls(final)
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        meta = CutMeta(id=cut_id, size=size, limit=limit, at=at)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(os.path.join(tmp, "cow"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fsync(fd)
        os.close(fd)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(parent)
        return cls(final)

    def _load(self) -> None:
        end = os.fstat(self._fd).st_size
        slot = 0
        while (slot + 1) * RECORD <= end:
            head = os.pread(self._fd, _HEAD.size, slot * RECORD)
            magic, chunk, crc = _HEAD.unpack(head)
            data = os.pread(self._fd, CHUNK, slot * RECORD + HEADER)
            if magic != MAGIC or zlib.crc32(data) != crc:
                break
            self._index[chunk] = slot
            slot += 1
        if slot * RECORD != end:
            os.ftruncate(self._fd, slot * RECORD)  # a torn last record: its write never happened

    @property
    def preserved(self) -> int:
        return len(self._index)

    @property
    def used(self) -> int:
        return len(self._index) * RECORD

    def has(self, chunk: int) -> bool:
        return chunk in self._index

    def preserve(self, chunk: int, data: bytes) -> bool:
        """Append the old contents of `chunk`, durably.  False (and the store is marked
        full) when it would pass its limit: the cut is then lost, the write goes on."""
        with self._lock:
            if chunk in self._index:
                return True
            if self.full:
                return False
            slot = len(self._index)
            if (slot + 1) * RECORD > self.meta.limit:
                self._mark_full()
                return False
            if len(data) < CHUNK:
                data = data + bytes(CHUNK - len(data))
            head = _HEAD.pack(MAGIC, chunk, zlib.crc32(data)).ljust(HEADER, b"\0")
            os.pwrite(self._fd, head + data, slot * RECORD)
            os.fdatasync(self._fd)
            self._index[chunk] = slot
            return True

    def _mark_full(self) -> None:
        self.full = True
        fd = os.open(os.path.join(self.dir, "full"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fsync(fd)
        os.close(fd)

    def read(self, chunk: int) -> bytes | None:
        slot = self._index.get(chunk)
        if slot is None:
            return None
        return os.pread(self._fd, CHUNK, slot * RECORD + HEADER)

    def close(self) -> None:
        os.close(self._fd)

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """This boot of the kernel: a page cache that outlived a process is lost with a new one."""
    try:
        with open(BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return ""


class Bitmap:
    """One bit per chunk: written since the cut it is named after.

    A write-intent log, as md's bitmap and dm-era are: a chunk's bit must never be missing
    for a write that reached the LUN, or a resync from it would leave that chunk stale.
    mark() runs before the write and puts the new bits in the page cache at once, which a
    killed process leaves intact; sync() (on every flush the volume receives) makes them
    durable.  Between the two only a power cut or a kernel crash can lose them, while the
    data they guard may already be on disk.  So the first mark after each sync first makes
    a marker durable, `<bitmap>.dirty` holding "dirty <boot id>", and sync() sets it back
    to "clean" once the bits are down.  A bitmap opened with its marker dirty from another
    boot cannot be trusted: every bit is set, and the next resync copies and verifies the
    whole volume rather than miss a chunk.  That costs one fdatasync per flush interval in
    which new chunks were written, not one per write."""

    _CLEAN = b"clean".ljust(64)

    def __init__(self, path: str, *, size: int) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        existed = os.path.exists(path)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        n = (chunks_of(size) + 7) // 8
        have = os.pread(self._fd, max(n, os.fstat(self._fd).st_size), 0)
        self._bits = bytearray(have.ljust(n, b"\0"))
        self._lock = threading.Lock()
        self._dirty = False   # bits written since the last sync
        self._marked = False  # the marker says dirty, durably
        self._gen = 0         # marks so far (a sync clears the marker only if none came meanwhile)
        self._closed = False
        self._boot = boot_id()
        marker = path + MARKER
        self._fresh = not os.path.exists(marker)   # its directory entry not yet made durable
        self._mfd = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        said = os.pread(self._mfd, 64, 0).split()
        # a bitmap without its marker is one a power cut took the marker of (or an older
        # release's): as untrusted as one left dirty by another boot
        self.untrusted = existed and (self._fresh or said[:1] == [b"dirty"] and said[1:2] != [self._boot.encode()])
        if self.untrusted:
            self._bits = bytearray(b"\xff" * n)
            os.pwrite(self._fd, bytes(self._bits), 0)
        if existed:   # (a new one is all clear, and its first mark makes the files durable)
            os.fdatasync(self._fd)   # and what this boot's page cache held of a killed process's marks
            os.pwrite(self._mfd, self._CLEAN, 0)
            os.fdatasync(self._mfd)

    def grow(self, size: int) -> None:
        n = (chunks_of(size) + 7) // 8
        with self._lock:
            if n > len(self._bits):
                self._bits.extend(bytes(n - len(self._bits)))

    def mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first, last = offset // CHUNK, (offset + length - 1) // CHUNK
        with self._lock:
            if self._closed:   # dropped while this write was on its way: nothing tracks it any more
                return
            lo, hi = -1, -1
            for c in range(first, last + 1):
                byte, bit = divmod(c, 8)
                if byte >= len(self._bits):
                    self._bits.extend(bytes(byte + 1 - len(self._bits)))
                if not self._bits[byte] & (1 << bit):
                    self._bits[byte] |= 1 << bit
                    lo = byte if lo < 0 else lo
                    hi = byte
            if lo >= 0:
                if not self._marked:   # before the first bit a power cut could lose, and its write
                    os.pwrite(self._mfd, f"dirty {self._boot}".encode().ljust(64), 0)
                    os.fdatasync(self._mfd)
                    if self._fresh:
                        _fsync_dir(os.path.dirname(self.path))
                        self._fresh = False
                    self._marked = True
                os.pwrite(self._fd, bytes(self._bits[lo:hi + 1]), lo)
                self._dirty = True
                self._gen += 1

    def sync(self) -> None:
        with self._lock:
            if not self._dirty or self._closed:
                return
            self._dirty = False
            gen = self._gen
            fd = os.dup(self._fd)   # its own: a close() meanwhile must not leave it syncing another file
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        with self._lock:
            if self._gen == gen and self._marked and not self._closed:   # no mark since: every bit is down
                os.pwrite(self._mfd, self._CLEAN, 0)  # not synced: a lost "clean" only costs a full resync
                self._marked = False

    def bits(self) -> bytes:
        with self._lock:
            return bytes(self._bits)

    def close(self) -> None:
        """Safe against a mark() or sync() of another thread (a write the daemon was carrying
        when the bitmap was dropped): they find it closed, never a reused descriptor."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._fd)
            os.close(self._mfd)

    def remove(self) -> None:
        self.close()
        _unlink_bitmap(self.path)


def regions(bits: bytes, *, size: int, chunk: int = CHUNK) -> Iterator[tuple[int, int]]:
    """Runs of set bits as (offset, length) byte ranges, clipped to size."""
    start = -1
    total = chunks_of(size) if chunk == CHUNK else (size + chunk - 1) // chunk
    for c in range(total + 1):
        on = c < total and c // 8 < len(bits) and bool(bits[c // 8] & (1 << (c % 8)))
        if on and start < 0:
            start = c
        elif not on and start >= 0:
            yield start * chunk, min(c * chunk, size) - start * chunk
            start = -1
