"""`InternalCopyCapable.internal_copy_cost`: every array says what an internal copy would
take before it is made, and its answer agrees with what `copy_lun_internal` then does.

The file pool runs on real loop-mounted XFS (reflink); the LVM and LIO drivers only run
inside the VM, so their cost arithmetic is checked here without their daemons."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi_virtvol import errors
from csi_virtvol.backends import lio, lvm
from csi_virtvol.backends.base import InternalCopyCapable
from csi_virtvol.backends.filepool import FilePoolDriver
from csi_virtvol.model.array import ArraySpec, CopyCost, Lun
from csi_virtvol.model.ids import ArrayId, LunId

from loopfs import loop_filesystem, make_pool

MiB = 2**20


def write(driver: FilePoolDriver, lun: Lun, nbytes: int) -> None:
    with open(driver.open_path(lun_id=lun.id), "r+b") as f:
        f.write(os.urandom(nbytes))
        f.flush()
        os.fsync(f.fileno())


def test_every_driver_with_internal_copy_answers_its_cost() -> None:
    for cls in (FilePoolDriver, lvm.LvmThinDriver, lio.LioDriver):
        assert callable(getattr(cls, "internal_copy_cost", None)), cls
    from csi_virtvol.backends.qsd import QsdDriver
    assert callable(getattr(QsdDriver, "internal_copy_cost", None))


def test_reflink_clone_costs_the_unwritten_part_and_is_refused_exactly_when_it_does_not_fit(
        tmp_path: Path) -> None:
    """Issue 12: a half-full XFS pool refuses a clone although it holds little data,
    because the clone's holes must be promised.  The cost says so before anything is made."""
    with loop_filesystem("xfs", tmp_path, size=512 * MiB) as mnt:
        driver = FilePoolDriver(make_pool(mnt, "xfs-pool"))
        assert isinstance(driver, InternalCopyCapable)
        big = driver.create_lun(name="big", size=320 * MiB)
        write(driver, big, 8 * MiB)
        cost = driver.internal_copy_cost(source=big.id)
        allocated = os.stat(big.address).st_blocks * 512
        assert cost.needs == 320 * MiB - allocated
        assert 0 < cost.room < cost.needs and not cost.fits
        with pytest.raises(errors.CapacityExceeded):
            driver.copy_lun_internal(source=big.id, name="big-clone")
        assert driver.get_lun(lun_id=LunId("big-clone")) is None

        small = driver.create_lun(name="small", size=32 * MiB)
        write(driver, small, 16 * MiB)
        cost = driver.internal_copy_cost(source=small.id)
        assert cost.fits and cost.needs == 32 * MiB - os.stat(small.address).st_blocks * 512
        before = driver.describe().capacity_free
        driver.copy_lun_internal(source=small.id, name="small-clone")
        after = driver.describe().capacity_free
        assert abs((before - after) - cost.takes) <= MiB  # a little XFS metadata either way
        with pytest.raises(errors.NotFound):
            driver.internal_copy_cost(source=LunId("missing"))


def test_with_a_capacity_cap_a_clone_still_fits_but_takes_the_cap(xfs_mount: Path) -> None:
    """The cap is thick: a clone is not refused by it, but it counts once it exists."""
    driver = FilePoolDriver(make_pool(xfs_mount, "capped", capacity=64 * MiB))
    src = driver.create_lun(name="src", size=32 * MiB)
    cost = driver.internal_copy_cost(source=src.id)
    assert cost.fits and cost.takes == 32 * MiB == driver.describe().capacity_free
    driver.copy_lun_internal(source=src.id, name="clone")
    assert driver.describe().capacity_free == 0


def test_thin_snapshot_needs_nothing_and_takes_its_virtual_size() -> None:
    assert lvm.thin_snapshot_cost(source_size=10 * MiB, free=0) == CopyCost(needs=0, room=0, takes=0)
    assert lvm.thin_snapshot_cost(source_size=10 * MiB, free=100 * MiB).takes == 10 * MiB
    assert lvm.thin_snapshot_cost(source_size=10 * MiB, free=4 * MiB).takes == 4 * MiB
    assert lvm.thin_snapshot_cost(source_size=10 * MiB, free=0).fits


def test_lvm_cost_reads_the_pool_scan() -> None:
    """The method over one `lvs` scan (as LvmThinDriver._scan returns it), without LVM."""
    drv = object.__new__(lvm.LvmThinDriver)
    drv._spec = ArraySpec(id=ArrayId("thin"), kind="lvm")
    drv._overcommit = 1.0
    pool = lvm._Pool(size=100 * MiB, extent=MiB, chunk=64 * 1024, discards="passdown")

    def lv(name: str, size: int) -> lvm._Lv:
        return lvm._Lv(name=name, size=size, attr="Vwi-a-tz--", pool="pool", origin="", tags=(),
                       path="", dm_path="", active=True)
    scan = lvm._Scan(pool=pool, thin={"a": lv("a", 60 * MiB)}, names=frozenset({"pool", "a"}))
    drv._scan = lambda: scan  # type: ignore[method-assign]
    assert drv.internal_copy_cost(source=LunId("a")) == CopyCost(needs=0, room=40 * MiB, takes=40 * MiB)
    with pytest.raises(errors.NotFound):
        drv.internal_copy_cost(source=LunId("b"))


class _LioPool(lio.LioDriver):
    """The LIO driver's pool of image files, without the kernel target (VM only)."""

    def __init__(self, spec: ArraySpec) -> None:  # skip configfs
        lio.PoolDriver.__init__(self, spec, kind="lio", path_param="pool")

    def _lun(self, lun_id: str, *, path: str, st: os.stat_result) -> Lun:
        return Lun(array=self._spec.id, id=LunId(lun_id), size=st.st_size, address=path)


def test_lio_extended_copy_costs_a_whole_new_lun(xfs_mount: Path) -> None:
    spec = make_pool(xfs_mount, "lio-pool", capacity=100 * MiB)
    drv = _LioPool(ArraySpec(id=spec.id, kind="lio", params={"pool": spec.params["path"],
                                                             "capacity": spec.params["capacity"]}))
    Path(spec.params["path"], "luns", "src.img").write_bytes(b"")
    os.truncate(Path(spec.params["path"], "luns", "src.img"), 60 * MiB)
    cost = drv.internal_copy_cost(source=LunId("src"))
    assert cost == CopyCost(needs=60 * MiB, room=40 * MiB, takes=40 * MiB) and not cost.fits
    with pytest.raises(errors.CapacityExceeded):  # what the copy's own room check says
        drv._check_room(apparent=60 * MiB, reserve=60 * MiB)
