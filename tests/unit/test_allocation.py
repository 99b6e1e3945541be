"""The pure allocator: which LUNs make up a volume (seed [0076])."""
from __future__ import annotations

import pytest

from csi_virtvol import errors
from csi_virtvol.model.allocation import (ALIGN, DEFAULT_SIZE, Candidate, Layout, LunNamer, choose_size,
                                          plan_extents)
from csi_virtvol.model.array import Lun, LunOrigin, LunState
from csi_virtvol.model.ids import ArrayId, LunId

M = ALIGN
A, B, C = ArrayId("a"), ArrayId("b"), ArrayId("c")
NAMES = LunNamer(prefix="vv-x")


def intact(array: ArrayId, name: str, size: int) -> Lun:
    return Lun(array=array, id=LunId(name), size=size, address=f"/{name}", state=LunState.INTACT,
               origin=LunOrigin.DISCOVERED)


def shape(planned: list) -> list[tuple[str, str, int, int, bool]]:  # type: ignore[type-arg]
    return [(p.array, p.lun, p.size // M, p.length // M, p.reuse) for p in planned]


@pytest.mark.parametrize("size,cands,layout,max_extent,expected", [
    # single: the first array with room, in preference order
    (8 * M, [Candidate(array=A, free=4 * M), Candidate(array=B, free=16 * M)], Layout.SINGLE, 0,
     [("b", "vv-x-0", 8, 8, False)]),
    # single: an intact LUN that fits is reused before anything is provisioned (smallest that fits)
    (8 * M, [Candidate(array=A, free=64 * M, intact=(intact(A, "big", 32 * M), intact(A, "fit", 8 * M)))],
     Layout.SINGLE, 0, [("a", "fit", 8, 8, True)]),
    # concat: fill the first array, carry on to the next
    (20 * M, [Candidate(array=A, free=12 * M), Candidate(array=B, free=64 * M)], Layout.CONCAT, 0,
     [("a", "vv-x-0", 12, 12, False), ("b", "vv-x-1", 8, 8, False)]),
    # concat: maxExtentSize bounds every extent
    (10 * M, [Candidate(array=A, free=64 * M)], Layout.CONCAT, 4 * M,
     [("a", "vv-x-0", 4, 4, False), ("a", "vv-x-1", 4, 4, False), ("a", "vv-x-2", 2, 2, False)]),
    # concat: intact LUNs first (largest first), partly used when larger than what is left
    (20 * M, [Candidate(array=A, free=64 * M, intact=(intact(A, "l1", 8 * M), intact(A, "l2", 16 * M)))],
     Layout.CONCAT, 0, [("a", "l2", 16, 16, True), ("a", "l1", 8, 4, True)]),
    # concat: free space that is not whole MiB is not used
    (3 * M, [Candidate(array=A, free=2 * M + 4096), Candidate(array=B, free=8 * M)], Layout.CONCAT, 0,
     [("a", "vv-x-0", 2, 2, False), ("b", "vv-x-1", 1, 1, False)]),
])
def test_plan_extents(size: int, cands: list[Candidate], layout: Layout, max_extent: int,
                      expected: list[tuple[str, str, int, int, bool]]) -> None:
    planned = plan_extents(size=size, candidates=cands, layout=layout, max_extent=max_extent, lun_name=NAMES)
    assert shape(planned) == expected
    assert sum(p.length for p in planned) == size


@pytest.mark.parametrize("size,cands,layout,max_extent,error", [
    (8 * M, [Candidate(array=A, free=4 * M), Candidate(array=B, free=4 * M)], Layout.SINGLE, 0,
     errors.CapacityExceeded),
    (9 * M, [Candidate(array=A, free=4 * M), Candidate(array=B, free=4 * M)], Layout.CONCAT, 0,
     errors.CapacityExceeded),
    (8 * M, [Candidate(array=A, free=64 * M)], Layout.SINGLE, 4 * M, errors.InvalidRequest),
    (8 * M + 1, [Candidate(array=A, free=64 * M)], Layout.CONCAT, 0, errors.InvalidRequest),
    (8 * M, [Candidate(array=A, free=64 * M)], Layout.CONCAT, M + 1, errors.InvalidRequest),
    (0, [Candidate(array=A, free=64 * M)], Layout.CONCAT, 0, errors.InvalidRequest),
])
def test_plan_extents_refuses(size: int, cands: list[Candidate], layout: Layout, max_extent: int,
                              error: type[Exception]) -> None:
    with pytest.raises(error):
        plan_extents(size=size, candidates=cands, layout=layout, max_extent=max_extent, lun_name=NAMES)


def test_lun_names_continue_from_the_first_index() -> None:
    planned = plan_extents(size=2 * M, candidates=[Candidate(array=C, free=M), Candidate(array=A, free=M)],
                           layout=Layout.CONCAT, lun_name=NAMES, first_index=3)
    assert [p.lun for p in planned] == ["vv-x-3", "vv-x-4"]


@pytest.mark.parametrize("required,limit,expected", [
    (0, 0, DEFAULT_SIZE),
    (1, 0, M),
    (M, 0, M),
    (M + 1, 4 * M, 2 * M),
    (0, 3 * M + 5, DEFAULT_SIZE if DEFAULT_SIZE <= 3 * M else 3 * M),
    (5 * M, 5 * M, 5 * M),
])
def test_choose_size(required: int, limit: int, expected: int) -> None:
    assert choose_size(required=required, limit=limit) == expected


@pytest.mark.parametrize("required,limit", [(-1, 0), (0, -1), (8 * M, 4 * M), (M + 1, M + 2)])
def test_choose_size_refuses(required: int, limit: int) -> None:
    with pytest.raises(errors.OutOfRange):
        choose_size(required=required, limit=limit)
