"""Byte ranges over a virtual volume's extents, FIEMAP, and block comparison:
the machinery behind the SnapshotMetadata service (services/metadata.py).

A range is ``(offset, length)``.  Functions taking ranges expect them in
ascending order and not overlapping, and give them back the same way.

FIEMAP (``ioctl(FS_IOC_FIEMAP)``) tells, for a file, which physical extents
back which logical ranges, and flags extents that are *shared* with another
file (a reflink clone).  Two LUN files whose ranges map to the same physical
bytes, both flagged shared, hold the same content there, and ranges where
both files are holes read back as zeros in both: neither needs to be read.
"""
from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from csi_virtvol.model.ids import ArrayId, LunId
from csi_virtvol.model.volume import Extent

Range = tuple[int, int]

BLOCK = 4096          # the grain at which a delta is reported
READ_CHUNK = 1 << 20  # bytes read from each side per comparison step


# ---- ranges ---------------------------------------------------------------------------------

def merge(ranges: Iterable[Range]) -> Iterator[Range]:
    """Ranges given in ascending order, with touching or overlapping ones joined
    and empty ones dropped."""
    cur: Range | None = None
    for off, length in ranges:
        if length <= 0:
            continue
        if cur is not None and off <= cur[0] + cur[1]:
            cur = (cur[0], max(cur[0] + cur[1], off + length) - cur[0])
            continue
        if cur is not None:
            yield cur
        cur = (off, length)
    if cur is not None:
        yield cur


def clip(ranges: Iterable[Range], *, start: int, end: int) -> Iterator[Range]:
    """The parts of `ranges` inside [start, end)."""
    for off, length in ranges:
        lo, hi = max(off, start), min(off + length, end)
        if lo < hi:
            yield lo, hi - lo


def union(a: Iterable[Range], b: Iterable[Range]) -> list[Range]:
    return list(merge(sorted([*a, *b])))


def complement(ranges: Iterable[Range], *, length: int) -> list[Range]:
    """[0, length) minus `ranges`."""
    out: list[Range] = []
    pos = 0
    for off, n in merge(sorted(ranges)):
        if off > pos:
            out.append((pos, min(off, length) - pos))
        pos = max(pos, off + n)
        if pos >= length:
            break
    if pos < length:
        out.append((pos, length - pos))
    return [r for r in out if r[1] > 0]


