"""The StateStore contract, run against every store in stores.STORE_FACTORIES.

Nothing here may know which store it talks to: implementation details go in
that store's own unit tests.  Revisions are compared only for (in)equality,
never parsed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi_virtvol import errors
from csi_virtvol.model.array import Ability, ArrayIdentity, ArrayInfo, Lun, LunOrigin, LunState
from csi_virtvol.model.group import GroupSnapshot, GroupState
from csi_virtvol.model.capability import AccessMode, AccessType
from csi_virtvol.model.ids import ArrayId, GroupSnapshotId, LunId, NodeId, PairId, Revision, VolumeId
from csi_virtvol.model.pair import CopyMethod, ExtentCopy, ExtentCopyState, Pair, PairState, PairTarget
from csi_virtvol.model.volume import (
    Attachment, CopyRole, Extent, VirtualVolume, VolumeKind, VolumeState, volume_address,
)
from csi_virtvol.store.base import ARRAYS, GROUPS, LUNS, PAIRS, VOLUMES, Change, StateStore, Table

from stores import STORE_FACTORIES

WATCH_LIMIT = 30.0  # seconds: an upper bound for events to arrive, never a timing assertion


@pytest.fixture(params=[f for _, f in STORE_FACTORIES], ids=[i for i, _ in STORE_FACTORIES])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    with request.param(tmp_path) as s:
        yield s


# -- realistic records -------------------------------------------------------

def array(ident: str, **kw: Any) -> ArrayInfo:
    fields: dict[str, Any] = dict(
        id=ArrayId(ident), kind="filepool",
        identity=ArrayIdentity(vendor="virtvol", model="xfs-reflink", version="1.0"),
        probed=Ability.INTERNAL_COPY | Ability.GROW_LUN,
        abilities=Ability.INTERNAL_COPY | Ability.GROW_LUN | Ability.DIRTY_TRACKING,
        capacity_total=100 << 30, capacity_free=60 << 30,
        labels={"tier": "gold", "site": "a"}, topology={"topology.virtvol.io/zone": "z1"},
    )
    fields.update(kw)
    return ArrayInfo(**fields)


def lun(arr: str, ident: str, *, volume: str = "", size: int = 1 << 30) -> Lun:
    return Lun(array=ArrayId(arr), id=LunId(ident), size=size,
               address=f"/var/lib/virtvol/{arr}/{ident}.img",
               state=LunState.IN_USE if volume else LunState.INTACT,
               origin=LunOrigin.PROVISIONED, volume=volume)


def volume(ident: str, *, name: str = "", kind: VolumeKind = VolumeKind.VOLUME, source: str = "",
           **kw: Any) -> VirtualVolume:
    fields: dict[str, Any] = dict(
        id=VolumeId(ident), name=name or f"pvc-{ident}", size=3 << 30,
        extents=(
            Extent(array=ArrayId("gold"), lun=LunId("l1"), offset=0, length=1 << 30),
            Extent(array=ArrayId("silver"), lun=LunId("l7"), offset=4096, length=2 << 30),
        ),
        kind=kind, state=VolumeState.AVAILABLE, address=volume_address(VolumeId(ident)),
        parameters={"fsType": "xfs", "arrays": "gold,silver"},
        mutable_parameters={"iops": "1000"},
        content_source=f"volume:{source}" if source else "", source_volume=source,
        role=CopyRole.SOURCE,
        attachments=(Attachment(node=NodeId("node-1"), readonly=False),  # as recorded before modes were
                     Attachment(node=NodeId("node-2"), readonly=True, access_mode=AccessMode.MULTI_NODE_READER_ONLY,
                                access_type=AccessType.BLOCK)),
        topology={"topology.virtvol.io/zone": "z1"}, created_at=1718000000.25,
        message="created from 2 arrays",
    )
    fields.update(kw)
    return VirtualVolume(**fields)


def pair(ident: str, *, source: str) -> Pair:
    return Pair(
        id=PairId(ident), source=VolumeId(source),
        targets=(
            PairTarget(volume=VolumeId(f"{ident}-t1"), state=PairState.COPYING,
                       extents=(ExtentCopy(index=0, method=CopyMethod.INTERNAL,
                                           state=ExtentCopyState.DONE, bytes_total=1 << 30,
                                           bytes_done=1 << 30),
                                ExtentCopy(index=1, method=CopyMethod.HOST,
                                           state=ExtentCopyState.COPYING, bytes_total=2 << 30,
                                           bytes_done=12345, message="dd running")),
                       started_at=1718000001.5),
            PairTarget(volume=VolumeId(f"{ident}-t2"), state=PairState.FAILED,
                       extents=(ExtentCopy(index=0, method=CopyMethod.REMOTE,
                                           state=ExtentCopyState.FAILED, bytes_total=1 << 30),),
                       started_at=1718000001.5, ended_at=1718000002.0, reason="link down"),
        ),
    )


def group(ident: str, *, state: GroupState = GroupState.CUT) -> GroupSnapshot:
    return GroupSnapshot(
        id=GroupSnapshotId(ident), name=f"vgs-{ident}", sources=(VolumeId("v2"), VolumeId("v1")),
        members=(VolumeId(f"{ident}-s2"), VolumeId(f"{ident}-s1")), state=state,
        parameters={"arrays": "gold"}, created_at=1718000003.5,
        cut_at=1718000004.25 if state is GroupState.CUT else 0.0)


ROUND_TRIP: list[tuple[str, Table[Any], Any]] = [
    ("array", ARRAYS, array("gold")),
    ("array-no-abilities", ARRAYS, array("bare", probed=Ability.NONE, abilities=Ability.NONE,
                                         labels={}, topology={})),
    ("lun-intact", LUNS, lun("gold", "l1")),
    ("lun-in-use", LUNS, dataclasses.replace(lun("gold", "l2", volume="v1"),
                                             origin=LunOrigin.DISCOVERED)),
    ("volume", VOLUMES, volume("v1")),
    ("snapshot", VOLUMES, volume("s1", kind=VolumeKind.SNAPSHOT, source="v1", attachments=(),
                                 role=CopyRole.COPY)),
    ("pair", PAIRS, pair("p1", source="v1")),
    ("group", GROUPS, group("g1")),
    ("group-cutting", GROUPS, group("g2", state=GroupState.CUTTING)),
]


# -- basic CRUD ----------------------------------------------------------------

@pytest.mark.parametrize("table,record", [(t, r) for _, t, r in ROUND_TRIP],
                         ids=[i for i, _, _ in ROUND_TRIP])
def test_round_trip(store: StateStore, table: Table[Any], record: Any) -> None:
    key = table.key(record)
    assert store.get(table, key) is None
    rev = store.create(table, record)
    got = store.get(table, key)
    assert got is not None
    assert got.value == record
    assert got.revision == rev
    assert [v.value for v in store.list(table)] == [record]


def test_tables_are_separate(store: StateStore) -> None:
    store.create(ARRAYS, array("x"))
    store.create(VOLUMES, volume("x"))
    store.create(GROUPS, group("x"))
    assert [v.value.id for v in store.list(ARRAYS)] == ["x"]
    assert [v.value.id for v in store.list(VOLUMES)] == ["x"]
    assert [v.value.id for v in store.list(GROUPS)] == ["x"]
    assert store.list(LUNS) == [] and store.list(PAIRS) == []
    store.delete(ARRAYS, "x")
    assert store.get(VOLUMES, "x") is not None


def test_update_replaces_and_changes_revision(store: StateStore) -> None:
    rev1 = store.create(VOLUMES, volume("v1"))
    changed = dataclasses.replace(volume("v1"), state=VolumeState.DELETING, attachments=(),
                                  message="deleting")
    rev2 = store.update(VOLUMES, changed, revision=rev1)
    assert rev2 != rev1
    got = store.get(VOLUMES, "v1")
    assert got is not None and got.value == changed and got.revision == rev2


def test_group_moves_from_cutting_to_cut_and_is_deleted(store: StateStore) -> None:
    rev = store.create(GROUPS, group("g1", state=GroupState.CUTTING))
    cut = group("g1")
    rev2 = store.update(GROUPS, cut, revision=rev)
    with pytest.raises(errors.Conflict):
        store.update(GROUPS, cut, revision=rev)
    got = store.get(GROUPS, "g1")
    assert got is not None and got.value == cut and got.revision == rev2
    store.delete(GROUPS, "g1")
    assert store.get(GROUPS, "g1") is None and store.list(GROUPS) == []


def test_double_create_conflicts(store: StateStore) -> None:
    rev = store.create(ARRAYS, array("gold"))
    with pytest.raises(errors.Conflict):
        store.create(ARRAYS, array("gold", capacity_free=1))
    got = store.get(ARRAYS, "gold")
    assert got is not None and got.revision == rev and got.value == array("gold")


def test_stale_update_conflicts(store: StateStore) -> None:
    rev1 = store.create(ARRAYS, array("gold"))
    rev2 = store.update(ARRAYS, array("gold", capacity_free=1), revision=rev1)
    with pytest.raises(errors.Conflict):
        store.update(ARRAYS, array("gold", capacity_free=2), revision=rev1)
    got = store.get(ARRAYS, "gold")
    assert got is not None and got.revision == rev2 and got.value.capacity_free == 1


def test_update_missing_is_not_found(store: StateStore) -> None:
    with pytest.raises(errors.NotFound):
        store.update(ARRAYS, array("ghost"), revision=Revision("1"))
    rev = store.create(ARRAYS, array("gold"))
    store.delete(ARRAYS, "gold")
    with pytest.raises(errors.NotFound):
        store.update(ARRAYS, array("gold"), revision=rev)


def test_delete(store: StateStore) -> None:
    store.create(LUNS, lun("gold", "l1"))
    store.create(LUNS, lun("gold", "l2"))
    store.delete(LUNS, "gold:l1")
    assert store.get(LUNS, "gold:l1") is None
    assert [v.value.key for v in store.list(LUNS)] == ["gold:l2"]


def test_delete_missing_is_noop(store: StateStore) -> None:
    store.delete(LUNS, "gold:nothing")
    store.delete(LUNS, "gold:nothing", revision=Revision("1"))
    store.create(LUNS, lun("gold", "l1"))
    store.delete(LUNS, "gold:l1")
    store.delete(LUNS, "gold:l1")
    assert store.list(LUNS) == []


def test_delete_with_revision(store: StateStore) -> None:
    rev1 = store.create(LUNS, lun("gold", "l1"))
    rev2 = store.update(LUNS, lun("gold", "l1", volume="v1"), revision=rev1)
    with pytest.raises(errors.Conflict):
        store.delete(LUNS, "gold:l1", revision=rev1)
    got = store.get(LUNS, "gold:l1")
    assert got is not None and got.revision == rev2
    store.delete(LUNS, "gold:l1", revision=rev2)
    assert store.get(LUNS, "gold:l1") is None


def test_recreate_after_delete(store: StateStore) -> None:
    rev1 = store.create(ARRAYS, array("gold"))
    store.delete(ARRAYS, "gold")
    rev2 = store.create(ARRAYS, array("gold", capacity_free=5))
    assert rev2 != rev1
    with pytest.raises(errors.Conflict):
        store.update(ARRAYS, array("gold"), revision=rev1)
    got = store.get(ARRAYS, "gold")
    assert got is not None and got.value.capacity_free == 5


# -- secondary indexes -----------------------------------------------------------

def keys(versioned: list[Any], table: Table[Any]) -> list[str]:
    return [table.key(v.value) for v in versioned]


def test_luns_by_array_and_volume(store: StateStore) -> None:
    for rec in (lun("silver", "l9", volume="v1"), lun("gold", "l2", volume="v1"),
                lun("gold", "l1"), lun("silver", "l3"), lun("gold", "l3", volume="v2")):
        store.create(LUNS, rec)
    assert keys(store.find(LUNS, index="array", value="gold"), LUNS) == ["gold:l1", "gold:l2", "gold:l3"]
    assert keys(store.find(LUNS, index="array", value="silver"), LUNS) == ["silver:l3", "silver:l9"]
    assert keys(store.find(LUNS, index="volume", value="v1"), LUNS) == ["gold:l2", "silver:l9"]
    assert keys(store.find(LUNS, index="volume", value=""), LUNS) == ["gold:l1", "silver:l3"]
    assert store.find(LUNS, index="array", value="bronze") == []
    got = store.find(LUNS, index="volume", value="v2")
    assert [v.value for v in got] == [lun("gold", "l3", volume="v2")]
    assert got[0].revision == store.get(LUNS, "gold:l3").revision  # type: ignore[union-attr]


def test_index_follows_update_and_delete(store: StateStore) -> None:
    rev = store.create(LUNS, lun("gold", "l1"))
    store.create(LUNS, lun("gold", "l2"))
    store.update(LUNS, lun("gold", "l1", volume="v1"), revision=rev)
    assert keys(store.find(LUNS, index="volume", value=""), LUNS) == ["gold:l2"]
    assert keys(store.find(LUNS, index="volume", value="v1"), LUNS) == ["gold:l1"]
    store.delete(LUNS, "gold:l1")
    assert store.find(LUNS, index="volume", value="v1") == []
    assert keys(store.find(LUNS, index="array", value="gold"), LUNS) == ["gold:l2"]


def test_volumes_by_name_and_source(store: StateStore) -> None:
    store.create(VOLUMES, volume("v1", name="pvc-a"))
    store.create(VOLUMES, volume("v2", name="pvc-b"))
    store.create(VOLUMES, volume("s2", name="snap-x", kind=VolumeKind.SNAPSHOT, source="v1"))
    store.create(VOLUMES, volume("s1", name="pvc-a", kind=VolumeKind.SNAPSHOT, source="v1"))
    assert keys(store.find(VOLUMES, index="name", value="volume/pvc-a"), VOLUMES) == ["v1"]
    assert keys(store.find(VOLUMES, index="name", value="snapshot/pvc-a"), VOLUMES) == ["s1"]
    assert store.find(VOLUMES, index="name", value="volume/snap-x") == []
    assert keys(store.find(VOLUMES, index="source", value="v1"), VOLUMES) == ["s1", "s2"]
    assert keys(store.find(VOLUMES, index="source", value=""), VOLUMES) == ["v1", "v2"]
    rev = store.get(VOLUMES, "v2").revision  # type: ignore[union-attr]
    store.update(VOLUMES, volume("v2", name="pvc-c"), revision=rev)
    assert store.find(VOLUMES, index="name", value="volume/pvc-b") == []
    assert keys(store.find(VOLUMES, index="name", value="volume/pvc-c"), VOLUMES) == ["v2"]


def test_pairs_by_source(store: StateStore) -> None:
    store.create(PAIRS, pair("p2", source="v1"))
    store.create(PAIRS, pair("p1", source="v1"))
    store.create(PAIRS, pair("p3", source="v2"))
    got = store.find(PAIRS, index="source", value="v1")
    assert [v.value for v in got] == [pair("p1", source="v1"), pair("p2", source="v1")]
    assert keys(store.find(PAIRS, index="source", value="v2"), PAIRS) == ["p3"]


def test_unknown_index_is_invalid(store: StateStore) -> None:
    store.create(PAIRS, pair("p1", source="v1"))
    with pytest.raises(errors.InvalidRequest):
        store.find(PAIRS, index="target", value="v1")


# -- pagination ---------------------------------------------------------------

PAGE_KEYS = ["arr-10", "arr-2", "arr-B", "arr-a", "arr-a-1", "arr-b", "z", "Z", "0", "arr-ä"]


def make_arrays(store: StateStore) -> list[str]:
    for k in PAGE_KEYS:
        store.create(ARRAYS, array(k))
    return sorted(PAGE_KEYS)


def test_list_is_ordered_by_key(store: StateStore) -> None:
    want = make_arrays(store)
    assert keys(store.list(ARRAYS), ARRAYS) == want
    assert keys(store.list(ARRAYS, limit=0), ARRAYS) == want


@pytest.mark.parametrize("limit", [1, 3, 4, 10, 11])
def test_pages_cover_everything_once(store: StateStore, limit: int) -> None:
    want = make_arrays(store)
    seen: list[str] = []
    after = ""
    while True:
        page = store.list(ARRAYS, after=after, limit=limit)
        assert len(page) <= limit
        seen += keys(page, ARRAYS)
        if len(page) < limit:
            break
        after = ARRAYS.key(page[-1].value)
    assert seen == want


def test_after_a_key_that_never_existed(store: StateStore) -> None:
    want = make_arrays(store)
    assert keys(store.list(ARRAYS, after="arr-2x"), ARRAYS) == [k for k in want if k > "arr-2x"]
    assert store.list(ARRAYS, after="\U0010ffff") == []


def test_pages_stable_when_records_deleted_between(store: StateStore) -> None:
    want = make_arrays(store)
    page1 = store.list(ARRAYS, limit=3)
    assert keys(page1, ARRAYS) == want[:3]
    token = ARRAYS.key(page1[-1].value)
    # Delete the token's own record, one already returned and one not yet returned.
    for gone in (token, want[0], want[5]):
        store.delete(ARRAYS, gone)
    store.create(ARRAYS, array("0000"))  # sorts before the token: not shown again
    rest: list[str] = []
    after = token
    while page := store.list(ARRAYS, after=after, limit=3):
        rest += keys(page, ARRAYS)
        after = ARRAYS.key(page[-1].value)
    assert rest == [k for k in want[3:] if k != want[5]]


# -- watch ----------------------------------------------------------------------

def collect(it: Iterator[Change[Any]], n: int) -> list[Change[Any]]:
    out: list[Change[Any]] = []
    with contextlib.closing(it):  # type: ignore[type-var]
        for change in it:
            out.append(change)
            if len(out) == n:
                break
    return out


def test_watch_sees_puts_and_deletes_in_order(store: StateStore) -> None:
    before = store.create(LUNS, lun("gold", "old"))
    store.create(VOLUMES, volume("unrelated-before"))
    it = store.watch(LUNS, timeout=WATCH_LIMIT)
    r1 = store.create(LUNS, lun("gold", "l1"))
    store.create(VOLUMES, volume("unrelated"))  # another table: not seen
    r2 = store.update(LUNS, lun("gold", "l1", volume="v1"), revision=r1)
    store.delete(LUNS, "gold:old", revision=before)
    r3 = store.create(LUNS, lun("silver", "l2"))
    store.delete(LUNS, "gold:l1")
    got = collect(it, 5)
    assert [(c.kind, c.key) for c in got] == [
        ("put", "gold:l1"), ("put", "gold:l1"), ("delete", "gold:old"),
        ("put", "silver:l2"), ("delete", "gold:l1")]
    assert [c.value for c in got] == [lun("gold", "l1"), lun("gold", "l1", volume="v1"), None,
                                      lun("silver", "l2"), None]
    assert [got[0].revision, got[1].revision, got[3].revision] == [r1, r2, r3]
    assert len({c.revision for c in got}) == 5


def test_watch_ends_at_timeout(store: StateStore) -> None:
    store.create(PAIRS, pair("p1", source="v1"))
    assert list(store.watch(PAIRS, timeout=0.2)) == []


def test_watch_from_another_thread(store: StateStore) -> None:
    it = store.watch(ARRAYS, timeout=WATCH_LIMIT)
    got: list[Change[Any]] = []
    reader = threading.Thread(target=lambda: got.extend(collect(it, 20)))
    reader.start()
    rev = store.create(ARRAYS, array("gold", capacity_free=0))
    for i in range(1, 20):
        rev = store.update(ARRAYS, array("gold", capacity_free=i), revision=rev)
    reader.join()
    assert [c.value.capacity_free if c.value else None for c in got] == list(range(20))
    assert got[-1].revision == rev


# -- concurrency ------------------------------------------------------------------

def test_racing_updates_one_winner_per_revision(store: StateStore) -> None:
    threads, rounds = 6, 5
    rev = store.create(ARRAYS, array("gold", capacity_free=0))
    for rnd in range(rounds):
        barrier = threading.Barrier(threads)
        results: list[Revision | Exception] = []
        lock = threading.Lock()

        def race(i: int, base: Revision = rev, rnd: int = rnd, barrier: threading.Barrier = barrier,
                 results: list[Revision | Exception] = results) -> None:
            barrier.wait()
            try:
                out: Revision | Exception = store.update(
                    ARRAYS, array("gold", capacity_free=rnd * 100 + i), revision=base)
            except errors.Conflict as e:
                out = e
            with lock:
                results.append(out)

        workers = [threading.Thread(target=race, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        winners = [r for r in results if not isinstance(r, Exception)]
        assert len(results) == threads
        assert len(winners) == 1, results
        got = store.get(ARRAYS, "gold")
        assert got is not None and got.revision == winners[0]
        assert got.value.capacity_free // 100 == rnd
        rev = winners[0]


def test_concurrent_read_modify_write_loses_nothing(store: StateStore) -> None:
    threads, increments = 4, 10
    store.create(ARRAYS, array("gold", capacity_free=0))
    conflicts = [0] * threads

    def bump(i: int) -> None:
        done = 0
        while done < increments:
            cur = store.get(ARRAYS, "gold")
            assert cur is not None
            try:
                store.update(ARRAYS, dataclasses.replace(cur.value, capacity_free=cur.value.capacity_free + 1),
                             revision=cur.revision)
                done += 1
            except errors.Conflict:
                conflicts[i] += 1

    workers = [threading.Thread(target=bump, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    got = store.get(ARRAYS, "gold")
    assert got is not None and got.value.capacity_free == threads * increments


def test_concurrent_creates_of_one_key(store: StateStore) -> None:
    threads = 6
    barrier = threading.Barrier(threads)
    outcomes: list[str] = []
    lock = threading.Lock()

    def create(i: int) -> None:
        barrier.wait()
        try:
            store.create(LUNS, lun("gold", "same", size=i + 1))
            out = "won"
        except errors.Conflict:
            out = "lost"
        with lock:
            outcomes.append(out)

    workers = [threading.Thread(target=create, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(outcomes) == ["lost"] * (threads - 1) + ["won"]
    assert len(store.list(LUNS)) == 1


# -- several writes in one call ------------------------------------------------------

def test_apply_writes_in_order_and_returns_each_revision(store: StateStore) -> None:
    from csi_virtvol.store.base import Put, Remove

    vrev = store.create(VOLUMES, volume("v1", state=VolumeState.CREATING))
    store.create(LUNS, lun("gold", "old", volume="v1"))
    revs = store.apply([
        Put(table=LUNS, record=lun("gold", "l1", volume="v1")),
        Put(table=LUNS, record=lun("gold", "l7", volume="v1")),
        Remove(table=LUNS, key="gold:old"),
        Remove(table=LUNS, key="gold:never-was"),
        Put(table=VOLUMES, record=volume("v1"), revision=vrev),
    ])
    assert len(revs) == 5 and revs[2] is None and revs[3] is None
    for key, rev in (("gold:l1", revs[0]), ("gold:l7", revs[1])):
        got = store.get(LUNS, key)
        assert got is not None and got.revision == rev and got.value.volume == "v1"
    assert store.get(LUNS, "gold:old") is None
    v = store.get(VOLUMES, "v1")
    assert v is not None and v.revision == revs[4] and v.value.state is VolumeState.AVAILABLE
    assert len({r for r in revs if r is not None}) == 3
    assert store.apply([]) == []


def test_apply_stops_at_the_first_failing_write(store: StateStore) -> None:
    from csi_virtvol.store.base import Put

    store.create(LUNS, lun("gold", "taken"))
    with pytest.raises(errors.Conflict):
        store.apply([Put(table=LUNS, record=lun("gold", "before")),
                     Put(table=LUNS, record=lun("gold", "taken", volume="v9")),
                     Put(table=LUNS, record=lun("gold", "after"))])
    assert store.get(LUNS, "gold:after") is None  # nothing after the failure is written
    got = store.get(LUNS, "gold:taken")
    assert got is not None and got.value.volume == ""
    with pytest.raises(errors.NotFound):
        store.apply([Put(table=LUNS, record=lun("gold", "missing"), revision=got.revision)])
