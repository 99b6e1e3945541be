"""The ArrayDriver contract, run against every driver in arrays.ARRAY_FACTORIES.

Nothing here may know which driver it talks to, beyond what its factory
declares (the expected probe, how to plant a foreign LUN).  Data goes through
`open_path`, as host copy and the node use it.
"""
from __future__ import annotations

import os
import uuid

import pytest

from csi_virtvol import errors
from csi_virtvol.backends.base import ArrayDriver, InternalCopyCapable
from csi_virtvol.model.array import Ability, LunOrigin, LunState
from csi_virtvol.model.ids import LunId

from arrays import ARRAY_FACTORIES, ArrayFactory
from blockio import read_at, write_at

MiB = 2**20


@pytest.fixture(params=ARRAY_FACTORIES, ids=[f.id for f in ARRAY_FACTORIES])
def factory(request: pytest.FixtureRequest) -> ArrayFactory:
    f: ArrayFactory = request.param
    return f


@pytest.fixture
def array(factory: ArrayFactory, request: pytest.FixtureRequest) -> ArrayDriver:
    return factory.make(request, f"arr-{uuid.uuid4().hex[:8]}")


def name(prefix: str = "lun") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def lun_ids(array: ArrayDriver) -> set[str]:
    return {lun.id for lun in array.list_luns()}


# ---- describe -----------------------------------------------------------------------------

def test_describe_reports_identity_probe_and_capacity(array: ArrayDriver, factory: ArrayFactory) -> None:
    info = array.describe()
    assert info.id == array.spec.id
    assert info.kind == array.spec.kind
    assert info.identity.vendor and info.identity.model and info.identity.version
    assert info.probed == factory.expected_probed
    assert info.abilities == info.probed  # the driver reports the probe; the registry applies the table
    assert info.capacity_total > 0
    assert 0 < info.capacity_free <= info.capacity_total


def test_an_ability_is_only_probed_when_the_driver_has_its_code(array: ArrayDriver) -> None:
    probed = array.describe().probed
    if Ability.INTERNAL_COPY in probed:
        assert isinstance(array, InternalCopyCapable)
    assert Ability.REMOTE_COPY not in probed or hasattr(array, "start_remote_copy")


# ---- lifecycle and idempotency ------------------------------------------------------------

def test_lun_lifecycle(array: ArrayDriver) -> None:
    n = name()
    lun = array.create_lun(name=n, size=4 * MiB)
    assert lun.array == array.spec.id
    assert lun.id == n
    assert lun.size == 4 * MiB
    assert lun.state is LunState.INTACT
    assert lun.origin is LunOrigin.PROVISIONED
    assert lun.address
    assert array.get_lun(lun_id=lun.id) == lun
    assert lun in array.list_luns()
    assert os.path.exists(array.open_path(lun_id=lun.id))

    array.delete_lun(lun_id=lun.id)
    assert array.get_lun(lun_id=lun.id) is None
    assert n not in lun_ids(array)
    array.delete_lun(lun_id=lun.id)  # a missing LUN is not an error
    with pytest.raises(errors.NotFound):
        array.open_path(lun_id=lun.id)


def test_create_is_idempotent_by_name_and_size(array: ArrayDriver) -> None:
    n = name()
    first = array.create_lun(name=n, size=2 * MiB)
    write_at(array.open_path(lun_id=first.id), 0, b"keep me")
    again = array.create_lun(name=n, size=2 * MiB)
    assert again == first
    with pytest.raises(errors.AlreadyExists):
        array.create_lun(name=n, size=3 * MiB)
    assert array.get_lun(lun_id=first.id) == first
    assert read_at(array.open_path(lun_id=first.id), 0, 7) == b"keep me"
    assert sorted(lun_ids(array)) == [n]


@pytest.mark.parametrize("bad", ["", "../escape", "a/b", ".hidden", "-opt", "x" * 300])
def test_unsafe_names_are_refused(array: ArrayDriver, bad: str) -> None:
    with pytest.raises(errors.InvalidRequest):
        array.create_lun(name=bad, size=MiB)
    assert array.list_luns() == []
    assert array.get_lun(lun_id=LunId(bad)) is None
    array.delete_lun(lun_id=LunId(bad))  # nothing to free: no-op, and nothing outside the pool touched


@pytest.mark.parametrize("size", [0, -MiB, 1000])
def test_bad_sizes_are_refused(array: ArrayDriver, size: int) -> None:
    with pytest.raises(errors.InvalidRequest):
        array.create_lun(name=name(), size=size)
    assert array.list_luns() == []


