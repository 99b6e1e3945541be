"""The shared ArrayDriver contract (tests/contract/test_array_contract.py), run
against the `lio` driver inside vmtest.

The contract's tests are imported here and get a `lio` factory instead of the
file-pool ones: each test's array is a fresh LIO iSCSI target (3PC on) whose
pool is a directory on the module's ext4 filesystem, removed after the test.
On the host this module skips; test_lio_vm.py runs it in the VM together with
test_lio_driver.py.
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
from csi_virtvol.backends.lio import LioDriver  # noqa: E402
from csi_virtvol.model.array import Ability  # noqa: E402
from csi_virtvol.model.ids import LunId  # noqa: E402
from liotarget import IN_VM, NOT_IN_VM, ext4_mount, iscsid, lio_spec, remove_array  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.skipif(not IN_VM, reason=NOT_IN_VM)]


@pytest.fixture(scope="module")
def lio_pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("lio-contract")
    with ext4_mount(work) as mnt, iscsid(work):
        yield mnt


def _make(request: pytest.FixtureRequest, name: str) -> ArrayDriver:
    pools: Path = request.getfixturevalue("lio_pools")
    driver = LioDriver(lio_spec(pools, name=name))
    request.addfinalizer(lambda: remove_array(driver))
    return driver


def _plant(driver: ArrayDriver, name: str, size: int) -> LunId:
    with open(Path(driver.spec.params["pool"]) / "luns" / f"{name}.img", "wb") as f:
        f.truncate(size)
    return LunId(name)


LIO_3PC = ArrayFactory(id="lio-3pc", make=_make, plant_foreign_lun=_plant,
                       expected_probed=Ability.GROW_LUN | Ability.INTERNAL_COPY)


@pytest.fixture(params=[LIO_3PC], ids=[LIO_3PC.id])
def factory(request: pytest.FixtureRequest) -> ArrayFactory:  # noqa: F811  (replaces the file-pool list)
    f: ArrayFactory = request.param
    return f
