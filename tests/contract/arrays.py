"""Every ArrayDriver the contract suite runs against.

Each `ArrayFactory` says how to get a fresh, empty array of one driver on one
kind of backing store, what its probe must find there, and how to put a LUN on
that array *behind the driver's back* (to test discovery).  Append new
drivers here; test_array_contract.py picks them up.

`make(request, name)` returns a driver for a new empty array called `name`;
it gets any fixture it needs through `request.getfixturevalue` and registers
its own cleanup with `request.addfinalizer`.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from csi_virtvol.backends.base import ArrayDriver
from csi_virtvol.backends.filepool import FilePoolDriver
from csi_virtvol.model.array import Ability
from csi_virtvol.model.ids import LunId

from loopfs import make_pool


@dataclass(frozen=True, slots=True, kw_only=True)
class ArrayFactory:
    id: str
    make: Callable[[pytest.FixtureRequest, str], ArrayDriver]
    # what describe().probed must be on this backing store (truthfulness, both ways)
    expected_probed: Ability
    # create a LUN of `size` bytes named `name` without the driver; returns its LunId
    plant_foreign_lun: Callable[[ArrayDriver, str, int], LunId]


def _file_pool_on(fixture: str) -> Callable[[pytest.FixtureRequest, str], ArrayDriver]:
    def make(request: pytest.FixtureRequest, name: str) -> ArrayDriver:
        mount = request.getfixturevalue(fixture)
        return FilePoolDriver(make_pool(mount, name))
    return make


def _plant_file(driver: ArrayDriver, name: str, size: int) -> LunId:
    path = os.path.join(driver.spec.params["path"], "luns", f"{name}.img")
    with open(path, "wb") as f:
        f.truncate(size)
    return LunId(name)


def _qsd_on(fixture: str) -> Callable[[pytest.FixtureRequest, str], ArrayDriver]:
    """A qemu-storage-daemon the driver starts itself, pool on `fixture`'s filesystem."""
    def make(request: pytest.FixtureRequest, name: str) -> ArrayDriver:
        from csi_virtvol.backends.qsd import QsdDriver
        from csi_virtvol.model.array import ArraySpec
        from csi_virtvol.model.ids import ArrayId
        pool = make_pool(request.getfixturevalue(fixture), name).params["path"]
        driver = QsdDriver(ArraySpec(id=ArrayId(name), kind="qsd", params={"pool": pool, "start": "true"}))
        request.addfinalizer(driver.shutdown)
        return driver
    return make


def _plant_qcow2(driver: ArrayDriver, name: str, size: int) -> LunId:
    path = os.path.join(driver.spec.params["pool"], "luns", f"{name}.img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
    return LunId(name)


ARRAY_FACTORIES: list[ArrayFactory] = [
    ArrayFactory(id="file-xfs", make=_file_pool_on("xfs_mount"),
                 expected_probed=Ability.GROW_LUN | Ability.INTERNAL_COPY, plant_foreign_lun=_plant_file),
    ArrayFactory(id="file-ext4", make=_file_pool_on("ext4_mount"),
                 expected_probed=Ability.GROW_LUN, plant_foreign_lun=_plant_file),
    ArrayFactory(id="file-btrfs", make=_file_pool_on("btrfs_mount"),
                 expected_probed=Ability.GROW_LUN | Ability.INTERNAL_COPY, plant_foreign_lun=_plant_file),
    ArrayFactory(id="qsd-xfs", make=_qsd_on("xfs_mount"),
                 expected_probed=Ability.GROW_LUN | Ability.INTERNAL_COPY | Ability.REMOTE_COPY
                 | Ability.DIRTY_TRACKING, plant_foreign_lun=_plant_qcow2),
]
