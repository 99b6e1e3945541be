"""The `lvm` driver on a real thin pool, inside vmtest (the host has no device-mapper).

On the host this module skips; test_lvm_vm.py boots one VM that runs it (and
the ArrayDriver contract suite for `lvm`, test_lvm_contract.py) there.
"""
from __future__ import annotations

import json
import os
import re
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_virtvol import errors
from csi_virtvol.backends import registry
from csi_virtvol.backends.base import InternalCopyCapable
from csi_virtvol.backends.lvm import TAG_PROVISIONED, LvmThinDriver
from csi_virtvol.model.array import Ability, ArraySpec, LunOrigin, LunState
from csi_virtvol.model.ids import ArrayId, LunId

from lvmvg import (IN_VM, NOT_IN_VM, MiB, device_size, empty_pool, read_at, sh, thin_pool, volume_group,
                   write_at)

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.skipif(not IN_VM, reason=NOT_IN_VM)]

POOL_SIZE = 128 * MiB


@pytest.fixture(scope="module")
def vg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with volume_group(tmp_path_factory.mktemp("lvm")) as name:
        yield name


@pytest.fixture(scope="module")
def module_pool(vg: str) -> Iterator[str]:
    with thin_pool(vg, size=POOL_SIZE) as name:  # ~7 s under TCG: one for the module
        yield name


@pytest.fixture
def pool(vg: str, module_pool: str) -> Iterator[str]:
    """The module's thin pool, emptied after every test."""
    yield module_pool
    empty_pool(vg, module_pool)


def spec(vg: str, pool: str, **params: str) -> ArraySpec:
    return ArraySpec(id=ArrayId(f"lvm-{pool}"), kind="lvm", params={"vg": vg, "pool": pool, **params},
                     topology={"topology.kubernetes.io/hostname": "node-a"})


@pytest.fixture
def array(vg: str, pool: str) -> LvmThinDriver:
    return LvmThinDriver(spec(vg, pool))


