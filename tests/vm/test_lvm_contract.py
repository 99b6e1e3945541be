"""The shared ArrayDriver contract (tests/contract/test_array_contract.py), run
against the `lvm` driver inside vmtest.

The contract's tests are imported here and get an `lvm` factory instead of the
file-pool ones: each test's array is the module's thin pool, emptied after the
test (making a pool costs ~7 s under TCG).  On the host this module skips;
test_lvm_vm.py runs it in the VM together with test_lvm_driver.py.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contract"))

from test_array_contract import *  # noqa: E402,F401,F403  (the contract's tests, collected here)

from arrays import ArrayFactory  # noqa: E402
from csi_virtvol.backends.base import ArrayDriver  # noqa: E402
from csi_virtvol.backends.lvm import LvmThinDriver  # noqa: E402
from csi_virtvol.model.array import Ability, ArraySpec  # noqa: E402
from csi_virtvol.model.ids import ArrayId, LunId  # noqa: E402
from lvmvg import IN_VM, NOT_IN_VM, MiB, empty_pool, sh, thin_pool, volume_group  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.skipif(not IN_VM, reason=NOT_IN_VM)]


@pytest.fixture(scope="module")
def lvm_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with volume_group(tmp_path_factory.mktemp("lvm-contract")) as vg, \
            thin_pool(vg, size=160 * MiB) as pool:
        yield vg, pool


def _make(request: pytest.FixtureRequest, name: str) -> ArrayDriver:
    vg, pool = request.getfixturevalue("lvm_pool")
    request.addfinalizer(lambda: empty_pool(vg, pool))
    return LvmThinDriver(ArraySpec(id=ArrayId(name), kind="lvm", params={"vg": vg, "pool": pool}))


def _plant(driver: ArrayDriver, name: str, size: int) -> LunId:
    vg, pool = driver.spec.params["vg"], driver.spec.params["pool"]
    sh("lvcreate", "-q", "-V", f"{size}b", "-T", f"{vg}/{pool}", "-n", name)
    return LunId(name)


LVM_THIN = ArrayFactory(id="lvm-thin", make=_make, plant_foreign_lun=_plant,
                        expected_probed=Ability.GROW_LUN | Ability.INTERNAL_COPY)


@pytest.fixture(params=[LVM_THIN], ids=[LVM_THIN.id])
def factory(request: pytest.FixtureRequest) -> ArrayFactory:  # noqa: F811  (replaces the file-pool list)
    f: ArrayFactory = request.param
    return f
