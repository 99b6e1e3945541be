"""Which copy method moves which bytes: the seed's volume multiplexing, pure.

Two decisions, both without I/O, both table-tested:

`place_targets` decides where a copy's extents live *before* any LUN exists.
A source extent whose array can copy internally gets a whole-LUN clone of its
LUN (the copy is then instant); the rest is provisioned on arrays chosen by
reachability and free space, and the result says how much to provision where.

`plan_copy` walks a source volume and its (already provisioned) target
volumes in virtual-volume order, splits at every extent boundary of either
side (seed [0095]: the extents need not align) and picks, per piece and per
target, the cheapest method (seed [0091], [0093]):

* INTERNAL  both pieces on one array with INTERNAL_COPY, and the target LUN
            is a whole-LUN clone of the source LUN holding the piece at the
            same in-LUN offset.  `InternalCopyCapable.copy_lun_internal`
            copies whole LUNs only, so the clone relation must be given
            (`clones`); a pre-provisioned target LUN on the same array cannot
            receive an internal copy.
* REMOTE    the source array has REMOTE_COPY, can reach the target array,
            has remote targets left for that source LUN (`max_remote_targets`,
            seed [0093]), and the piece is a whole source LUN landing on the
            start of a target LUN of that size (`start_remote_copy` pushes a
            whole LUN), unless the array copies byte ranges (`remote_ranges`).
* HOST      everything else: the host copy engine (`copy.engine`).
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from csi_virtvol import errors
from csi_virtvol.model.array import Ability, CopyCost, lun_key
from csi_virtvol.model.ids import ArrayId, LunId, VolumeId
from csi_virtvol.model.pair import CopyMethod, ExtentCopy, ExtentCopyState
from csi_virtvol.model.volume import Extent, VirtualVolume

Reachable = Callable[[ArrayId, ArrayId], bool]


@dataclass(frozen=True, slots=True, kw_only=True)
class CopyLimits:
    """Per-array restrictions of its copy functions (defaults: none)."""

    # How many distinct target volumes one source LUN may be remote-copied to
    # in one plan; None is unlimited.  Seed [0093]: "only one copy place".
    max_remote_targets: int | None = None
    # The array's remote copy can copy a byte range into a byte range (not
    # only a whole LUN onto the start of a LUN).
    remote_ranges: bool = False


NO_LIMITS = CopyLimits()


@dataclass(frozen=True, slots=True, kw_only=True)
class CopyStep:
    """One piece of one target: `source` bytes go to `target_extent` by `method`.

    `source` and `target_extent` are slices (same length) of an extent of the
    source and of the target volume; `offset` is their virtual-volume offset.
    """

    target: VolumeId
    index: int           # position of this step among the target's steps
    offset: int          # virtual-volume offset of the piece
    source: Extent
    target_extent: Extent
    method: CopyMethod

    @property
    def length(self) -> int:
        return self.source.length


@dataclass(frozen=True, slots=True, kw_only=True)
class CopyPlan:
    source: VolumeId
    steps: tuple[CopyStep, ...]

    def for_target(self, target: VolumeId) -> tuple[CopyStep, ...]:
        return tuple(s for s in self.steps if s.target == target)

    def bytes_by_method(self) -> dict[CopyMethod, int]:
        out: dict[CopyMethod, int] = {}
        for s in self.steps:
            out[s.method] = out.get(s.method, 0) + s.length
        return out

    def extent_copies(self, target: VolumeId) -> tuple[ExtentCopy, ...]:
        """The pair table rows (seed table 140) for one target, all pending;
        INTERNAL steps are done already (the clone exists when planned)."""
        return tuple(
            ExtentCopy(
                index=s.index,
                method=s.method,
                state=ExtentCopyState.DONE if s.method is CopyMethod.INTERNAL
                else ExtentCopyState.PENDING,
                bytes_total=s.length,
                bytes_done=s.length if s.method is CopyMethod.INTERNAL else 0,
                source_lun=lun_key(s.source.array, s.source.lun),
            )
            for s in self.for_target(target)
        )


def _pieces(source: Sequence[Extent], target: Sequence[Extent],
            size: int) -> list[tuple[int, Extent, Extent]]:
    """Split both extent lists at the union of their boundaries, up to `size`."""
    out: list[tuple[int, Extent, Extent]] = []
    si = ti = 0
    s_used = t_used = 0  # bytes consumed from source[si] / target[ti]
    pos = 0
    while pos < size:
        while si < len(source) and s_used >= source[si].length:
            si, s_used = si + 1, 0
        while ti < len(target) and t_used >= target[ti].length:
            ti, t_used = ti + 1, 0
        if si >= len(source) or ti >= len(target):  # pragma: no cover - sizes checked by caller
            break
        s, t = source[si], target[ti]
        n = min(s.length - s_used, t.length - t_used, size - pos)
        out.append((
            pos,
            Extent(array=s.array, lun=s.lun, offset=s.offset + s_used, length=n),
            Extent(array=t.array, lun=t.lun, offset=t.offset + t_used, length=n),
        ))
        pos += n
        s_used += n
        t_used += n
    return out


def plan_copy(
    *,
    source: VirtualVolume,
    targets: Sequence[VirtualVolume],
    abilities: Mapping[ArrayId, Ability],
    reachable: Reachable,
    clones: Mapping[str, str] | None = None,
    lun_sizes: Mapping[str, int] | None = None,
    limits: Mapping[ArrayId, CopyLimits] | None = None,
) -> CopyPlan:
    """Plan copying `source` (its first `extents_size` bytes) to every target.

    `clones` maps a target LUN key (`lun_key(array, lun)`) to the key of the
    source LUN it is a whole-LUN internal clone of.  `lun_sizes` maps LUN keys
    to LUN sizes; without a LUN's size no piece of it counts as a whole LUN,
    so whole-LUN remote copy is not used for it.  Targets are planned in the
    given order, which decides who gets the limited remote copies.
    """
    clones = clones or {}
    lun_sizes = lun_sizes or {}
    limits = limits or {}
    size = source.extents_size
    _check_extents(source)
    remote_used: dict[str, set[VolumeId]] = {}  # source LUN key -> targets given remote copy
    steps: list[CopyStep] = []
    seen: set[VolumeId] = set()
    for tgt in targets:
        if tgt.id == source.id or tgt.id in seen:
            raise errors.InvalidRequest(f"copy target {tgt.id} is the source or repeated")
        seen.add(tgt.id)
        _check_extents(tgt)
        if tgt.extents_size < size:
            raise errors.OutOfRange(
                f"target {tgt.id} has {tgt.extents_size} bytes of extents, source {source.id} "
                f"needs {size}")
        for i, (pos, s, t) in enumerate(_pieces(source.extents, tgt.extents, size)):
            method = _choose(s, t, target=tgt.id, abilities=abilities, reachable=reachable,
                             clones=clones, lun_sizes=lun_sizes, limits=limits,
                             remote_used=remote_used)
            steps.append(CopyStep(target=tgt.id, index=i, offset=pos, source=s,
                                  target_extent=t, method=method))
    return CopyPlan(source=source.id, steps=tuple(steps))


def _choose(s: Extent, t: Extent, *, target: VolumeId, abilities: Mapping[ArrayId, Ability],
            reachable: Reachable, clones: Mapping[str, str], lun_sizes: Mapping[str, int],
            limits: Mapping[ArrayId, CopyLimits],
            remote_used: dict[str, set[VolumeId]]) -> CopyMethod:
    s_ab = abilities.get(s.array, Ability.NONE)
    s_key, t_key = lun_key(s.array, s.lun), lun_key(t.array, t.lun)
    if (s.array == t.array and Ability.INTERNAL_COPY in s_ab
            and clones.get(t_key) == s_key and s.offset == t.offset):
        return CopyMethod.INTERNAL
    if s.array != t.array and Ability.REMOTE_COPY in s_ab and reachable(s.array, t.array):
        lim = limits.get(s.array, NO_LIMITS)
        shape_ok = lim.remote_ranges or (
            s.offset == 0 and t.offset == 0 and lun_sizes.get(s_key) == s.length)
        used = remote_used.setdefault(s_key, set())
        room = (lim.max_remote_targets is None or target in used
                or len(used) < lim.max_remote_targets)
        if shape_ok and room:
            used.add(target)
            return CopyMethod.REMOTE
    return CopyMethod.HOST


def _check_extents(vol: VirtualVolume) -> None:
    for e in vol.extents:
        if e.length <= 0 or e.offset < 0:
            raise errors.InvalidRequest(f"volume {vol.id} has an empty or negative extent {e}")


# --- placement ---------------------------------------------------------------------------


class SlotKind(enum.Enum):
    CLONE = "clone"          # make with copy_lun_internal(source LUN); extent = (clone, offset, length)
    PROVISION = "provision"  # create a LUN of `length` bytes on `array`; extent = (new LUN, 0, length)


@dataclass(frozen=True, slots=True, kw_only=True)
class Slot:
    """One extent of the future copy, in virtual-volume order."""

    kind: SlotKind
    offset: int          # virtual-volume offset
    length: int
    array: ArrayId
    # CLONE: the source LUN to clone and the in-LUN offset the extent starts at.
    source_lun: LunId | None = None
    lun_offset: int = 0
    # PROVISION: whether the source array can push the piece by remote copy.
    remote: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    slots: tuple[Slot, ...]
    # bytes to provision per array (PROVISION slots; one new LUN per slot)
    sizes: Mapping[ArrayId, int] = field(default_factory=dict)
    # distinct source LUNs to clone per array
    clones: Mapping[ArrayId, tuple[LunId, ...]] = field(default_factory=dict)
    # source LUN key -> the cost of the internal copy its array could not fit (so copied instead)
    declined: Mapping[str, CopyCost] = field(default_factory=dict)


def place_targets(
    *,
    source: VirtualVolume,
    abilities: Mapping[ArrayId, Ability],
    reachable: Reachable,
    requested: Collection[ArrayId] | None = None,
    free: Mapping[ArrayId, int] | None = None,
    lun_sizes: Mapping[str, int] | None = None,
    limits: Mapping[ArrayId, CopyLimits] | None = None,
    min_clone_fill: float = 0.0,
    clone_costs: Mapping[str, CopyCost] | None = None,
) -> Placement:
    """Decide on which arrays a copy of `source` goes.

    Allowed arrays are `requested` (clone into another StorageClass) or else
    every array in `abilities`.  A source extent on an allowed array with
    INTERNAL_COPY becomes a CLONE slot: the whole source LUN is cloned (one
    clone serves every extent of that LUN) and the extent keeps its in-LUN
    offset and length.  Other extents become PROVISION slots on the best
    allowed array with room (`free`, None = unlimited): one the source array
    can remote-copy to (only useful for a whole source LUN, see `plan_copy`),
    then the source's own array, then the array with the most free space; an
    extent larger than any array's room is split.  Adjacent PROVISION slots
    on one array that gain nothing from remote copy are merged into one LUN.
    A clone copies the *whole* source LUN; when the source uses less than
    `min_clone_fill` of a LUN (by `lun_sizes`; unknown sizes pass) its
    extents are provisioned and copied instead, so a clone does not pin a
    mostly foreign LUN.

    A clone is not free: `clone_costs` maps a source LUN key to what its
    array says an internal copy of it costs (`InternalCopyCapable.
    internal_copy_cost`).  Clones are decided first, in source order; the
    clones of one array must fit together (the sum of their `needs` within
    the array's `room`), and each accepted clone leaves `takes` less `free`
    room for what is provisioned there.  A clone that does not fit is
    declined and its extents are placed like any other: remote copy, then
    host copy, onto an array with room.  A LUN without a cost counts as
    free (as before costs were asked).  Raises errors.CapacityExceeded when
    the allowed arrays lack room.
    """
    allowed = list(dict.fromkeys(requested)) if requested is not None else list(abilities)
    if not allowed:
        raise errors.InvalidRequest("no array to place the copy on")
    lun_sizes = lun_sizes or {}
    limits = limits or {}
    room: dict[ArrayId, int | None] = {
        a: (free.get(a, 0) if free is not None else None) for a in allowed}
    _check_extents(source)
    used: dict[str, int] = {}
    for e in source.extents:
        k = lun_key(e.array, e.lun)
        used[k] = used.get(k, 0) + e.length

    def fill_ok(e: Extent) -> bool:
        k = lun_key(e.array, e.lun)
        total = lun_sizes.get(k)
        return total is None or total <= 0 or used[k] >= min_clone_fill * total

    cloned, declined = _decide_clones(source, room=room, abilities=abilities, fill_ok=fill_ok,
                                      costs=clone_costs or {})
    slots: list[Slot] = []
    pos = 0
    for e in source.extents:
        if lun_key(e.array, e.lun) in cloned:
            slots.append(Slot(kind=SlotKind.CLONE, offset=pos, length=e.length, array=e.array,
                              source_lun=e.lun, lun_offset=e.offset))
            pos += e.length
            continue
        whole = e.offset == 0 and lun_sizes.get(lun_key(e.array, e.lun)) == e.length
        left = e.length
        while left > 0:
            arr, can_remote = _pick_array(e, left, room=room, abilities=abilities,
                                          reachable=reachable, whole=whole, limits=limits)
            r = room[arr]
            n = left if r is None else min(left, r)
            if n <= 0:
                raise errors.CapacityExceeded(
                    f"no room for {left} bytes of {source.id} on arrays {sorted(allowed)}")
            if r is not None:
                room[arr] = r - n
            slots.append(Slot(kind=SlotKind.PROVISION, offset=pos, length=n, array=arr,
                              remote=can_remote and n == e.length))
            pos += n
            left -= n
    slots = _merge(slots)
    sizes: dict[ArrayId, int] = {}
    clones: dict[ArrayId, tuple[LunId, ...]] = {}
    for s in slots:
        if s.kind is SlotKind.PROVISION:
            sizes[s.array] = sizes.get(s.array, 0) + s.length
        elif s.source_lun is not None and s.source_lun not in clones.get(s.array, ()):
            clones[s.array] = clones.get(s.array, ()) + (s.source_lun,)
    return Placement(slots=tuple(slots), sizes=sizes, clones=clones, declined=declined)


def _decide_clones(source: VirtualVolume, *, room: dict[ArrayId, int | None],
                   abilities: Mapping[ArrayId, Ability], fill_ok: Callable[[Extent], bool],
                   costs: Mapping[str, CopyCost]) -> tuple[set[str], dict[str, CopyCost]]:
    """Which source LUNs are cloned (by key), and the costs of those declined for lack of
    room; `room` loses what the accepted clones take."""
    cloned: set[str] = set()
    declined: dict[str, CopyCost] = {}
    needed: dict[ArrayId, int] = {}  # what the accepted clones of each array need together
    for e in source.extents:
        k = lun_key(e.array, e.lun)
        if k in cloned or k in declined:
            continue
        if e.array not in room or Ability.INTERNAL_COPY not in abilities.get(e.array, Ability.NONE) \
                or not fill_ok(e):
            continue
        cost = costs.get(k)
        if cost is None:
            cloned.add(k)
            continue
        if needed.get(e.array, 0) + cost.needs > cost.room:
            declined[k] = cost
            continue
        cloned.add(k)
        needed[e.array] = needed.get(e.array, 0) + cost.needs
        r = room[e.array]
        if r is not None:
            room[e.array] = max(0, r - cost.takes)
    return cloned, declined


def _pick_array(e: Extent, need: int, *, room: Mapping[ArrayId, int | None],
                abilities: Mapping[ArrayId, Ability], reachable: Reachable, whole: bool,
                limits: Mapping[ArrayId, CopyLimits]) -> tuple[ArrayId, bool]:
    s_ab = abilities.get(e.array, Ability.NONE)
    lim = limits.get(e.array, NO_LIMITS)

    def remote_ok(a: ArrayId) -> bool:
        return (a != e.array and Ability.REMOTE_COPY in s_ab and (whole or lim.remote_ranges)
                and reachable(e.array, a))

    def rank(a: ArrayId) -> tuple[int, int, int, str]:
        r = room[a]
        fits = 0 if r is None or r >= need else 1
        pref = 0 if remote_ok(a) else (1 if a == e.array else 2)
        return (fits, pref, -(r if r is not None else 1 << 62), str(a))

    candidates = [a for a in room if room[a] is None or (room[a] or 0) > 0]
    if not candidates:
        raise errors.CapacityExceeded(f"no free space left for {need} bytes")
    best = min(candidates, key=rank)
    return best, remote_ok(best)


def _merge(slots: list[Slot]) -> list[Slot]:
    out: list[Slot] = []
    for s in slots:
        p = out[-1] if out else None
        if (p is not None and s.kind is p.kind is SlotKind.PROVISION and s.array == p.array
                and not s.remote and not p.remote):
            out[-1] = Slot(kind=SlotKind.PROVISION, offset=p.offset, length=p.length + s.length,
                           array=p.array)
        else:
            out.append(s)
    return out


def target_extents(placement: Placement, *, luns: Sequence[LunId]) -> tuple[Extent, ...]:
    """The copy's extents once the slots' LUNs exist: `luns[i]` is slot i's
    LUN (the clone or the new LUN)."""
    if len(luns) != len(placement.slots):
        raise errors.InvalidRequest(f"{len(luns)} LUNs for {len(placement.slots)} slots")
    return tuple(
        Extent(array=s.array, lun=lun,
               offset=s.lun_offset if s.kind is SlotKind.CLONE else 0, length=s.length)
        for s, lun in zip(placement.slots, luns))


def clone_map(placement: Placement, *, luns: Sequence[LunId]) -> dict[str, str]:
    """`plan_copy`'s `clones` argument for the LUNs made from `placement`."""
    out: dict[str, str] = {}
    for s, lun in zip(placement.slots, luns, strict=True):
        if s.kind is SlotKind.CLONE and s.source_lun is not None:
            out[lun_key(s.array, lun)] = lun_key(s.array, s.source_lun)
    return out


__all__ = ["CopyLimits", "CopyStep", "CopyPlan", "plan_copy", "SlotKind", "Slot", "Placement",
           "place_targets", "target_extents", "clone_map", "Reachable"]
