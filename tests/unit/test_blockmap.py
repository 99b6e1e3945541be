"""The pure parts of SnapshotMetadata (range arithmetic, extent overlap, FIEMAP
buffers, paging) and, on real loop-mounted filesystems, FIEMAP, SEEK_DATA and
block comparison."""
from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest

from csi_virtvol.backends.filepool import FICLONE, data_ranges
from csi_virtvol.model.ids import ArrayId, LunId
from csi_virtvol.model.volume import Extent
from csi_virtvol.services import blockmap as B
from csi_virtvol.services.metadata import Page, _paginate

KiB = 1024
MiB = 1 << 20


def ext(array: str, lun: str, offset: int, length: int) -> Extent:
    return Extent(array=ArrayId(array), lun=LunId(lun), offset=offset, length=length)


# ---- ranges ---------------------------------------------------------------------------------

def test_merge_joins_touching_and_overlapping_and_drops_empty() -> None:
    assert list(B.merge([(0, 4), (4, 4), (10, 0), (12, 2), (13, 5), (30, 1)])) == [(0, 8), (12, 6), (30, 1)]
    assert list(B.merge([])) == []


def test_clip_keeps_only_the_window() -> None:
    assert list(B.clip([(0, 10), (20, 10), (40, 10)], start=5, end=45)) == [(5, 5), (20, 10), (40, 5)]
    assert list(B.clip([(0, 10)], start=10, end=20)) == []


def test_complement_and_union() -> None:
    assert B.complement([(2, 2), (6, 10)], length=10) == [(0, 2), (4, 2)]
    assert B.complement([], length=5) == [(0, 5)]
    assert B.complement([(0, 5)], length=5) == []
    assert B.union([(8, 2), (0, 2)], [(1, 3)]) == [(0, 4), (8, 2)]


def test_to_blocks_widens_to_the_grid_within_the_length() -> None:
    assert B.to_blocks([(100, 10), (4096, 1), (8191, 2)], length=3 * 4096, block=4096) == [(0, 3 * 4096)]
    assert B.to_blocks([(5000, 1)], length=6000, block=4096) == [(4096, 6000 - 4096)]


# ---- extents --------------------------------------------------------------------------------

def test_spans_map_a_window_onto_extents() -> None:
    extents = [ext("a", "l1", 10 * MiB, 4 * MiB), ext("b", "l2", 0, 4 * MiB)]
    got = B.spans(extents, start=3 * MiB, end=6 * MiB)
    assert [(s.volume_offset, s.length, s.array, s.lun, s.lun_offset) for s in got] == [
        (3 * MiB, MiB, "a", "l1", 13 * MiB), (4 * MiB, 2 * MiB, "b", "l2", 0)]
    assert B.spans(extents, start=8 * MiB, end=8 * MiB) == []


def test_pieces_cut_where_either_side_changes_lun_and_mark_growth() -> None:
    base = [ext("a", "b1", 0, 3 * MiB), ext("a", "b2", 0, 2 * MiB)]          # 5 MiB
    target = [ext("a", "t1", MiB, 2 * MiB), ext("a", "t2", 0, 4 * MiB)]     # 6 MiB: grew by 1
    got = [(p.volume_offset, p.length, p.base and (p.base.lun, p.base.lun_offset), p.target.lun,
            p.target.lun_offset) for p in B.pieces(base, target, start=0, end=6 * MiB)]
    assert got == [
        (0, 2 * MiB, ("b1", 0), "t1", MiB),
        (2 * MiB, MiB, ("b1", 2 * MiB), "t2", 0),
        (3 * MiB, 2 * MiB, ("b2", 0), "t2", MiB),
        (5 * MiB, MiB, None, "t2", 3 * MiB),
    ]
    tail = B.pieces(base, target, start=4 * MiB + 4096, end=6 * MiB)
    assert [(p.volume_offset, p.length) for p in tail] == [(4 * MiB + 4096, MiB - 4096), (5 * MiB, MiB)]
    assert tail[0].base is not None and tail[0].base.lun_offset == 2 * MiB + 4096 - MiB


