"""Pure allocation: which LUNs make up a new or grown virtual volume (seed [0076]).

Given the eligible arrays (free space, abilities) and the intact LUNs already on
them, choose extents.  `intact` LUNs are reused before new ones are provisioned;
`single` puts the whole volume on one array; `concat` spreads it across arrays,
either because no one array has room or because `max_extent` bounds each extent.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from csi_virtvol import errors
from csi_virtvol.model.array import Lun, LunState
from csi_virtvol.model.ids import ArrayId, LunId

ALIGN = 1 << 20  # extents and LUNs are whole MiB: every array and dm can address them


class Layout(enum.Enum):
    SINGLE = "single"
    CONCAT = "concat"


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """An array the volume may use, in preference order."""

    array: ArrayId
    free: int
    intact: tuple[Lun, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedExtent:
    array: ArrayId
    lun: LunId
    size: int           # LUN size to provision (or the reused LUN's size)
    length: int         # bytes of the LUN used by the volume (from offset 0)
    reuse: bool = False  # an intact LUN taken over rather than provisioned


def align_up(n: int, unit: int = ALIGN) -> int:
    return -(-n // unit) * unit


def plan_extents(
    *,
    size: int,
    candidates: Sequence[Candidate],
    layout: Layout,
    max_extent: int = 0,
    lun_name: "LunNamer",
    first_index: int = 0,
) -> list[PlannedExtent]:
    """Extents totalling `size` bytes (already aligned by the caller).

    Raises CapacityExceeded when the candidates cannot hold it.
    """
    if size <= 0 or size % ALIGN:
        raise errors.InvalidRequest(f"size {size} must be a positive multiple of {ALIGN}")
    if max_extent and (max_extent < ALIGN or max_extent % ALIGN):
        raise errors.InvalidRequest(f"maxExtentSize must be a multiple of {ALIGN} bytes")
    if layout is Layout.SINGLE:
        if max_extent and size > max_extent:
            raise errors.InvalidRequest("layout single cannot honour maxExtentSize smaller than the volume")
        for c in candidates:
            reused = _best_intact(c.intact, size)
            if reused is not None:
                return [PlannedExtent(array=c.array, lun=reused.id, size=reused.size, length=size, reuse=True)]
        for c in candidates:
            if c.free >= size:
                return [PlannedExtent(array=c.array, lun=lun_name(first_index), size=size, length=size)]
        best = max((c.free for c in candidates), default=0)
        raise errors.CapacityExceeded(
            f"no single array has {size} bytes free (largest free: {best}); use layout concat")
    out: list[PlannedExtent] = []
    remaining = size
    index = first_index
    for c in candidates:
        # intact LUNs first, smallest that fits whole, else largest pieces
        for lun in sorted(c.intact, key=lambda x: x.size, reverse=True):
            if remaining <= 0:
                break
            if lun.state is not LunState.INTACT or lun.size < ALIGN:
                continue
            length = min(lun.size - lun.size % ALIGN, remaining)
            if max_extent:
                length = min(length, max_extent)
            out.append(PlannedExtent(array=c.array, lun=lun.id, size=lun.size, length=length, reuse=True))
            remaining -= length
            index += 1
    for c in candidates:
        free = c.free - c.free % ALIGN
        while remaining > 0 and free >= ALIGN:
            length = min(free, remaining)
            if max_extent:
                length = min(length, max_extent)
            out.append(PlannedExtent(array=c.array, lun=lun_name(index), size=length, length=length))
            index += 1
            free -= length
            remaining -= length
    if remaining > 0:
        total = sum(c.free for c in candidates) + sum(x.size for c in candidates for x in c.intact)
        raise errors.CapacityExceeded(
            f"the eligible arrays hold {total} bytes free, {size} requested")
    return out


class LunNamer:
    """Deterministic LUN names, so a retried create finds what it made before."""

    def __init__(self, *, prefix: str) -> None:
        self._prefix = prefix

    def __call__(self, index: int) -> LunId:
        return LunId(f"{self._prefix}-{index}")


def _best_intact(luns: Sequence[Lun], size: int) -> Lun | None:
    fits = [x for x in luns if x.state is LunState.INTACT and x.size >= size]
    return min(fits, key=lambda x: x.size) if fits else None


DEFAULT_SIZE = 1 << 30


def choose_size(*, required: int, limit: int) -> int:
    """A volume size honouring a CSI CapacityRange, rounded to whole MiB."""
    if required < 0 or limit < 0:
        raise errors.OutOfRange(f"capacity range must not be negative (required {required}, limit {limit})")
    if limit and required > limit:
        raise errors.OutOfRange(f"required_bytes {required} exceeds limit_bytes {limit}")
    if not required and not limit:
        return DEFAULT_SIZE
    size = align_up(required or min(limit, DEFAULT_SIZE))
    if limit and size > limit:
        size = limit - limit % ALIGN
        if size < max(required, 1):
            raise errors.OutOfRange(
                f"no whole-MiB size lies between {required} and {limit} bytes")
    return size
