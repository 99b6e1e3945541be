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
    try:
        os.unlink(bitmap_path(workdir, cut_id))
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


class Bitmap:
    """One bit per chunk: written since the cut it is named after.  mark() writes the
    changed bytes at once (a process crash keeps them: they are in the page cache);
    sync() makes them durable and is called on every flush the volume receives, so a
    write acknowledged to the application is never missing from the bitmap."""

    def __init__(self, path: str, *, size: int) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        n = (chunks_of(size) + 7) // 8
        have = os.pread(self._fd, max(n, os.fstat(self._fd).st_size), 0)
        self._bits = bytearray(have.ljust(n, b"\0"))
        self._lock = threading.Lock()
        self._dirty = False

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
                os.pwrite(self._fd, bytes(self._bits[lo:hi + 1]), lo)
                self._dirty = True

    def sync(self) -> None:
        if self._dirty:
            self._dirty = False
            os.fdatasync(self._fd)

    def bits(self) -> bytes:
        with self._lock:
            return bytes(self._bits)

    def close(self) -> None:
        os.close(self._fd)

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


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
