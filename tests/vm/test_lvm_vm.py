"""Boots one throwaway VM (vmtest; this host has no device-mapper) and runs the
`lvm` driver's tests there: test_lvm_driver.py, the shared ArrayDriver contract for
`lvm` (test_lvm_contract.py), and the node over kernel nbd and dm (test_nbd_node.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from vmrun import run_in_vm

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.root]

HERE = Path(__file__).resolve().parent
GUEST_MODULES = ["test_lvm_driver.py", "test_lvm_contract.py", "test_nbd_node.py"]


@pytest.mark.timeout(1500)  # ~5 min idle, ~8 min with other VMs on the 2 cores
def test_lvm_driver_in_a_vm() -> None:
    run_in_vm([HERE / m for m in GUEST_MODULES], vm_flags=["--udev"], timeout=900)
