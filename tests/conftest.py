"""Shared fixtures: real filesystems on loop devices, and file pools on them.

Session-scoped `xfs_mount` (reflink=1), `ext4_mount` and `btrfs_mount` each
make a sparse image under a temp dir, attach it to a loop device and mount
it; teardown unmounts, detaches and deletes, also when a test failed.  They
skip (with the reason) only when not root.  `make_pool(mount_dir, name,
capacity=None) -> ArraySpec` turns a directory of such a mount into a file
pool; it and `loop_filesystem` live in tests/loopfs.py: import them with
``from loopfs import make_pool`` (several conftest.py files exist, so
``from conftest import ...`` is ambiguous; the names are re-exported here too).

Tests needing root for other reasons carry `@pytest.mark.root`; they are
skipped, with a reason, when not run as root.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loopfs import NOT_ROOT, is_root, loop_filesystem, make_pool, unique_name

__all__ = ["make_pool", "loop_filesystem", "unique_name"]


def pytest_configure(config: pytest.Config) -> None:
    # also declared in pyproject.toml; repeated so the marker exists with any ini file
    config.addinivalue_line("markers", "root: needs root (loop devices, mount); skipped otherwise")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and not is_root():
        pytest.skip(NOT_ROOT)


@pytest.fixture(scope="session")
def xfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh XFS with reflink=1, loop-mounted; FICLONE works here."""
    with loop_filesystem("xfs", tmp_path_factory.mktemp("fs-xfs")) as mnt:
        yield mnt


@pytest.fixture(scope="session")
def ext4_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh ext4, loop-mounted; no reflink."""
    with loop_filesystem("ext4", tmp_path_factory.mktemp("fs-ext4")) as mnt:
        yield mnt


@pytest.fixture(scope="session")
def btrfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh btrfs, loop-mounted; FICLONE works here."""
    with loop_filesystem("btrfs", tmp_path_factory.mktemp("fs-btrfs")) as mnt:
        yield mnt