# ---- FIEMAP buffers -------------------------------------------------------------------------

def fiemap_buffer(extents: list[tuple[int, int, int, int]], count: int = 8) -> bytearray:
    buf = B.fiemap_request(start=0, length=1 << 40, count=count)
    struct.pack_into("=I", buf, 20, len(extents))  # fm_mapped_extents
    for i, (logical, physical, length, flags) in enumerate(extents):
        struct.pack_into("=QQQQQIIII", buf, 32 + 56 * i, logical, physical, length, 0, 0, flags, 0, 0, 0)
    return buf


def test_fiemap_request_layout_and_parse() -> None:
    req = B.fiemap_request(start=4096, length=8192, count=3)
    assert len(req) == 32 + 3 * 56
    assert struct.unpack_from("=QQIIII", req) == (4096, 8192, B.FIEMAP_FLAG_SYNC, 0, 3, 0)
    buf = fiemap_buffer([(0, 1 << 30, 65536, B.FIEMAP_EXTENT_SHARED),
                         (65536, 5 << 30, 4096, B.FIEMAP_EXTENT_LAST | B.FIEMAP_EXTENT_UNWRITTEN)])
    got = B.parse_fiemap(buf)
    assert got == [B.FiemapExtent(logical=0, physical=1 << 30, length=65536, flags=B.FIEMAP_EXTENT_SHARED),
                   B.FiemapExtent(logical=65536, physical=5 << 30, length=4096,
                                  flags=B.FIEMAP_EXTENT_LAST | B.FIEMAP_EXTENT_UNWRITTEN)]
    assert got[0].shared_same and not got[1].shared_same


def test_unchanged_needs_same_physical_bytes_both_shared_or_both_holes() -> None:
    S, D = B.FIEMAP_EXTENT_SHARED, B.FIEMAP_EXTENT_DELALLOC
    F = B.FiemapExtent
    # base window at 1 MiB in its file, target window at 0 in its file, 64 KiB each
    base = [F(logical=MiB, physical=1000 * MiB, length=32 * KiB, flags=S),              # rel 0..32K
            F(logical=MiB + 32 * KiB, physical=2000 * MiB, length=8 * KiB, flags=S),    # rel 32..40K
            F(logical=MiB + 48 * KiB, physical=3000 * MiB, length=8 * KiB, flags=S | D)]  # rel 48..56K
    target = [F(logical=0, physical=1000 * MiB, length=16 * KiB, flags=S),                # same bytes
              F(logical=16 * KiB, physical=7000 * MiB, length=16 * KiB, flags=0),         # rewritten
              F(logical=32 * KiB, physical=2000 * MiB, length=8 * KiB, flags=0),          # not flagged shared
              F(logical=48 * KiB, physical=3000 * MiB, length=8 * KiB, flags=S | D)]      # delalloc: unknown
    got = B.unchanged(base, target, base_offset=MiB, target_offset=0, length=64 * KiB)
    # 0..16K shared; 40..48K and 56..64K holes on both sides
    assert got == [(0, 16 * KiB), (40 * KiB, 8 * KiB), (56 * KiB, 8 * KiB)]
    # a shift of physical addresses inside one shared extent is not sameness
    moved = [F(logical=0, physical=1000 * MiB + 4096, length=16 * KiB, flags=S)]
    assert B.unchanged(base[:1], moved, base_offset=MiB, target_offset=0, length=16 * KiB) == []


def test_paginate_merges_and_pages_and_always_sends_one() -> None:
    pages = list(_paginate([(0, 4), (4, 4), (10, 1), (20, 1), (30, 1)], capacity=100, limit=2))
    assert pages == [Page(volume_capacity_bytes=100, blocks=((0, 8), (10, 1))),
                     Page(volume_capacity_bytes=100, blocks=((20, 1), (30, 1)))]
    assert list(_paginate([], capacity=7, limit=2)) == [Page(volume_capacity_bytes=7, blocks=())]


