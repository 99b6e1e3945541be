"""The node reaching qsd LUNs through kernel nbd, and composing them with
device-mapper: the production data path, inside vmtest (the host has neither nbd
nor dm; there the node uses nbdfuse and the FUSE concatenation, tested elsewhere).

On the host this module skips; test_lvm_vm.py boots the VM that runs it.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_virtvol.backends.qsd import QsdDriver
from csi_virtvol.model.array import ArraySpec
from csi_virtvol.model.ids import ArrayId
from csi_virtvol.node.layout import BackingExtent
from csi_virtvol.node.stager import Stager
from csi_virtvol.transport import Attacher

from blockio import device_size
from lvmvg import IN_VM, NOT_IN_VM, MiB

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.skipif(not IN_VM, reason=NOT_IN_VM)]


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[QsdDriver]:
    """A qsd array whose pool is on ext4 (the guest's /tmp is a tmpfs without user xattrs)."""
    image, mnt = tmp_path / "pool.img", tmp_path / "pool"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(128 * MiB)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    d = QsdDriver(ArraySpec(id=ArrayId("qa"), kind="qsd", params={"pool": str(mnt), "start": "true"}))
    try:
        yield d
    finally:
        d.shutdown()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def export_bytes(uri: str) -> bytes:
    return subprocess.run(["nbdcopy", uri, "-"], capture_output=True, check=True).stdout


def test_attach_uses_kernel_nbd_and_detach_frees_it(qsd: QsdDriver, tmp_path: Path) -> None:
    lun = qsd.create_lun(name="k1", size=16 * MiB)
    att = Attacher(str(tmp_path / "attach"))
    [dev] = att.attach(user="vol-a", addresses=[lun.address])
    assert dev.startswith("/dev/nbd"), dev
    assert device_size(dev) == 16 * MiB
    payload = os.urandom(16 * MiB)
    with open(dev, "r+b") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    assert export_bytes(lun.address) == payload  # the bytes went to the array
    # idempotent, and shared: a second user of the same LUN gets the same device
    assert att.attach(user="vol-a", addresses=[lun.address]) == [dev]
    assert att.attach(user="vol-b", addresses=[lun.address]) == [dev]
    att.detach_user(user="vol-a")
    assert device_size(dev) == 16 * MiB  # vol-b still holds it
    att.detach_user(user="vol-b")
    assert not os.path.exists(f"/sys/block/{os.path.basename(dev)}/pid")
    att.detach_user(user="vol-b")  # again: nothing to do


def test_stage_two_nbd_luns_with_dm_linear(qsd: QsdDriver, tmp_path: Path) -> None:
    luns = [qsd.create_lun(name=f"s{i}", size=8 * MiB) for i in range(2)]
    att = Attacher(str(tmp_path / "attach"))
    paths = att.attach(user="vol", addresses=[x.address for x in luns])
    stager = Stager(str(tmp_path / "node"))
    staging = tmp_path / "staging"
    staging.mkdir()
    extents = [BackingExtent(path=p, offset=0, length=8 * MiB) for p in paths]
    stager.stage("vol", extents, str(staging), access="block")
    try:
        rec = stager.get("vol")
        assert rec is not None
        dev = rec.device
        assert dev.startswith("/dev/dm-") or dev.startswith("/dev/mapper/"), dev
        payload = os.urandom(16 * MiB)
        with open(dev, "r+b") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        # the first half landed on the first LUN, the second on the second
        assert export_bytes(luns[0].address) == payload[:8 * MiB]
        assert export_bytes(luns[1].address) == payload[8 * MiB:]
    finally:
        stager.unstage("vol", str(staging))
        att.detach_user(user="vol")