def name(prefix: str = "lun") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def lvs(vg: str, fields: str) -> list[dict[str, str]]:
    doc = json.loads(sh("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, vg))
    rows: list[dict[str, str]] = doc["report"][0]["lv"]
    return rows


def pool_data_percent(vg: str, pool: str) -> float:
    (row,) = [r for r in lvs(vg, "lv_name,data_percent") if r["lv_name"] == pool]
    return float(row["data_percent"])


# ---- describe and opening -----------------------------------------------------------------

def test_describe_reports_identity_probe_capacity_and_topology(array: LvmThinDriver) -> None:
    info = array.describe()
    assert info.kind == "lvm"
    assert (info.identity.vendor, info.identity.model) == ("Linux", "lvm-thin")
    assert re.fullmatch(r"2\.\d+\.\d+", info.identity.version), info.identity.version
    assert info.identity.version in sh("lvm", "version")
    assert info.probed == Ability.GROW_LUN | Ability.INTERNAL_COPY
    assert info.abilities == info.probed
    assert info.capacity_total == POOL_SIZE
    assert info.capacity_free == POOL_SIZE
    assert info.topology == {"topology.kubernetes.io/hostname": "node-a"}


def test_registry_opens_the_lvm_kind(vg: str, pool: str) -> None:
    driver, info = registry.open_array(spec(vg, pool))
    assert isinstance(driver, LvmThinDriver)
    assert isinstance(driver, InternalCopyCapable)
    assert Ability.INTERNAL_COPY in info.abilities and Ability.GROW_LUN in info.abilities


def test_overcommit_scales_total_capacity(vg: str, pool: str) -> None:
    info = LvmThinDriver(spec(vg, pool, overcommit="2.5")).describe()
    assert info.capacity_total == POOL_SIZE * 5 // 2


def test_a_bad_or_missing_pool_is_refused(vg: str, pool: str) -> None:
    for params, error in [({"pool": "nopool"}, errors.BackendUnavailable),
                          ({"vg": "novg"}, errors.BackendUnavailable),
                          ({"overcommit": "0"}, errors.InvalidRequest),
                          ({"overcommit": "lots"}, errors.InvalidRequest),
                          ({"vg": ""}, errors.InvalidRequest)]:
        merged = {"vg": vg, "pool": pool, **params}
        with pytest.raises(error):
            LvmThinDriver(ArraySpec(id=ArrayId("x"), kind="lvm", params=merged))


def test_a_linear_lv_is_not_a_thin_pool(vg: str) -> None:
    lv = name("linear")
    sh("lvcreate", "-q", "-L", "4m", "-n", lv, vg)
    try:
        with pytest.raises(errors.BackendUnavailable):
            LvmThinDriver(spec(vg, lv))
    finally:
        sh("lvremove", "-q", "-y", f"{vg}/{lv}")


# ---- lifecycle ----------------------------------------------------------------------------

def test_lun_lifecycle(array: LvmThinDriver, vg: str, pool: str) -> None:
    n = name()
    lun = array.create_lun(name=n, size=8 * MiB)
    assert (lun.id, lun.size, lun.array) == (n, 8 * MiB, array.spec.id)
    assert lun.state is LunState.INTACT and lun.origin is LunOrigin.PROVISIONED
    assert lun.address == f"/dev/{vg}/{n}"
    (row,) = [r for r in lvs(vg, "lv_name,pool_lv,lv_size,lv_tags,lv_attr") if r["lv_name"] == n]
    assert row["pool_lv"] == pool and int(row["lv_size"]) == 8 * MiB
    assert row["lv_attr"].startswith("V") and TAG_PROVISIONED in row["lv_tags"]
    assert array.get_lun(lun_id=lun.id) == lun
    assert array.list_luns() == [lun]

    path = array.open_path(lun_id=lun.id)
    assert stat.S_ISBLK(os.stat(path).st_mode)
    assert device_size(path) == 8 * MiB
    assert read_at(path, 0, MiB) == bytes(MiB)  # a new thin volume reads as zeros
    write_at(path, 3 * MiB, b"hello lvm")
    assert read_at(array.open_path(lun_id=lun.id), 3 * MiB, 9) == b"hello lvm"

    array.delete_lun(lun_id=lun.id)
    assert array.get_lun(lun_id=lun.id) is None
    assert n not in {r["lv_name"] for r in lvs(vg, "lv_name")}
    array.delete_lun(lun_id=lun.id)  # missing: no-op
    with pytest.raises(errors.NotFound):
        array.open_path(lun_id=lun.id)
    assert array.describe().capacity_free == POOL_SIZE


def test_create_is_idempotent_by_name_and_size(array: LvmThinDriver) -> None:
    n = name()
    first = array.create_lun(name=n, size=4 * MiB)
    write_at(array.open_path(lun_id=first.id), 0, b"keep me")
    assert array.create_lun(name=n, size=4 * MiB) == first
    with pytest.raises(errors.AlreadyExists):
        array.create_lun(name=n, size=5 * MiB)
    assert read_at(array.open_path(lun_id=first.id), 0, 7) == b"keep me"
    assert [lun.id for lun in array.list_luns()] == [n]


def test_unsafe_names_are_refused(array: LvmThinDriver) -> None:
    for bad in ["", "../x", "a/b", "-opt", ".", "x" * 200, "snapshot1", "a_tmeta", "sp ace"]:
        with pytest.raises(errors.InvalidRequest):
            array.create_lun(name=bad, size=MiB)
        with pytest.raises(errors.InvalidRequest):
            array.copy_lun_internal(source=LunId("whatever"), name=bad)
        assert array.get_lun(lun_id=LunId(bad)) is None
        array.delete_lun(lun_id=LunId(bad))
    assert array.list_luns() == []


def test_sizes_off_the_extent_grid_are_refused(array: LvmThinDriver) -> None:
    for size in [0, -MiB, 1000, MiB // 2, MiB + 4096]:
        with pytest.raises(errors.OutOfRange):
            array.create_lun(name=name(), size=size)
    assert array.list_luns() == []


def test_the_pool_and_volumes_outside_it_are_not_luns(array: LvmThinDriver, vg: str, pool: str) -> None:
    other = name("linear")
    sh("lvcreate", "-q", "-L", "4m", "-n", other, vg)
    try:
        assert array.list_luns() == []
        for lv in (pool, other):
            assert array.get_lun(lun_id=LunId(lv)) is None
            array.delete_lun(lun_id=LunId(lv))  # not this array's: untouched
            with pytest.raises(errors.AlreadyExists):
                array.create_lun(name=lv, size=4 * MiB)
        names = {r["lv_name"] for r in lvs(vg, "lv_name")}
        assert {pool, other} <= names
    finally:
        sh("lvremove", "-q", "-y", f"{vg}/{other}")


# ---- capacity -----------------------------------------------------------------------------

def test_capacity_is_thick_accounting_over_the_pool(array: LvmThinDriver) -> None:
    a = array.create_lun(name=name(), size=40 * MiB)
    assert array.describe().capacity_free == POOL_SIZE - 40 * MiB
    with pytest.raises(errors.CapacityExceeded):
        array.create_lun(name=name("big"), size=POOL_SIZE - 40 * MiB + MiB)
    assert array.list_luns() == [a]
    b = array.create_lun(name=name(), size=POOL_SIZE - 40 * MiB)  # exactly what is left
    assert array.describe().capacity_free == 0
    with pytest.raises(errors.CapacityExceeded):
        array.create_lun(name=name("one-more"), size=MiB)
    array.delete_lun(lun_id=b.id)
    assert array.describe().capacity_free == POOL_SIZE - 40 * MiB


def test_overcommit_lets_more_virtual_size_out(vg: str, pool: str) -> None:
    array = LvmThinDriver(spec(vg, pool, overcommit="2"))
    luns = [array.create_lun(name=name(), size=POOL_SIZE) for _ in range(2)]
    assert array.describe().capacity_free == 0
    with pytest.raises(errors.CapacityExceeded):
        array.create_lun(name=name(), size=MiB)
    assert len(array.list_luns()) == len(luns)


# ---- resize -------------------------------------------------------------------------------

def test_resize_grows_in_place_and_keeps_data(array: LvmThinDriver) -> None:
    lun = array.create_lun(name=name(), size=4 * MiB)
    path = array.open_path(lun_id=lun.id)
    write_at(path, 2 * MiB, b"\xa5" * 4096)
    grown = array.resize_lun(lun_id=lun.id, size=12 * MiB)
    assert grown.size == 12 * MiB and array.get_lun(lun_id=lun.id) == grown
    path = array.open_path(lun_id=lun.id)
    assert device_size(path) == 12 * MiB
    assert read_at(path, 2 * MiB, 4096) == b"\xa5" * 4096
    assert read_at(path, 4 * MiB, 8 * MiB) == bytes(8 * MiB)
    assert array.resize_lun(lun_id=lun.id, size=12 * MiB) == grown
    assert array.describe().capacity_free == POOL_SIZE - 12 * MiB


def test_resize_refuses_shrink_missing_unaligned_and_overflow(array: LvmThinDriver) -> None:
    lun = array.create_lun(name=name(), size=8 * MiB)
    with pytest.raises(errors.InvalidRequest):
        array.resize_lun(lun_id=lun.id, size=4 * MiB)
    with pytest.raises(errors.NotFound):
        array.resize_lun(lun_id=LunId(name("ghost")), size=16 * MiB)
    with pytest.raises(errors.OutOfRange):
        array.resize_lun(lun_id=lun.id, size=8 * MiB + 512)
    with pytest.raises(errors.CapacityExceeded):
        array.resize_lun(lun_id=lun.id, size=POOL_SIZE + MiB)
    assert array.get_lun(lun_id=lun.id) == lun


# ---- thin snapshots -----------------------------------------------------------------------

def test_thin_snapshot_is_an_independent_point_in_time_copy(array: LvmThinDriver, vg: str) -> None:
    src = array.create_lun(name=name("src"), size=16 * MiB)
    spath = array.open_path(lun_id=src.id)
    write_at(spath, 0, os.urandom(3 * MiB))
    write_at(spath, 15 * MiB, os.urandom(4096))
    at_cut = read_at(spath, 0, 16 * MiB)

    snap = array.copy_lun_internal(source=src.id, name=name("snap"))
    assert snap.size == src.size and snap.origin is LunOrigin.PROVISIONED
    assert array.get_lun(lun_id=snap.id) == snap
    (row,) = [r for r in lvs(vg, "lv_name,origin,lv_active") if r["lv_name"] == snap.id]
    assert row["origin"] == src.id and row["lv_active"] == "active"  # a thin snapshot, active at once
    cpath = array.open_path(lun_id=snap.id)
    assert read_at(cpath, 0, 16 * MiB) == at_cut

    write_at(spath, 0, b"\xff" * MiB)  # after the cut: the snapshot does not see it
    assert read_at(cpath, 0, 16 * MiB) == at_cut
    write_at(cpath, 15 * MiB, b"\x11" * 4096)  # nor the origin the snapshot's writes
    assert read_at(spath, 15 * MiB, 4096) == at_cut[15 * MiB:15 * MiB + 4096]
    assert read_at(spath, 0, MiB) == b"\xff" * MiB

    # the snapshot outlives its origin
    array.delete_lun(lun_id=src.id)
    assert read_at(array.open_path(lun_id=snap.id), MiB, 2 * MiB) == at_cut[MiB:3 * MiB]


def test_thin_snapshot_is_idempotent_and_checked(array: LvmThinDriver) -> None:
    src = array.create_lun(name=name("src"), size=4 * MiB)
    snap = array.copy_lun_internal(source=src.id, name=name("snap"))
    assert array.copy_lun_internal(source=src.id, name=snap.id) == snap
    with pytest.raises(errors.NotFound):
        array.copy_lun_internal(source=LunId(name("ghost")), name=name("snap"))
    with pytest.raises(errors.InvalidRequest):
        array.copy_lun_internal(source=src.id, name=src.id)
    other = array.create_lun(name=name("other"), size=MiB)
    with pytest.raises(errors.AlreadyExists):
        array.copy_lun_internal(source=src.id, name=other.id)
    with pytest.raises(errors.InvalidRequest):
        array.copy_lun_internal(source=src.id, name="bad/name")
    assert {lun.id for lun in array.list_luns()} == {src.id, snap.id, other.id}
    # a snapshot counts its virtual size once it exists
    assert array.describe().capacity_free == POOL_SIZE - 9 * MiB


def test_a_deactivated_snapshot_is_activated_by_open_path(array: LvmThinDriver, vg: str) -> None:
    src = array.create_lun(name=name("src"), size=4 * MiB)
    write_at(array.open_path(lun_id=src.id), 0, b"cut")
    snap_name = name("k")
    sh("lvcreate", "-q", "-s", f"{vg}/{src.id}", "-n", snap_name)  # LVM default: activation skipped
    (row,) = [r for r in lvs(vg, "lv_name,lv_active") if r["lv_name"] == snap_name]
    assert row["lv_active"] != "active"
    assert read_at(array.open_path(lun_id=LunId(snap_name)), 0, 3) == b"cut"


# ---- wipe and discovery -------------------------------------------------------------------

def test_wipe_reads_back_zeros_and_frees_pool_space(array: LvmThinDriver, vg: str, pool: str) -> None:
    lun = array.create_lun(name=name(), size=16 * MiB)
    path = array.open_path(lun_id=lun.id)
    write_at(path, 0, os.urandom(8 * MiB))
    write_at(path, 16 * MiB - 4096, os.urandom(4096))
    used = pool_data_percent(vg, pool)
    assert used > 0
    array.wipe_lun(lun_id=lun.id)
    assert array.get_lun(lun_id=lun.id) == lun
    assert read_at(array.open_path(lun_id=lun.id), 0, 16 * MiB) == bytes(16 * MiB)
    assert pool_data_percent(vg, pool) < used
    with pytest.raises(errors.NotFound):
        array.wipe_lun(lun_id=LunId(name("ghost")))


def test_list_reports_discovered_thin_volumes(array: LvmThinDriver, vg: str, pool: str) -> None:
    mine = array.create_lun(name=name("mine"), size=2 * MiB)
    found = name("found")
    sh("lvcreate", "-q", "-V", "3m", "-T", f"{vg}/{pool}", "-n", found)
    write_at(f"/dev/{vg}/{found}", 0, b"old data")
    by_id = {lun.id: lun for lun in array.list_luns()}
    assert set(by_id) == {mine.id, found}
    assert by_id[mine.id].origin is LunOrigin.PROVISIONED
    assert by_id[LunId(found)].origin is LunOrigin.DISCOVERED
    assert by_id[LunId(found)].size == 3 * MiB
    array.wipe_lun(lun_id=LunId(found))
    assert read_at(array.open_path(lun_id=LunId(found)), 0, 8) == bytes(8)
    with pytest.raises(errors.AlreadyExists):
        array.create_lun(name=found, size=MiB)
    # a second driver on the same pool (another process, after a restart) sees the same
    again = LvmThinDriver(array.spec)
    assert again.list_luns() == array.list_luns()
    array.delete_lun(lun_id=LunId(found))
    assert {lun.id for lun in array.list_luns()} == {mine.id}


def test_two_pools_in_one_vg_are_two_arrays(array: LvmThinDriver, vg: str) -> None:
    with thin_pool(vg, size=32 * MiB) as other_pool:
        other = LvmThinDriver(spec(vg, other_pool))
        a = array.create_lun(name=name("a"), size=MiB)
        b = other.create_lun(name=name("b"), size=MiB)
        assert array.list_luns() == [a]
        assert other.list_luns() == [b]
        assert array.get_lun(lun_id=b.id) is None
        with pytest.raises(errors.NotFound):
            array.copy_lun_internal(source=b.id, name=name("x"))
        assert other.describe().capacity_total == 32 * MiB