def to_blocks(ranges: Iterable[Range], *, length: int, block: int = BLOCK) -> list[Range]:
    """`ranges` widened to whole blocks (of a grid starting at 0), within [0, length)."""
    widened = ((off // block * block, -(-(off + n) // block) * block - off // block * block)
               for off, n in ranges)
    return list(clip(merge(widened), start=0, end=length))


# ---- extents --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Span:
    """A run of a virtual volume that lies on one LUN."""

    volume_offset: int
    length: int
    array: ArrayId
    lun: LunId
    lun_offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Piece:
    """A run of the target snapshot together with the same run of the base
    (None where the base is shorter: the volume grew between them)."""

    volume_offset: int
    length: int
    base: Span | None
    target: Span


def spans(extents: Sequence[Extent], *, start: int, end: int) -> list[Span]:
    """The runs of [start, end) of a volume made of `extents`, in volume order."""
    out = []
    base = 0
    for e in extents:
        lo, hi = max(start, base), min(end, base + e.length)
        if lo < hi:
            out.append(Span(volume_offset=lo, length=hi - lo, array=e.array, lun=e.lun,
                            lun_offset=e.offset + (lo - base)))
        base += e.length
        if base >= end:
            break
    return out


def _cut(span: Span, lo: int, hi: int) -> Span:
    return Span(volume_offset=lo, length=hi - lo, array=span.array, lun=span.lun,
                lun_offset=span.lun_offset + (lo - span.volume_offset))


def pieces(base: Sequence[Extent], target: Sequence[Extent], *, start: int, end: int) -> list[Piece]:
    """[start, end) cut wherever an extent of either snapshot ends."""
    out = []
    b = spans(base, start=start, end=end)
    i = 0
    for t in spans(target, start=start, end=end):
        pos, t_end = t.volume_offset, t.volume_offset + t.length
        while pos < t_end:
            while i < len(b) and b[i].volume_offset + b[i].length <= pos:
                i += 1
            if i < len(b) and b[i].volume_offset <= pos:
                hi = min(t_end, b[i].volume_offset + b[i].length)
                out.append(Piece(volume_offset=pos, length=hi - pos, base=_cut(b[i], pos, hi),
                                 target=_cut(t, pos, hi)))
            else:
                hi = min(t_end, b[i].volume_offset) if i < len(b) else t_end
                out.append(Piece(volume_offset=pos, length=hi - pos, base=None, target=_cut(t, pos, hi)))
            pos = hi
    return out


# ---- FIEMAP ---------------------------------------------------------------------------------

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x80
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_SHARED = 0x2000
# where the physical address does not name the bytes themselves
_NOT_COMPARABLE = (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_ENCODED
                   | FIEMAP_EXTENT_DATA_ENCRYPTED | FIEMAP_EXTENT_NOT_ALIGNED | FIEMAP_EXTENT_DATA_INLINE
                   | FIEMAP_EXTENT_DATA_TAIL)

_HEADER = struct.Struct("=QQIIII")        # struct fiemap: start, length, flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")     # struct fiemap_extent: logical, physical, length, 2x reserved64,
                                          # flags, 3x reserved
FIEMAP_BATCH = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class FiemapExtent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def shared_same(self) -> bool:
        """Shared, and its physical address names the bytes."""
        return bool(self.flags & FIEMAP_EXTENT_SHARED) and not self.flags & _NOT_COMPARABLE


def fiemap_request(*, start: int, length: int, count: int, flags: int = FIEMAP_FLAG_SYNC) -> bytearray:
    buf = bytearray(_HEADER.size + count * _EXTENT.size)
    _HEADER.pack_into(buf, 0, start, length, flags, 0, count, 0)
    return buf


def parse_fiemap(buf: bytes | bytearray) -> list[FiemapExtent]:
    """The extents the kernel filled into a FS_IOC_FIEMAP buffer."""
    _, _, _, mapped, count, _ = _HEADER.unpack_from(buf, 0)
    out = []
    for i in range(min(mapped, count)):
        logical, physical, length, _, _, flags, _, _, _ = _EXTENT.unpack_from(buf, _HEADER.size + i * _EXTENT.size)
        out.append(FiemapExtent(logical=logical, physical=physical, length=length, flags=flags))
    return out


def fiemap(fd: int, *, start: int, length: int) -> list[FiemapExtent]:
    """Every extent of the file overlapping [start, start + length) (the file is
    synced first, so delayed allocations have their place).  OSError when the
    filesystem has no FIEMAP."""
    out: list[FiemapExtent] = []
    pos, end = start, start + length
    while pos < end:
        buf = fiemap_request(start=pos, length=end - pos, count=FIEMAP_BATCH)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        got = parse_fiemap(buf)
        if not got:
            break
        out += got
        last = got[-1]
        if last.flags & FIEMAP_EXTENT_LAST:
            break
        pos = max(pos + 1, last.logical + last.length)
    return out


def _relative(extents: Iterable[FiemapExtent], *, offset: int, length: int) -> list[tuple[int, int, int, bool]]:
    """Extents as (relative start, relative end, physical at relative 0, comparable+shared),
    clipped to the window [offset, offset + length) of the file."""
    out = []
    for e in extents:
        lo, hi = max(e.logical, offset), min(e.logical + e.length, offset + length)
        if lo < hi:
            out.append((lo - offset, hi - offset, e.physical - (e.logical - offset), e.shared_same))
    return sorted(out)


def unchanged(base: Iterable[FiemapExtent], target: Iterable[FiemapExtent], *, base_offset: int,
              target_offset: int, length: int) -> list[Range]:
    """Relative ranges of the two windows (each `length` bytes, at `base_offset` in
    the base file and `target_offset` in the target file) known to hold the
    same bytes without reading them: both files a hole there, or both
    mapped to the same physical bytes by extents flagged shared."""
    b = _relative(base, offset=base_offset, length=length)
    t = _relative(target, offset=target_offset, length=length)
    same: list[Range] = []
    i = j = 0
    while i < len(b) and j < len(t):
        lo, hi = max(b[i][0], t[j][0]), min(b[i][1], t[j][1])
        if lo < hi and b[i][3] and t[j][3] and b[i][2] == t[j][2]:
            same.append((lo, hi - lo))
        if b[i][1] <= t[j][1]:
            i += 1
        else:
            j += 1
    both_holes = complement([(s, e - s) for s, e, _, _ in (*b, *t)], length=length)
    return union(same, both_holes)


# ---- comparison -----------------------------------------------------------------------------

def _pread_full(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    while length > 0:
        got = os.pread(fd, length, offset)
        if not got:
            chunks.append(bytes(length))  # past the end: zeros
            break
        chunks.append(got)
        length -= len(got)
        offset += len(got)
    return b"".join(chunks)


def differing_blocks(*, base_fd: int | None, base_offset: int, target_fd: int, target_offset: int,
                     ranges: Iterable[Range], block: int = BLOCK) -> Iterator[Range]:
    """The blocks (relative to the windows' starts) inside `ranges` whose bytes
    differ between the base window and the target window; `base_fd` None reads
    as zeros.  Ranges should start and end on `block` boundaries."""
    for off, length in ranges:
        pos, end = off, off + length
        while pos < end:
            n = min(READ_CHUNK, end - pos)
            t = _pread_full(target_fd, n, target_offset + pos)
            b = _pread_full(base_fd, n, base_offset + pos) if base_fd is not None else bytes(n)
            if t != b:
                tv, bv = memoryview(t), memoryview(b)
                for i in range(0, n, block):
                    if tv[i:i + block] != bv[i:i + block]:
                        yield pos + i, min(block, n - i)
            pos += n


__all__ = ["Range", "BLOCK", "merge", "clip", "union", "complement", "to_blocks", "Span", "Piece",
           "spans", "pieces", "FiemapExtent", "fiemap", "fiemap_request", "parse_fiemap", "unchanged",
           "differing_blocks"]
