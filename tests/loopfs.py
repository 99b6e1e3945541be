"""Real filesystems on loop devices, and file pools on them: helpers for tests.

Import these by module name (``from loopfs import make_pool, loop_filesystem``);
tests/ is on sys.path through tests/conftest.py, which also provides the
session fixtures ``xfs_mount``, ``ext4_mount`` and ``btrfs_mount``.
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


def _run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


# mkfs.btrfs refuses to run when any mount point on the machine does not answer stat
# (a FUSE mount whose daemon died says ENOTCONN), though that mount has nothing to do
# with our image.  So mkfs runs in a private mount namespace where such dead mounts
# are detached first; the machine's own mount table is not touched.
_MKFS_IN_PRIVATE_NS = r"""
awk '{print $2}' /proc/self/mounts | while read -r m; do
  m=$(printf '%b' "$m")
  stat -- "$m" >/dev/null 2>&1 || umount -l -- "$m" 2>/dev/null || true
done
exec "$@"
"""


def _mkfs(argv: list[str], image: Path) -> None:
    _run("unshare", "--mount", "--propagation", "private",
         "sh", "-c", _MKFS_IN_PRIVATE_NS, "mkfs", *argv, str(image))


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
        _mkfs(argv, image)
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
    # something (a test's leftover mount or loop device) still uses it: detach lazily,
    # so the kernel frees it when that goes, and say so, as it points at a leak
    log.warning("%s still busy after retries; lazy unmount", mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _detach(dev: str) -> None:
    subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


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


__all__ = ["IMAGE_SIZE", "NOT_ROOT", "MKFS", "is_root", "loop_filesystem", "make_pool", "unique_name"]
