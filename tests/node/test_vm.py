"""The device-mapper composition, in a throwaway VM (this host has no device-mapper).

Runs test_stage.py inside `vmtest` with VIRTVOL_TEST_COMPOSER=dm: the same stage, write,
restage, read-back, block publish, expand and unstage checks over dm-linear tables of loop
devices.  The VM's root has every capability, so ext4's online grow runs there too.
"""
from __future__ import annotations

import pytest

from vmrun import REPO, run_in_vm

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.root]


@pytest.mark.parametrize("composer", ["dm", "fuse"])
def test_node_data_path_in_a_vm(composer: str) -> None:
    out = run_in_vm([REPO / "tests" / "node" / "test_stage.py"], vm_flags=["--mem", "6G"], timeout=1500,
                    env=[f"VIRTVOL_TEST_COMPOSER={composer}"], allow_skips=True)
    if composer == "dm":
        assert "growing ext4 online" not in out  # the VM has CAP_SYS_RESOURCE: nothing skipped
