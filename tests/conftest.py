"""Shared fixtures: real filesystems on loop devices, and file pools on them.

Session-scoped `xfs_mount` (reflink=1), `ext4_mount` and `btrfs_mount` each
make a sparse image under a temp dir, attach it to a loop device and mount
it; teardown unmounts, detaches and deletes, also when a test failed.  They
skip (with the reason) only when not root.  `make_pool` turns a directory of
such a mount into a file-pool ArraySpec.

Tests needing root for other reasons carry `@pytest.mark.root`; they are
skipped, with a reason, when not run as root.

Import the helpers from here in other test files with
``from conftest import make_pool, loop_filesystem``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_virtvol.model.array import ArraySpec
from csi_virtvol.model.ids import ArrayId

log = logging.getLogger(__name__)

IMAGE_SIZE = 1536 * 2**20  # 1.5 GiB sparse: above btrfs's and xfs's minimums, cheap on disk
NOT_ROOT = "needs root: loop devices and mount(2)"

MKFS: dict[str, list[str]] = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}


def is_root() -> bool:
    return os.geteuid() == 0


def pytest_configure(config: pytest.Config) -> None:
    # also declared in pyproject.toml; repeated so the marker exists with any ini file
    config.addinivalue_line("markers", "root: needs root (loop devices, mount); skipped otherwise")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and not is_root():
        pytest.skip(NOT_ROOT)


def _run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@contextlib.contextmanager
def loop_filesystem(fstype: str, workdir: Path, *, size: int = IMAGE_SIZE,
                    mkfs: list[str] | None = None, options: str = "") -> Iterator[Path]:
    """Make a `fstype` filesystem in a sparse image in `workdir`, loop-mount it,
    yield the mount point; on exit unmount, detach and delete, whatever happened."""
    if not is_root():
        pytest.skip(NOT_ROOT)
    argv = mkfs if mkfs is not None else MKFS[fstype]
    image = workdir / f"{fstype}.img"
    mnt = workdir / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: image.unlink(missing_ok=True))
        with open(image, "wb") as f:
            f.truncate(size)
        _run(*argv, str(image))
        dev = _run("losetup", "--find", "--show", str(image)).strip()
        stack.callback(_detach, dev)
        _run("mount", "-t", fstype, *(["-o", options] if options else []), dev, str(mnt))
        stack.callback(_unmount, mnt)
        log.info("mounted %s (%s on %s) at %s", fstype, dev, image, mnt)
        yield mnt


def _unmount(mnt: Path) -> None:
    for _ in range(10):
        proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, check=False)
        if proc.returncode == 0 or not os.path.ismount(mnt):
            return
        time.sleep(0.5)  # a loop device or process still holding it: give it a moment
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _detach(dev: str) -> None:
    subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


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


def make_pool(mount_dir: Path | str, name: str, capacity: int | None = None) -> ArraySpec:
    """A file-pool ArraySpec (kind "file", id `name`) at `mount_dir`/`name`,
    made empty.  `capacity` (bytes) caps the pool below the filesystem size."""
    path = Path(mount_dir) / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    params = {"path": str(path)}
    if capacity is not None:
        params["capacity"] = str(capacity)
    return ArraySpec(id=ArrayId(name), kind="file", params=params)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
