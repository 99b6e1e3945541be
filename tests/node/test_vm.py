"""The device-mapper composition, in a throwaway VM (this host has no device-mapper).

Runs test_stage.py inside `vmtest` with VIRTVOL_TEST_COMPOSER=dm: the same stage, write,
restage, read-back, block publish, expand and unstage checks over dm-linear tables of loop
devices.  The VM's root has every capability, so ext4's online grow runs there too.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
VMTEST = Path(os.environ.get("VMTEST", REPO.parent / "shared" / "vmtest" / "vmtest"))


@pytest.mark.parametrize("composer", ["dm", "fuse"])
def test_node_data_path_in_a_vm(composer: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if os.environ.get("VMTEST_GUEST"):
        pytest.skip("already inside the VM")
    if not VMTEST.exists():
        pytest.skip(f"no vmtest at {VMTEST}")
    cmd = [
        str(VMTEST), "--mem", "6G", "--timeout", "1500", "--",
        "env", f"VIRTVOL_TEST_COMPOSER={composer}",
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
        str(REPO / "tests" / "node" / "test_stage.py"),
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert " passed" in out and " failed" not in out, out[-3000:]
    if composer == "dm":
        assert "growing ext4 online" not in out  # the VM has CAP_SYS_RESOURCE: nothing skipped
