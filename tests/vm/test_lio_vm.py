"""Boots one throwaway VM (vmtest; this host has no LIO nor iSCSI) and runs the
`lio` driver's tests there: test_lio_driver.py, the shared ArrayDriver contract for
`lio` (test_lio_contract.py), and one volume over LIO and LVM arrays through the
plugin (test_san_volume.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from vmrun import run_in_vm

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.root]

HERE = Path(__file__).resolve().parent
GUEST_MODULES = ["test_lio_driver.py", "test_lio_contract.py", "test_san_volume.py"]


@pytest.mark.timeout(1500)  # ~6 min idle, longer with other VMs on the 2 cores
def test_lio_driver_in_a_vm() -> None:
    run_in_vm([HERE / m for m in GUEST_MODULES], vm_flags=["--udev"], timeout=1100)
