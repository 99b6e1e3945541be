"""The qsd driver's allocation map (AllocationMapCapable), read over NBD
(base:allocation) from a real qemu-storage-daemon."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_virtvol import errors
from csi_virtvol.backends.base import AllocationMapCapable
from csi_virtvol.backends.qmp import qmp_session
from csi_virtvol.backends.qsd import QsdDriver
from csi_virtvol.model.array import ArraySpec
from csi_virtvol.model.ids import ArrayId, LunId
from blockio import write_at

KiB = 1024
MiB = 1 << 20
CLUSTER = 64 * KiB  # qcow2's default cluster: the grain of its allocation


def test_allocated_ranges_are_the_written_clusters_clipped_to_the_window(daemon: QsdDriver) -> None:
    assert isinstance(daemon, AllocationMapCapable)
    lun = daemon.create_lun(name="map", size=16 * MiB)
    assert list(daemon.allocated_ranges(lun_id=lun.id, offset=0, length=16 * MiB)) == []
    path = daemon.open_path(lun_id=lun.id)
    write_at(path, MiB + 4 * KiB, b"x" * 4 * KiB)           # inside one cluster
    write_at(path, 5 * MiB + 60 * KiB, b"y" * 8 * KiB)      # straddles two clusters
    write_at(path, 8 * MiB, os.urandom(3 * CLUSTER))        # three clusters
    assert list(daemon.allocated_ranges(lun_id=lun.id, offset=0, length=16 * MiB)) == [
        (MiB, CLUSTER), (5 * MiB, 2 * CLUSTER), (8 * MiB, 3 * CLUSTER)]
    # a window: clipped to it
    assert list(daemon.allocated_ranges(lun_id=lun.id, offset=5 * MiB + CLUSTER, length=3 * MiB - CLUSTER + KiB)) == [
        (5 * MiB + CLUSTER, CLUSTER), (8 * MiB, KiB)]
    # reading the map leaves no extra export behind
    with qmp_session(os.path.join(daemon.spec.params["pool"], "qmp.sock")) as qmp:
        assert len(qmp.execute("query-block-exports")) == 1
    with pytest.raises(errors.NotFound):
        list(daemon.allocated_ranges(lun_id=LunId("ghost"), offset=0, length=MiB))
