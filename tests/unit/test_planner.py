"""Copy planner tables: which method moves which piece, and where copies go."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from csi_virtvol import errors
from csi_virtvol.copy import planner
from csi_virtvol.copy.planner import CopyLimits, SlotKind
from csi_virtvol.model.array import Ability, CopyCost, lun_key
from csi_virtvol.model.ids import ArrayId, LunId, VolumeId
from csi_virtvol.model.pair import CopyMethod, ExtentCopyState
from csi_virtvol.model.volume import Extent, VirtualVolume

I, R, H = CopyMethod.INTERNAL, CopyMethod.REMOTE, CopyMethod.HOST
IC, RC, NONE = Ability.INTERNAL_COPY, Ability.REMOTE_COPY, Ability.NONE
A, B, C = ArrayId("a"), ArrayId("b"), ArrayId("c")


def ext(array: str, lun: str, offset: int, length: int) -> Extent:
    return Extent(array=ArrayId(array), lun=LunId(lun), offset=offset, length=length)


def vol(vid: str, *extents: Extent) -> VirtualVolume:
    return VirtualVolume(id=VolumeId(vid), name=vid, size=sum(e.length for e in extents),
                         extents=tuple(extents))


def everyone(a: ArrayId, b: ArrayId) -> bool:
    return True


def nobody(a: ArrayId, b: ArrayId) -> bool:
    return False


def only(*pairs: tuple[str, str]) -> Callable[[ArrayId, ArrayId], bool]:
    allowed = {(ArrayId(x), ArrayId(y)) for x, y in pairs}
    return lambda a, b: (a, b) in allowed


def summary(plan: planner.CopyPlan) -> list[tuple[str, int, int, str, str, CopyMethod]]:
    """(target, virtual offset, length, source lun@off, target lun@off, method)"""
    return [(s.target, s.offset, s.length, f"{s.source.lun}@{s.source.offset}",
             f"{s.target_extent.lun}@{s.target_extent.offset}", s.method) for s in plan.steps]


# --- plan_copy tables ----------------------------------------------------------------------

PLAN_CASES: list[tuple[str, dict[str, object], list[tuple[str, int, int, str, str, CopyMethod]]]] = [
    (
        "single array with internal copy, target is a clone",
        dict(source=vol("s", ext("a", "L1", 0, 100)),
             targets=[vol("t", ext("a", "C1", 0, 100))],
             abilities={A: IC}, clones={"a:C1": "a:L1"}),
        [("t", 0, 100, "L1@0", "C1@0", I)],
    ),
    (
        "single array with internal copy, target not a clone: host",
        dict(source=vol("s", ext("a", "L1", 0, 100)),
             targets=[vol("t", ext("a", "N1", 0, 100))],
             abilities={A: IC}),
        [("t", 0, 100, "L1@0", "N1@0", H)],
    ),
    (
        "single array without internal copy: host even for a 'clone'",
        dict(source=vol("s", ext("a", "L1", 0, 100)),
             targets=[vol("t", ext("a", "C1", 0, 100))],
             abilities={A: NONE}, clones={"a:C1": "a:L1"}),
        [("t", 0, 100, "L1@0", "C1@0", H)],
    ),
    (
        "clone keeps in-LUN offsets; a piece at another offset of the clone is not internal",
        dict(source=vol("s", ext("a", "L1", 50, 30), ext("a", "L1", 200, 20)),
             targets=[vol("t", ext("a", "C1", 50, 30), ext("a", "C1", 0, 20))],
             abilities={A: IC}, clones={"a:C1": "a:L1"}),
        [("t", 0, 30, "L1@50", "C1@50", I), ("t", 30, 20, "L1@200", "C1@0", H)],
    ),
    (
        "mixed arrays: internal, remote for a whole LUN, host for the rest",
        dict(source=vol("s", ext("a", "L1", 0, 100), ext("b", "L2", 0, 60),
                        ext("c", "L3", 0, 40)),
             targets=[vol("t", ext("a", "C1", 0, 100), ext("c", "N2", 0, 60),
                          ext("c", "N3", 0, 40))],
             abilities={A: IC, B: RC, C: NONE}, reachable=everyone,
             clones={"a:C1": "a:L1"}, lun_sizes={"b:L2": 60, "c:N2": 60}),
        [("t", 0, 100, "L1@0", "C1@0", I), ("t", 100, 60, "L2@0", "N2@0", R),
         ("t", 160, 40, "L3@0", "N3@0", H)],
    ),
    (
        "remote copy needs reachability",
        dict(source=vol("s", ext("b", "L2", 0, 60)), targets=[vol("t", ext("c", "N2", 0, 60))],
             abilities={B: RC}, reachable=only(("c", "b")), lun_sizes={"b:L2": 60}),
        [("t", 0, 60, "L2@0", "N2@0", H)],
    ),
    (
        "remote copy of a part of a LUN: host unless the array copies ranges",
        dict(source=vol("s", ext("b", "L2", 10, 50)), targets=[vol("t", ext("c", "N2", 0, 50))],
             abilities={B: RC}, lun_sizes={"b:L2": 60}),
        [("t", 0, 50, "L2@10", "N2@0", H)],
    ),
    (
        "remote copy of a part of a LUN on an array that copies ranges",
        dict(source=vol("s", ext("b", "L2", 10, 50)), targets=[vol("t", ext("c", "N2", 7, 50))],
             abilities={B: RC}, limits={B: CopyLimits(remote_ranges=True)}),
        [("t", 0, 50, "L2@10", "N2@7", R)],
    ),
    (
        "remote never within one array",
        dict(source=vol("s", ext("b", "L2", 0, 60)), targets=[vol("t", ext("b", "N2", 0, 60))],
             abilities={B: RC}, lun_sizes={"b:L2": 60}),
        [("t", 0, 60, "L2@0", "N2@0", H)],
    ),
    (
        "misaligned extents are split at every boundary of either side",
        dict(source=vol("s", ext("a", "L1", 0, 100), ext("b", "L2", 0, 100)),
             targets=[vol("t", ext("c", "X", 0, 30), ext("c", "Y", 10, 150),
                          ext("c", "Z", 0, 40))],
             abilities={A: NONE, B: NONE}),
        [("t", 0, 30, "L1@0", "X@0", H), ("t", 30, 70, "L1@30", "Y@10", H),
         ("t", 100, 80, "L2@0", "Y@80", H), ("t", 180, 20, "L2@80", "Z@0", H)],
    ),
    (
        "a larger target gets only the source's bytes",
        dict(source=vol("s", ext("a", "L1", 0, 100)), targets=[vol("t", ext("c", "X", 0, 500))],
             abilities={}),
        [("t", 0, 100, "L1@0", "X@0", H)],
    ),
    (
        "several targets, different methods (seed [0093])",
        dict(source=vol("s", ext("b", "L2", 0, 60)),
             targets=[vol("t1", ext("a", "N1", 0, 60)), vol("t2", ext("c", "N2", 0, 60))],
             abilities={B: RC}, reachable=only(("b", "c")),
             lun_sizes={"b:L2": 60}),
        [("t1", 0, 60, "L2@0", "N1@0", H), ("t2", 0, 60, "L2@0", "N2@0", R)],
    ),
    (
        "max_remote_targets=1: remote for the first target, host for the rest",
        dict(source=vol("s", ext("b", "L2", 0, 60), ext("b", "L3", 0, 40)),
             targets=[vol("t1", ext("a", "N1", 0, 60), ext("a", "M1", 0, 40)),
                      vol("t2", ext("c", "N2", 0, 60), ext("c", "M2", 0, 40)),
                      vol("t3", ext("c", "N3", 0, 60), ext("c", "M3", 0, 40))],
             abilities={B: RC}, limits={B: CopyLimits(max_remote_targets=1)},
             lun_sizes={"b:L2": 60, "b:L3": 40}),
        [("t1", 0, 60, "L2@0", "N1@0", R), ("t1", 60, 40, "L3@0", "M1@0", R),
         ("t2", 0, 60, "L2@0", "N2@0", H), ("t2", 60, 40, "L3@0", "M2@0", H),
         ("t3", 0, 60, "L2@0", "N3@0", H), ("t3", 60, 40, "L3@0", "M3@0", H)],
    ),
    (
        "max_remote_targets=2 counts target volumes, per source LUN",
        dict(source=vol("s", ext("b", "L2", 0, 60)),
             targets=[vol("t1", ext("a", "N1", 0, 60)), vol("t2", ext("c", "N2", 0, 60)),
                      vol("t3", ext("c", "N3", 0, 60))],
             abilities={B: RC}, limits={B: CopyLimits(max_remote_targets=2)},
             lun_sizes={"b:L2": 60}),
        [("t1", 0, 60, "L2@0", "N1@0", R), ("t2", 0, 60, "L2@0", "N2@0", R),
         ("t3", 0, 60, "L2@0", "N3@0", H)],
    ),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_copy_table(case: tuple[str, dict[str, object], list[object]]) -> None:
    _, kw, expected = case
    kw = {"reachable": everyone, **kw}
    plan = planner.plan_copy(**kw)  # type: ignore[arg-type]
    assert summary(plan) == expected
    # every target's steps tile the source exactly, in order, indexed from 0
    src = kw["source"]
    assert isinstance(src, VirtualVolume)
    for t in kw["targets"]:  # type: ignore[attr-defined]
        steps = plan.for_target(t.id)
        assert [s.index for s in steps] == list(range(len(steps)))
        assert sum(s.length for s in steps) == src.extents_size
        assert all(s.source.length == s.target_extent.length for s in steps)


def test_plan_rejects_short_target_and_bad_targets() -> None:
    s = vol("s", ext("a", "L1", 0, 100))
    with pytest.raises(errors.OutOfRange):
        planner.plan_copy(source=s, targets=[vol("t", ext("a", "X", 0, 99))], abilities={},
                          reachable=everyone)
    with pytest.raises(errors.InvalidRequest):
        planner.plan_copy(source=s, targets=[s], abilities={}, reachable=everyone)
    t = vol("t", ext("a", "X", 0, 100))
    with pytest.raises(errors.InvalidRequest):
        planner.plan_copy(source=s, targets=[t, t], abilities={}, reachable=everyone)
    with pytest.raises(errors.InvalidRequest):
        planner.plan_copy(source=s, targets=[vol("t", ext("a", "X", 0, 0), ext("a", "Y", 0, 100))],
                          abilities={}, reachable=everyone)


def test_extent_copies_mark_internal_done() -> None:
    plan = planner.plan_copy(
        source=vol("s", ext("a", "L1", 0, 100), ext("c", "L3", 0, 50)),
        targets=[vol("t", ext("a", "C1", 0, 100), ext("c", "N", 0, 50))],
        abilities={A: IC}, reachable=everyone, clones={"a:C1": "a:L1"})
    rows = plan.extent_copies(VolumeId("t"))
    assert [(r.index, r.method, r.state, r.bytes_total, r.bytes_done) for r in rows] == [
        (0, I, ExtentCopyState.DONE, 100, 100), (1, H, ExtentCopyState.PENDING, 50, 0)]
    assert plan.bytes_by_method() == {I: 100, H: 50}


# --- place_targets tables ------------------------------------------------------------------

SlotRow = tuple[SlotKind, int, int, str, str | None, int, bool]


def slots(p: planner.Placement) -> list[SlotRow]:
    return [(s.kind, s.offset, s.length, s.array, s.source_lun, s.lun_offset, s.remote)
            for s in p.slots]


CL, PR = SlotKind.CLONE, SlotKind.PROVISION

PLACE_CASES: list[tuple[str, dict[str, object], list[SlotRow], Mapping[str, int]]] = [
    (
        "internal-copy array: clone in place, nothing to provision",
        dict(source=vol("s", ext("a", "L1", 0, 100), ext("a", "L1", 300, 50)),
             abilities={A: IC}),
        [(CL, 0, 100, "a", "L1", 0, False), (CL, 100, 50, "a", "L1", 300, False)],
        {},
    ),
    (
        "no internal copy: provision on the source array, adjacent pieces merged",
        dict(source=vol("s", ext("a", "L1", 0, 100), ext("a", "L2", 0, 50)),
             abilities={A: NONE}),
        [(PR, 0, 150, "a", None, 0, False)],
        {"a": 150},
    ),
    (
        "requested arrays (another StorageClass): no clone on the source array",
        dict(source=vol("s", ext("a", "L1", 0, 100)), abilities={A: IC, C: NONE},
             requested=[C]),
        [(PR, 0, 100, "c", None, 0, False)],
        {"c": 100},
    ),
    (
        "a remote-copy source prefers a reachable array for a whole LUN",
        dict(source=vol("s", ext("b", "L2", 0, 60)), abilities={B: RC, C: NONE},
             reachable=only(("b", "c")), lun_sizes={"b:L2": 60}),
        [(PR, 0, 60, "c", None, 0, True)],
        {"c": 60},
    ),
    (
        "not a whole LUN: remote is no use, stay on the source array",
        dict(source=vol("s", ext("b", "L2", 10, 50)), abilities={B: RC, C: NONE},
             reachable=only(("b", "c")), lun_sizes={"b:L2": 60}),
        [(PR, 0, 50, "b", None, 0, False)],
        {"b": 50},
    ),
    (
        "free space limits: split over arrays, most free first",
        dict(source=vol("s", ext("a", "L1", 0, 100)), abilities={A: NONE, B: NONE, C: NONE},
             free={A: 0, B: 70, C: 40}),
        [(PR, 0, 70, "b", None, 0, False), (PR, 70, 30, "c", None, 0, False)],
        {"b": 70, "c": 30},
    ),
    (
        "min_clone_fill: a LUN mostly not ours is copied, a full one is cloned",
        dict(source=vol("s", ext("a", "L1", 0, 10), ext("a", "L2", 0, 80), ext("a", "L2", 90, 10)),
             abilities={A: IC}, lun_sizes={"a:L1": 1000, "a:L2": 100}, min_clone_fill=0.5),
        [(PR, 0, 10, "a", None, 0, False), (CL, 10, 80, "a", "L2", 0, False),
         (CL, 90, 10, "a", "L2", 90, False)],
        {"a": 10},
    ),
    (
        "a clone that fits is made; it leaves `takes` less room for what is provisioned beside it",
        dict(source=vol("s", ext("a", "L1", 0, 100), ext("b", "L2", 0, 40)),
             abilities={A: IC, B: NONE}, free={A: 130, B: 10},
             clone_costs={"a:L1": CopyCost(needs=90, room=130, takes=90)}),
        [(CL, 0, 100, "a", "L1", 0, False), (PR, 100, 40, "a", None, 0, False)],
        {"a": 40},
    ),
    (
        "issue 12: a clone the array cannot fit falls back to a host copy onto the array with room",
        dict(source=vol("s", ext("a", "L1", 0, 100)), abilities={A: IC, B: NONE},
             free={A: 5, B: 1000}, clone_costs={"a:L1": CopyCost(needs=90, room=5, takes=90)}),
        [(PR, 0, 100, "b", None, 0, False)],
        {"b": 100},
    ),
    (
        "a clone that does not fit falls back to a remote copy first",
        dict(source=vol("s", ext("a", "L1", 0, 100)), abilities={A: IC | RC, B: NONE, C: NONE},
             free={A: 0, B: 1000, C: 2000}, reachable=only(("a", "b")), lun_sizes={"a:L1": 100},
             clone_costs={"a:L1": CopyCost(needs=100, room=0, takes=100)}),
        [(PR, 0, 100, "b", None, 0, True)],
        {"b": 100},
    ),
    (
        "clones of one array must fit together: the second is declined",
        dict(source=vol("s", ext("a", "L1", 0, 100), ext("a", "L2", 0, 100)),
             abilities={A: IC, B: NONE}, free={A: 150, B: 1000},
             clone_costs={"a:L1": CopyCost(needs=100, room=150, takes=100),
                          "a:L2": CopyCost(needs=100, room=150, takes=100)}),
        [(CL, 0, 100, "a", "L1", 0, False), (PR, 100, 100, "b", None, 0, False)],
        {"b": 100},
    ),
    (
        "a thin snapshot needs nothing: cloned even on a full array",
        dict(source=vol("s", ext("a", "L1", 0, 100)), abilities={A: IC, B: NONE},
             free={A: 0, B: 1000}, clone_costs={"a:L1": CopyCost(needs=0, room=0, takes=0)}),
        [(CL, 0, 100, "a", "L1", 0, False)],
        {},
    ),
    (
        "mixed: clone, then provisioned pieces",
        dict(source=vol("s", ext("a", "L1", 0, 100), ext("c", "L3", 0, 40)),
             abilities={A: IC, C: NONE}, free={A: 1000, C: 1000}),
        [(CL, 0, 100, "a", "L1", 0, False), (PR, 100, 40, "c", None, 0, False)],
        {"c": 40},
    ),
]


@pytest.mark.parametrize("case", PLACE_CASES, ids=[c[0] for c in PLACE_CASES])
def test_place_targets_table(case: tuple[str, dict[str, object], list[SlotRow],
                                         Mapping[str, int]]) -> None:
    _, kw, expected, sizes = case
    kw = {"reachable": nobody, **kw}
    p = planner.place_targets(**kw)  # type: ignore[arg-type]
    assert slots(p) == expected
    assert dict(p.sizes) == sizes


def test_place_targets_capacity_exceeded() -> None:
    with pytest.raises(errors.CapacityExceeded):
        planner.place_targets(source=vol("s", ext("a", "L1", 0, 100)),
                              abilities={A: NONE, B: NONE}, reachable=nobody,
                              free={A: 30, B: 30})


def test_declined_clones_are_reported() -> None:
    cost = CopyCost(needs=90, room=5, takes=90)
    p = planner.place_targets(source=vol("s", ext("a", "L1", 0, 100)), abilities={A: IC, B: NONE},
                              reachable=nobody, free={A: 5, B: 1000}, clone_costs={"a:L1": cost})
    assert dict(p.declined) == {"a:L1": cost} and not p.clones
    assert not cost.fits and CopyCost(needs=5, room=5, takes=0).fits


def test_placement_to_plan_round_trip() -> None:
    """place -> make LUNs -> target volume -> plan: clones are INTERNAL and
    remote-eligible slots are REMOTE, the rest HOST."""
    source = vol("s", ext("a", "L1", 10, 90), ext("b", "L2", 0, 60), ext("c", "L3", 5, 20))
    abilities = {A: IC, B: RC, C: NONE}
    reach = only(("b", "c"))
    sizes = {"b:L2": 60}
    p = planner.place_targets(source=source, abilities=abilities, reachable=reach,
                              lun_sizes=sizes, requested=[A, C])
    assert dict(p.clones) == {A: (LunId("L1"),)}
    luns = [LunId(f"new{i}") for i in range(len(p.slots))]
    target = VirtualVolume(id=VolumeId("t"), name="t", size=source.size,
                           extents=planner.target_extents(p, luns=luns))
    new_sizes = {lun_key(s.array, lun): s.length for s, lun in zip(p.slots, luns)}
    plan = planner.plan_copy(source=source, targets=[target], abilities=abilities,
                             reachable=reach, clones=planner.clone_map(p, luns=luns),
                             lun_sizes={**sizes, **new_sizes})
    assert [(s.method, s.length) for s in plan.steps] == [(I, 90), (R, 60), (H, 20)]
