"""A real LVM volume group on loop devices over /tmp images, for the VM tests.

Only usable inside vmtest (the host kernel has no device-mapper).  `volume_group`
makes the VG (extent size 1 MiB, so MiB-sized LUNs are exact) and removes it,
its loop devices and images afterwards, also when a test failed; `thin_pool`
makes a fresh thin pool in it and removes it (with every thin volume) after.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from blockio import device_size, read_at, write_at  # noqa: F401 (also for importers of this module)

MiB = 2**20
IN_VM = bool(os.environ.get("VMTEST_GUEST"))
NOT_IN_VM = "needs device-mapper: runs inside vmtest (tests/vm/test_lvm_vm.py starts it)"
# thin_check on every pool (de)activation costs seconds under TCG; the pools here are fresh
NO_THIN_CHECK = ("--config", 'global/thin_check_executable=""')
_ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1", "LC_ALL": "C"}


def sh(*argv: str) -> str:
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=_ENV)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: rc={res.returncode}: {res.stderr.strip()}")
    return res.stdout


@contextlib.contextmanager
def volume_group(workdir: Path, *, pvs: int = 2, pv_size: int = 384 * MiB) -> Iterator[str]:
    vg = f"vt{uuid.uuid4().hex[:6]}"
    loops: list[str] = []
    images = [workdir / f"{vg}-pv{i}.img" for i in range(pvs)]
    try:
        for img in images:
            with open(img, "wb") as f:
                f.truncate(pv_size)
            loops.append(sh("losetup", "-f", "--show", str(img)).strip())
        sh("pvcreate", "-q", *loops)
        sh("vgcreate", "-q", "-s", "1M", vg, *loops)
        yield vg
    finally:
        with contextlib.suppress(AssertionError):
            sh("vgremove", "-q", "-y", "-ff", vg)
        for dev in loops:
            with contextlib.suppress(AssertionError):
                sh("pvremove", "-q", "-y", "-ff", dev)
            with contextlib.suppress(AssertionError):
                sh("losetup", "-d", dev)
        for img in images:
            with contextlib.suppress(FileNotFoundError):
                img.unlink()


@contextlib.contextmanager
def thin_pool(vg: str, *, size: int = 128 * MiB, name: str = "") -> Iterator[str]:
    pool = name or f"pool{uuid.uuid4().hex[:6]}"
    sh("lvcreate", "-q", "-L", f"{size}b", "-T", f"{vg}/{pool}", *NO_THIN_CHECK)
    try:
        yield pool
    finally:
        with contextlib.suppress(AssertionError):
            sh("lvremove", "-q", "-y", "-f", f"{vg}/{pool}", *NO_THIN_CHECK)


def empty_pool(vg: str, pool: str) -> None:
    """Remove every thin volume of `pool` (one `lvremove`: commands are slow in a VM)."""
    out = sh("lvs", "--noheadings", "-o", "lv_name", "-S", f"pool_lv={pool}", vg)
    names = [f"{vg}/{n.strip()}" for n in out.split() if n.strip()]
    if names:
        sh("lvremove", "-q", "-y", "-f", *names)


