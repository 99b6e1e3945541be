"""Boots one throwaway VM (vmtest; this host has no device-mapper) and runs the dm live
cut's guest tests there: test_dmcut_node.py (the node layer: a plugin killed at each step
of a cut, holds, growth, unstaging) and test_dmcut_live.py (issue 9's live-cut test through
the real plugin on dm-linear with dm-snapshot and dm-era; a store that fills up; a resync
from dm-era's tracking).  Prints what the guest measured (writer stalls, holds)."""
from __future__ import annotations

from pathlib import Path

import pytest

from vmrun import run_in_vm

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.root]

HERE = Path(__file__).resolve().parent
GUEST_MODULES = ["test_dmcut_node.py", "test_dmcut_live.py"]


@pytest.mark.timeout(2700)  # ~8 min idle, longer with other VMs on the 2 cores
def test_dm_live_cuts_in_a_vm(tmp_path: Path) -> None:
    share = tmp_path / "out"
    share.mkdir()
    report = share / "report.txt"
    # --udev: /dev/mapper links, as on a node; 6G: the 1 GiB volumes, their copies and pools live in RAM
    run_in_vm([HERE / m for m in GUEST_MODULES], vm_flags=["--udev", "--mem", "6G", "--share", str(share)],
              timeout=1800, env=[f"VIRTVOL_VM_REPORT={report}"])
    measured = report.read_text()
    print(measured)
    assert "dm mounted ext4" in measured and "dm raw block" in measured and "dm resync" in measured, measured
