"""Snapshot metadata (CSI SnapshotMetadata): a snapshot's allocated ranges,
and the ranges that changed between two snapshots of one volume.

Ranges are byte ranges of the snapshot as a volume (VARIABLE_LENGTH in CSI
terms), in ascending order, merged where they touch, streamed in pages.

Allocated: for each extent, the data ranges of its LUN window, from the
array (`AllocationMapCapable`: SEEK_DATA on a file pool, the NBD
``base:allocation`` map on qsd); an array that cannot say counts its whole
window as allocated.

Delta: the two snapshots' extents are cut into pieces that each lie on one
LUN of either.  In a piece, what is known to be equal without reading it is
skipped: ranges both LUNs leave as holes, and (LUN files on one filesystem)
ranges FIEMAP maps to the same physical extent, flagged shared, in both (a
reflink clone and the volume it was cut from share them until either is
rewritten).  The rest is read from both sides and compared, in 4 KiB blocks;
the blocks that differ are the delta.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from csi_virtvol import errors
from csi_virtvol.backends.base import AllocationMapCapable
from csi_virtvol.model.volume import VirtualVolume, VolumeKind, VolumeState
from csi_virtvol.services import blockmap as B
from csi_virtvol.services.arrays import ArrayPool
from csi_virtvol.services.volumes import VolumeService

log = logging.getLogger(__name__)

DEFAULT_MAX_RESULTS = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class Page:
    """One response of the stream: at most max_results ranges."""

    volume_capacity_bytes: int
    blocks: tuple[B.Range, ...]


class SnapshotMetadataService:
    def __init__(self, *, volumes: VolumeService, arrays: ArrayPool) -> None:
        self._volumes = volumes
        self._arrays = arrays

    # -- GetMetadataAllocated ------------------------------------------------
    def allocated(self, *, snapshot_id: str, starting_offset: int, max_results: int) -> Iterator[Page]:
        """Checks the request now (raising domain errors), then gives the pages lazily."""
        limit = _limit(max_results)
        _offset_sign(starting_offset)
        snap = self._snapshot(snapshot_id, "snapshot_id")
        _offset_within(starting_offset, snap.size)
        return _paginate(self._allocated(snap, start=starting_offset), capacity=snap.size, limit=limit)

    def _allocated(self, snap: VirtualVolume, *, start: int) -> Iterator[B.Range]:
        for s in B.spans(snap.extents, start=start, end=snap.size):
            for off, n in self._lun_allocated(s):
                yield s.volume_offset + (off - s.lun_offset), n

    def _lun_allocated(self, s: B.Span) -> Iterable[B.Range]:
        driver = self._arrays.driver(s.array)
        if isinstance(driver, AllocationMapCapable):
            return B.clip(driver.allocated_ranges(lun_id=s.lun, offset=s.lun_offset, length=s.length),
                          start=s.lun_offset, end=s.lun_offset + s.length)
        return [(s.lun_offset, s.length)]

    # -- GetMetadataDelta ----------------------------------------------------
    def delta(self, *, base_snapshot_id: str, target_snapshot_id: str, starting_offset: int,
              max_results: int) -> Iterator[Page]:
        """Checks the request now (raising domain errors), then gives the pages lazily."""
        limit = _limit(max_results)
        _offset_sign(starting_offset)
        base = self._snapshot(base_snapshot_id, "base_snapshot_id")
        target = self._snapshot(target_snapshot_id, "target_snapshot_id")
        if base.source_volume != target.source_volume:
            raise errors.InvalidRequest(
                f"snapshots {base.id} and {target.id} are of different volumes "
                f"({base.source_volume or '?'}, {target.source_volume or '?'})")
        if target.created_at < base.created_at:
            raise errors.InvalidRequest(f"target snapshot {target.id} was cut before base snapshot {base.id}")
        _offset_within(starting_offset, target.size)
        return _paginate(self._delta(base, target, start=starting_offset), capacity=target.size, limit=limit)

    def _delta(self, base: VirtualVolume, target: VirtualVolume, *, start: int) -> Iterator[B.Range]:
        grid = start - start % B.BLOCK  # blocks are counted from the volume's start
        for p in B.pieces(base.extents, target.extents, start=grid, end=target.size):
            try:
                for off, n in self._piece_delta(p):
                    yield from B.clip([(p.volume_offset + off, n)], start=start, end=target.size)
            except OSError as e:
                raise errors.BackendError(f"comparing {base.id} with {target.id} at {p.volume_offset}: {e}") from e

    def _piece_delta(self, p: B.Piece) -> Iterator[B.Range]:
        t = p.target
        with contextlib.ExitStack() as files:
            t_fd = files.enter_context(_opened(self._arrays.driver(t.array).open_path(lun_id=t.lun)))
            if p.base is None:  # the volume grew after the base: compare with zeros
                candidates = [(o - t.lun_offset, n) for o, n in self._lun_allocated(t)]
                yield from B.differing_blocks(base_fd=None, base_offset=0, target_fd=t_fd,
                                              target_offset=t.lun_offset,
                                              ranges=B.to_blocks(candidates, length=p.length))
                return
            b = p.base
            b_fd = files.enter_context(_opened(self._arrays.driver(b.array).open_path(lun_id=b.lun)))
            known = _shared_or_holes(b_fd, b.lun_offset, t_fd, t.lun_offset, p.length)
            if known is None:
                how = "allocation maps"
                candidates = B.union(((o - b.lun_offset, n) for o, n in self._lun_allocated(b)),
                                     ((o - t.lun_offset, n) for o, n in self._lun_allocated(t)))
            else:
                how = "fiemap"
                candidates = B.complement(known, length=p.length)
            ranges = B.to_blocks(candidates, length=p.length)
            log.debug("delta %s:%s -> %s:%s at %d: reading %d of %d bytes (%s)", b.array, b.lun, t.array, t.lun,
                      p.volume_offset, sum(n for _, n in ranges), p.length, how)
            yield from B.merge(B.differing_blocks(base_fd=b_fd, base_offset=b.lun_offset, target_fd=t_fd,
                                                  target_offset=t.lun_offset, ranges=ranges))

    # -- look-ups ------------------------------------------------------------
    def _snapshot(self, snapshot_id: str, field: str) -> VirtualVolume:
        if not snapshot_id:
            raise errors.InvalidRequest(f"{field} is required")
        snap = self._volumes.get(snapshot_id, kind=VolumeKind.SNAPSHOT)
        if snap.state is not VolumeState.AVAILABLE:
            raise errors.PreconditionFailed(f"snapshot {snapshot_id} is not ready ({snap.state.value})")
        return snap


def _limit(max_results: int) -> int:
    if max_results < 0:
        raise errors.InvalidRequest(f"max_results {max_results} is negative")
    return max_results or DEFAULT_MAX_RESULTS


def _offset_sign(starting_offset: int) -> None:
    if starting_offset < 0:
        raise errors.OutOfRange(f"starting_offset {starting_offset} is negative")


def _offset_within(starting_offset: int, capacity: int) -> None:
    # CSI: OUT_OF_RANGE when it "exceeds the volume size"; at the size, nothing is left to list
    if starting_offset > capacity:
        raise errors.OutOfRange(f"starting_offset {starting_offset} exceeds the volume size {capacity}")


def _paginate(ranges: Iterable[B.Range], *, capacity: int, limit: int) -> Iterator[Page]:
    """Merged ranges in pages of at most `limit`; one empty page when there are none,
    so the caller always learns the capacity."""
    batch: list[B.Range] = []
    sent = False
    for r in B.merge(ranges):
        batch.append(r)
        if len(batch) == limit:
            yield Page(volume_capacity_bytes=capacity, blocks=tuple(batch))
            batch, sent = [], True
    if batch or not sent:
        yield Page(volume_capacity_bytes=capacity, blocks=tuple(batch))


@contextlib.contextmanager
def _opened(path: str) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise errors.BackendError(f"cannot read {path}: {e}") from e
    try:
        yield fd
    finally:
        os.close(fd)


def _shared_or_holes(b_fd: int, b_off: int, t_fd: int, t_off: int, length: int) -> list[B.Range] | None:
    """What FIEMAP proves equal in the two windows (relative ranges), or None
    when it cannot tell: not two regular files of one filesystem, or no FIEMAP."""
    b_st, t_st = os.fstat(b_fd), os.fstat(t_fd)
    if not (stat.S_ISREG(b_st.st_mode) and stat.S_ISREG(t_st.st_mode)) or b_st.st_dev != t_st.st_dev:
        return None
    try:
        b_map = B.fiemap(b_fd, start=b_off, length=length)
        t_map = B.fiemap(t_fd, start=t_off, length=length)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EBADR):
            log.warning("FIEMAP failed (%s); comparing the content", e)
        return None
    return B.unchanged(b_map, t_map, base_offset=b_off, target_offset=t_off, length=length)


__all__ = ["SnapshotMetadataService", "Page", "DEFAULT_MAX_RESULTS"]
