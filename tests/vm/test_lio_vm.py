"""Boots one throwaway VM (vmtest; this host has no LIO nor iSCSI) and runs the
`lio` driver's tests there: test_lio_driver.py, and the shared ArrayDriver
contract for `lio` (test_lio_contract.py) when it is present."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VMTEST = Path(os.environ.get("VMTEST", REPO.parent / "shared" / "vmtest" / "vmtest"))
GUEST_MODULES = ["test_lio_driver.py", "test_lio_contract.py", "test_san_volume.py"]


@pytest.mark.timeout(1500)  # ~4 min idle, ~7 min with other VMs on the 2 cores
def test_lio_driver_in_a_vm() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if os.environ.get("VMTEST_GUEST"):
        pytest.skip("already inside the VM")
    if not VMTEST.exists():
        pytest.skip(f"no vmtest at {VMTEST}")
    modules = [str(HERE / m) for m in GUEST_MODULES if (HERE / m).exists()]
    cmd = [str(VMTEST), "--udev", "--timeout", "900", "--",
           sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *modules]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert " passed" in out and " failed" not in out, out[-3000:]
    assert " skipped" not in out, out[-3000:]  # in the VM nothing may skip
