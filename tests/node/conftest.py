"""Fixtures for the node data path: real LUN files, real loop devices, real mounts."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_helpers import MiB, cleanup_under, make_lun

from csi_virtvol.node.layout import BackingExtent
from csi_virtvol.node.stager import Stager


@pytest.fixture
def node_root(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mount)")
    yield tmp_path
    cleanup_under(tmp_path)
    for lun in tmp_path.glob("lun-*"):  # hundreds of MiB each; the VM keeps /tmp in RAM
        lun.unlink()


COMPOSER = os.environ.get("VIRTVOL_TEST_COMPOSER", "fuse")  # test_vm.py sets "dm"


@pytest.fixture
def stager(node_root: Path) -> Stager:
    assert COMPOSER in ("fuse", "dm")
    return Stager(str(node_root / "state"), composer=COMPOSER)  # type: ignore[arg-type]


@pytest.fixture
def fuse_only() -> None:
    if COMPOSER != "fuse":
        pytest.skip("about the userspace concatenation daemon only")


@pytest.fixture
def one_extent(node_root: Path) -> list[BackingExtent]:
    """One extent from a nonzero offset; 320 MiB, as XFS wants 300 MB at least."""
    e = (4 * MiB, 320 * MiB)
    lun = make_lun(node_root / "lun-a", 336 * MiB, seed=1, used=e)
    return [BackingExtent(path=str(lun), offset=e[0], length=e[1])]


@pytest.fixture
def three_extents(node_root: Path) -> list[BackingExtent]:
    """Three LUN files, each used from a nonzero offset; lengths not multiples of 1 MiB."""
    spans = [
        (1 * MiB + 4096, 104 * MiB - 8192, 112 * MiB),
        (3 * MiB, 114 * MiB + 512, 128 * MiB),
        (7 * MiB + 512, 124 * MiB - 512, 160 * MiB),
    ]
    extents = []
    for seed, (off, length, size) in enumerate(spans, start=1):
        lun = make_lun(node_root / f"lun-{'abc'[seed - 1]}", size, seed=seed, used=(off, length))
        extents.append(BackingExtent(path=str(lun), offset=off, length=length))
    return extents