# ---- capacity -----------------------------------------------------------------------------

def test_capacity_exceeded_leaves_nothing_behind(array: ArrayDriver) -> None:
    keep = array.create_lun(name=name(), size=MiB)
    before = array.describe()
    too_big = (before.capacity_free // MiB + 64) * MiB
    with pytest.raises(errors.CapacityExceeded):
        array.create_lun(name=name("big"), size=too_big)
    assert array.list_luns() == [keep]
    after = array.describe()
    assert after.capacity_free >= before.capacity_free - MiB  # nothing was reserved by the failure


def test_creating_a_lun_takes_free_capacity(array: ArrayDriver) -> None:
    before = array.describe().capacity_free
    array.create_lun(name=name(), size=64 * MiB)
    assert array.describe().capacity_free <= before - 64 * MiB + MiB


def test_free_capacity_can_be_used_up_exactly_and_no_further(array: ArrayDriver) -> None:
    free = array.describe().capacity_free
    # fill most of the free space with one LUN, then ask for more than is left
    first = array.create_lun(name=name("fill"), size=(free // MiB - 8) * MiB)
    left = array.describe().capacity_free
    assert left < 16 * MiB
    with pytest.raises(errors.CapacityExceeded):
        array.create_lun(name=name("over"), size=(left // MiB + 2) * MiB)
    array.delete_lun(lun_id=first.id)
    assert array.describe().capacity_free >= free - MiB


# ---- resize -------------------------------------------------------------------------------

def test_resize_grows_and_keeps_data(array: ArrayDriver) -> None:
    if Ability.GROW_LUN not in array.describe().probed:
        lun = array.create_lun(name=name(), size=MiB)
        with pytest.raises(errors.UnsupportedCapability):
            array.resize_lun(lun_id=lun.id, size=2 * MiB)
        return
    lun = array.create_lun(name=name(), size=2 * MiB)
    write_at(array.open_path(lun_id=lun.id), MiB, b"\xa5" * 4096)
    grown = array.resize_lun(lun_id=lun.id, size=6 * MiB)
    assert grown.size == 6 * MiB
    assert array.get_lun(lun_id=lun.id) == grown
    path = array.open_path(lun_id=lun.id)
    assert read_at(path, MiB, 4096) == b"\xa5" * 4096
    assert read_at(path, 2 * MiB, MiB) == bytes(MiB)  # the new tail reads as zeros
    assert os.path.getsize(path) == 6 * MiB or not os.path.isfile(path)
    assert array.resize_lun(lun_id=lun.id, size=6 * MiB) == grown  # same size: no-op


def test_resize_refuses_shrink_missing_and_overflow(array: ArrayDriver) -> None:
    lun = array.create_lun(name=name(), size=4 * MiB)
    with pytest.raises(errors.InvalidRequest):
        array.resize_lun(lun_id=lun.id, size=2 * MiB)
    with pytest.raises(errors.NotFound):
        array.resize_lun(lun_id=LunId(name("ghost")), size=8 * MiB)
    if Ability.GROW_LUN in array.describe().probed:
        free = array.describe().capacity_free
        with pytest.raises(errors.CapacityExceeded):
            array.resize_lun(lun_id=lun.id, size=lun.size + (free // MiB + 64) * MiB)
    assert array.get_lun(lun_id=lun.id) == lun


# ---- wipe and data path -------------------------------------------------------------------

def test_wipe_reads_back_zeros_and_keeps_size(array: ArrayDriver) -> None:
    lun = array.create_lun(name=name(), size=8 * MiB)
    path = array.open_path(lun_id=lun.id)
    for off in (0, 3 * MiB + 512, 8 * MiB - 4096):
        write_at(path, off, os.urandom(4096))
    array.wipe_lun(lun_id=lun.id)
    assert array.get_lun(lun_id=lun.id) == lun
    assert read_at(array.open_path(lun_id=lun.id), 0, 8 * MiB) == bytes(8 * MiB)
    with pytest.raises(errors.NotFound):
        array.wipe_lun(lun_id=LunId(name("ghost")))


def test_open_path_round_trip(array: ArrayDriver) -> None:
    lun = array.create_lun(name=name(), size=16 * MiB)
    path = array.open_path(lun_id=lun.id)
    blobs = {0: os.urandom(4096), 5 * MiB: os.urandom(MiB), 16 * MiB - 512: os.urandom(512)}
    for off, data in blobs.items():
        write_at(path, off, data)
    again = array.open_path(lun_id=lun.id)
    for off, data in blobs.items():
        assert read_at(again, off, len(data)) == data
    assert read_at(again, 4096, 4096) == bytes(4096)  # never written: zeros
    assert read_at(again, 16 * MiB, 512) == b""  # nothing past the end


# ---- discovery ----------------------------------------------------------------------------

def test_list_luns_reports_discovered_luns(array: ArrayDriver, factory: ArrayFactory) -> None:
    mine = array.create_lun(name=name("mine"), size=2 * MiB)
    foreign = factory.plant_foreign_lun(array, name("found"), 3 * MiB)
    by_id = {lun.id: lun for lun in array.list_luns()}
    assert set(by_id) == {mine.id, foreign}
    assert by_id[mine.id].origin is LunOrigin.PROVISIONED
    assert by_id[foreign].origin is LunOrigin.DISCOVERED
    assert by_id[foreign].size == 3 * MiB
    assert array.get_lun(lun_id=foreign) == by_id[foreign]
    # a discovered LUN is usable like any other: wiped, written, freed
    array.wipe_lun(lun_id=foreign)
    write_at(array.open_path(lun_id=foreign), 0, b"reused")
    assert read_at(array.open_path(lun_id=foreign), 0, 6) == b"reused"
    with pytest.raises(errors.AlreadyExists):
        array.create_lun(name=foreign, size=MiB)
    array.delete_lun(lun_id=foreign)
    assert lun_ids(array) == {mine.id}


# ---- internal copy: only and exactly where probed -----------------------------------------

def test_internal_copy_is_truthful(array: ArrayDriver) -> None:
    probed = array.describe().probed
    if Ability.INTERNAL_COPY not in probed:
        if not isinstance(array, InternalCopyCapable):
            return  # no code path, no claim: nothing more to check
        src = array.create_lun(name=name("src"), size=MiB)
        with pytest.raises(errors.UnsupportedCapability):
            array.copy_lun_internal(source=src.id, name=name("copy"))
        assert lun_ids(array) == {src.id}  # the failed copy left nothing behind
        return

    assert isinstance(array, InternalCopyCapable)
    src = array.create_lun(name=name("src"), size=8 * MiB)
    spath = array.open_path(lun_id=src.id)
    write_at(spath, 0, os.urandom(2 * MiB))
    write_at(spath, 6 * MiB, os.urandom(4096))
    at_cut = read_at(spath, 0, 8 * MiB)

    copy = array.copy_lun_internal(source=src.id, name=name("copy"))
    assert copy.size == src.size
    assert copy.origin is LunOrigin.PROVISIONED
    assert array.get_lun(lun_id=copy.id) == copy
    cpath = array.open_path(lun_id=copy.id)
    assert read_at(cpath, 0, 8 * MiB) == at_cut

    # independent both ways
    write_at(spath, 0, b"\xff" * MiB)
    assert read_at(cpath, 0, 8 * MiB) == at_cut
    write_at(cpath, 6 * MiB, b"\x11" * 4096)
    assert read_at(spath, 6 * MiB, 4096) == at_cut[6 * MiB:6 * MiB + 4096]

    # idempotent by name; no source -> NotFound; name taken with another size -> AlreadyExists
    assert array.copy_lun_internal(source=src.id, name=copy.id) == array.get_lun(lun_id=copy.id)
    with pytest.raises(errors.NotFound):
        array.copy_lun_internal(source=LunId(name("ghost")), name=name("copy"))
    other = array.create_lun(name=name("other"), size=MiB)
    with pytest.raises(errors.AlreadyExists):
        array.copy_lun_internal(source=src.id, name=other.id)
    assert lun_ids(array) == {src.id, copy.id, other.id}


def test_internal_copy_cost_is_what_the_copy_then_takes(array: ArrayDriver) -> None:
    """Issue 12: the planner asks `internal_copy_cost` before it clones; the answer must be
    what the copy then does to the array's free capacity."""
    if Ability.INTERNAL_COPY not in array.describe().probed:
        return
    assert isinstance(array, InternalCopyCapable)
    src = array.create_lun(name=name("src"), size=8 * MiB)
    write_at(array.open_path(lun_id=src.id), 0, os.urandom(2 * MiB))
    cost = array.internal_copy_cost(source=src.id)
    assert cost.fits and 0 <= cost.needs <= src.size and 0 <= cost.takes
    before = array.describe().capacity_free
    array.copy_lun_internal(source=src.id, name=name("copy"))
    assert abs((before - array.describe().capacity_free) - cost.takes) <= MiB  # filesystem metadata
    with pytest.raises(errors.NotFound):
        array.internal_copy_cost(source=LunId("no-such-lun"))
