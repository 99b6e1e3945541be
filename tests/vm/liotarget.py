"""What the LIO tests need inside vmtest: a pool filesystem with user xattrs,
iscsid, and a clean LIO/open-iscsi state afterwards.

Only usable inside vmtest (the host kernel has no LIO target and no iSCSI
initiator).  The guest's /tmp is tmpfs, which (kernel 6.1) has no user xattrs,
so the pools live on an ext4 filesystem on a loop device.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from csi_virtvol.backends import lio
from csi_virtvol.model.array import ArraySpec
from csi_virtvol.model.ids import ArrayId
from blockio import device_size, read_at, write_at  # noqa: F401 (also for importers of this module)

MiB = 2**20
IN_VM = bool(os.environ.get("VMTEST_GUEST"))
NOT_IN_VM = "needs LIO and open-iscsi: runs inside vmtest (tests/vm/test_lio_vm.py starts it)"


def sh(*argv: str, check: bool = True) -> str:
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: rc={res.returncode}: {res.stderr.strip()}")
    return res.stdout


@contextlib.contextmanager
def ext4_mount(workdir: Path, *, size: int = 768 * MiB) -> Iterator[Path]:
    img, mnt = workdir / "pools.img", workdir / "pools"
    with open(img, "wb") as f:
        f.truncate(size)
    sh("mkfs.ext4", "-q", "-E", "nodiscard,lazy_itable_init=1", str(img))
    mnt.mkdir()
    sh("mount", "-o", "loop", str(img), str(mnt))
    try:
        yield mnt
    finally:
        sh("umount", "-l", str(mnt), check=False)
        img.unlink(missing_ok=True)


def iscsid_running() -> bool:
    with open("/proc/net/unix", encoding="utf-8") as f:
        return "ISCSIADM_ABSTRACT_NAMESPACE" in f.read()


@contextlib.contextmanager
def iscsid(logdir: Path) -> Iterator[None]:
    """iscsid in the foreground of its own session (it signals its process group
    when it stops), unless one already runs; stopped after, with every session."""
    if iscsid_running():
        yield
        return
    sh("modprobe", "-a", "iscsi_tcp", "sd_mod")
    if not os.path.exists("/etc/iscsi/initiatorname.iscsi"):
        os.makedirs("/etc/iscsi", exist_ok=True)
        with open("/etc/iscsi/initiatorname.iscsi", "w") as f:
            f.write(f"InitiatorName={sh('iscsi-iname').strip()}\n")
    with open(logdir / "iscsid.log", "ab") as log:
        proc = subprocess.Popen(["iscsid", "-f"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    try:
        for _ in range(200):
            if iscsid_running():
                break
            time.sleep(0.05)
        else:
            raise AssertionError("iscsid did not start")
        yield
    finally:
        sh("iscsiadm", "-m", "node", "--logoutall=all", check=False)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def new_iqn() -> str:
    return f"iqn.2003-01.org.csi-virtvol.test:{uuid.uuid4().hex[:8]}"


def lio_spec(pools: Path, *, name: str = "", emulate_3pc: bool = True, **params: str) -> ArraySpec:
    name = name or f"lio-{uuid.uuid4().hex[:6]}"
    return ArraySpec(id=ArrayId(name), kind="lio",
                     params={"iqn": new_iqn(), "pool": str(pools / name),
                             "emulate_3pc": "true" if emulate_3pc else "false", **params})


def remove_target(driver: lio.LioDriver | ArraySpec) -> None:
    """What a reboot does to LIO: log out, and the target, its LUNs and backstores
    (with their loop devices) vanish; the pool's images stay."""
    spec = driver if isinstance(driver, ArraySpec) else driver.spec
    iqn, root = spec.params["iqn"], os.path.realpath(spec.params["pool"])
    sh("iscsiadm", "-m", "node", "-T", iqn, "--logout", check=False)
    sh("iscsiadm", "-m", "node", "-T", iqn, "-o", "delete", check=False)
    tpg = Path(lio.TARGET_ROOT) / "iscsi" / iqn / lio.TPG
    for d in [*tpg.glob("acls/*/lun_*"), *tpg.glob("lun/lun_*")]:
        for link in d.iterdir():
            if link.is_symlink():
                link.unlink()
        d.rmdir()
    if tpg.exists():
        (tpg / "enable").write_text("0")
    for d in [*tpg.glob("acls/*"), *tpg.glob("np/*")]:
        d.rmdir()
    if tpg.exists():
        tpg.rmdir()
        tpg.parent.rmdir()
    for so in (Path(lio.TARGET_ROOT) / "core" / lio.HBA).glob(lio.SO_PREFIX + "*"):
        loop = (so / "udev_path").read_text().strip()
        backing = Path(f"/sys/block/{os.path.basename(loop)}/loop/backing_file")
        if backing.exists() and backing.read_text().strip().startswith(root + "/"):
            so.rmdir()
            sh("losetup", "-d", loop, check=False)


def remove_array(driver: lio.LioDriver) -> None:
    """Undo an array completely: its target and its pool."""
    remove_target(driver)
    shutil.rmtree(driver.spec.params["pool"], ignore_errors=True)


