"""Helpers for the node tests: LUN files with guard patterns, cleanup, cache dropping."""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_virtvol.node import concat, devices, fs
from csi_virtvol.node.layout import BackingExtent
from csi_virtvol.node.stager import Stager

MiB = 1 << 20

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, mount)")


def make_lun(path: Path, size: int, *, seed: int, used: tuple[int, int] | None = None) -> Path:
    """A LUN file filled with a recognisable pattern, so stray writes show; the `used`
    (offset, length) range is left sparse."""
    pattern = guard_pattern(seed)
    lo, hi = (used[0], used[0] + used[1]) if used else (size, size)
    with open(path, "wb") as f:
        f.truncate(size)
        for pos in range(0, size, 4096):
            if not (lo <= pos and pos + 4096 <= hi):
                f.seek(pos)
                f.write(pattern[: min(4096, size - pos)])
    return path


def guard_pattern(seed: int) -> bytes:
    return (f"lun{seed:04d}".encode() * 600)[:4096]


def cleanup_under(root: Path) -> None:
    """Last-resort teardown of anything a failed test left under root."""
    prefix = str(root)
    for m in reversed(fs.mounts()):
        if m.mount_point.startswith(prefix) and not m.mount_point.endswith("/mnt"):
            subprocess.run(["umount", "-l", m.mount_point], check=False)
    loops = devices.list_loops()
    ours = {lo.name for lo in loops if lo.back_file.startswith(prefix)}
    for lo in loops:  # read-only loops over our loops first
        if lo.back_file in ours:
            subprocess.run(["losetup", "-d", lo.name], check=False)
    for name in ours:
        subprocess.run(["losetup", "-d", name], check=False)
    for d in root.glob("state/volumes/*"):
        pid = concat.daemon_pid(str(d))
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    for m in reversed(fs.mounts()):
        if m.mount_point.startswith(prefix):
            subprocess.run(["umount", "-l", m.mount_point], check=False)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_extents(extents: list[BackingExtent]) -> bytes:
    """The volume image, read straight from the LUN files."""
    out = bytearray()
    for e in extents:
        with open(e.path, "rb") as f:
            f.seek(e.offset)
            out += f.read(e.length)
    return bytes(out)