# ---- on real filesystems -------------------------------------------------------------------------

def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.mark.root
def test_data_ranges_finds_written_blocks_and_skips_holes(ext4_mount: Path) -> None:
    path = ext4_mount / f"dr-{os.getpid()}.img"
    sparse(path, 8 * MiB)
    write_at(path, MiB, b"x" * 8192)
    write_at(path, 5 * MiB, b"y" * 4096)
    try:
        assert data_ranges(str(path), offset=0, length=8 * MiB) == [(MiB, 8192), (5 * MiB, 4096)]
        assert data_ranges(str(path), offset=MiB + 4096, length=3 * MiB) == [(MiB + 4096, 4096)]
        assert data_ranges(str(path), offset=MiB + 4096, length=4 * MiB - 4095) == [(MiB + 4096, 4096), (5 * MiB, 1)]
        assert data_ranges(str(path), offset=6 * MiB, length=MiB) == []
    finally:
        path.unlink()


@pytest.mark.root
def test_fiemap_on_a_reflink_clone_leaves_only_rewritten_blocks(xfs_mount: Path) -> None:
    a, b = xfs_mount / f"fa-{os.getpid()}.img", xfs_mount / f"fb-{os.getpid()}.img"
    try:
        sparse(a, 4 * MiB)
        write_at(a, 0, os.urandom(2 * MiB))           # data in the first 2 MiB, hole after
        with open(a, "rb") as src, open(b, "wb") as dst:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        write_at(b, 64 * KiB, b"\x01" * 4096)         # rewrite one block of the clone
        write_at(b, 3 * MiB, b"\x02" * 4096)          # and one in the hole
        fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
        try:
            known = B.unchanged(B.fiemap(fa, start=0, length=4 * MiB), B.fiemap(fb, start=0, length=4 * MiB),
                                base_offset=0, target_offset=0, length=4 * MiB)
            rest = B.complement(known, length=4 * MiB)
            # XFS may CoW a larger grain than the block written: the rest holds the two blocks and is small
            assert all(any(o <= x and x + 4096 <= o + n for o, n in rest) for x in (64 * KiB, 3 * MiB))
            assert sum(n for _, n in rest) <= 2 * MiB
            diff = list(B.merge(B.differing_blocks(base_fd=fa, base_offset=0, target_fd=fb, target_offset=0,
                                                   ranges=B.to_blocks(rest, length=4 * MiB))))
            assert diff == [(64 * KiB, 4096), (3 * MiB, 4096)]
            # reading everything gives the same answer
            assert list(B.merge(B.differing_blocks(base_fd=fa, base_offset=0, target_fd=fb, target_offset=0,
                                                   ranges=[(0, 4 * MiB)]))) == diff
        finally:
            os.close(fa)
            os.close(fb)
    finally:
        for p in (a, b):
            p.unlink(missing_ok=True)


@pytest.mark.root
def test_differing_blocks_against_zeros_and_at_offsets(ext4_mount: Path) -> None:
    t = ext4_mount / f"dz-{os.getpid()}.img"
    try:
        sparse(t, 2 * MiB)
        write_at(t, MiB + 8192, b"\x00" * 4096)       # written, but zeros: no difference
        write_at(t, MiB + 12288, b"z" * 10)           # partial block
        fd = os.open(t, os.O_RDONLY)
        try:
            got = list(B.differing_blocks(base_fd=None, base_offset=0, target_fd=fd, target_offset=MiB,
                                          ranges=[(0, MiB)]))
        finally:
            os.close(fd)
        assert got == [(12288, 4096)]
    finally:
        t.unlink(missing_ok=True)
