"""Run pytest on guest-side test modules inside one throwaway VM (vmtest), for what this
host's kernel cannot do (device-mapper, LVM thin, nbd, LIO, iSCSI)."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VMTEST = Path(os.environ.get("VMTEST", REPO.parent / "shared" / "vmtest" / "vmtest"))


def run_in_vm(tests: Sequence[str | Path], *, timeout: int, vm_flags: Sequence[str] = (),
              env: Sequence[str] = (), allow_skips: bool = False) -> str:
    """Boot a VM, run pytest on `tests` there, assert they passed; return the output.
    Skips (here, on the host) when not root, already in the VM, or without vmtest."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if os.environ.get("VMTEST_GUEST"):
        pytest.skip("already inside the VM")
    if not VMTEST.exists():
        pytest.skip(f"no vmtest at {VMTEST}")
    cmd = [str(VMTEST), *vm_flags, "--timeout", str(timeout), "--", *(["env", *env] if env else []),
           sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *map(str, tests)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout + 300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert " passed" in out and " failed" not in out, out[-3000:]
    if not allow_skips:
        assert " skipped" not in out, out[-3000:]  # in the VM nothing may skip
    return out
