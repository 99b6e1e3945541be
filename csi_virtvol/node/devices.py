"""Loop devices through losetup.

attach() is idempotent: a loop already backed by the same file at the same offset and
size limit (and read-only mode) is reused, so a retried stage finds what the crashed one
made.
"""
from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass

from csi_virtvol import errors
from csi_virtvol.node import commands

logger = logging.getLogger(__name__)

_DELETED = " (deleted)"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoopDevice:
    name: str        # /dev/loopN
    back_file: str   # as the kernel reports it
    offset: int
    sizelimit: int   # 0 = to the end of the file
    direct_io: bool
    readonly: bool


def list_loops() -> list[LoopDevice]:
    out = commands.run(["losetup", "-J", "-l", "-O", "NAME,BACK-FILE,OFFSET,SIZELIMIT,DIO,RO"])
    if not out.stdout.strip():
        return []
    try:
        rows = json.loads(out.stdout).get("loopdevices", [])
    except ValueError as e:
        raise errors.BackendError(f"losetup -J printed something else: {out.stdout[:200]!r}") from e
    loops = []
    for r in rows:
        back = r.get("back-file") or ""
        if back.endswith(_DELETED):
            back = back[: -len(_DELETED)]
        loops.append(
            LoopDevice(
                name=r["name"],
                back_file=back,
                offset=int(r.get("offset") or 0),
                sizelimit=int(r.get("sizelimit") or 0),
                direct_io=_flag(r.get("dio")),
                readonly=_flag(r.get("ro")),
            )
        )
    return loops


def _flag(v: object) -> bool:
    return v in (True, 1, "1", "true")


def find(path: str, *, offset: int = 0, sizelimit: int = 0, readonly: bool | None = None) -> LoopDevice | None:
    """The loop backed by path at offset/sizelimit, if any."""
    want = os.path.realpath(path)
    for lo in list_loops():
        if lo.back_file not in (want, path):
            continue
        if lo.offset != offset or lo.sizelimit != sizelimit:
            continue
        if readonly is not None and lo.readonly != readonly:
            continue
        return lo
    return None


def find_all(path: str) -> list[LoopDevice]:
    """Every loop backed by path, whatever its offset."""
    want = os.path.realpath(path)
    return [lo for lo in list_loops() if lo.back_file in (want, path)]


def attach(
    path: str,
    *,
    offset: int = 0,
    sizelimit: int = 0,
    direct_io: bool = True,
    readonly: bool = False,
) -> str:
    """A loop device over path[offset:offset+sizelimit]; reuse one that exists."""
    existing = find(path, offset=offset, sizelimit=sizelimit, readonly=readonly)
    if existing is not None:
        logger.debug("reusing %s for %s@%d", existing.name, path, offset)
        return existing.name
    try:
        name = _losetup(path, offset=offset, sizelimit=sizelimit, direct_io=direct_io,
                        readonly=readonly)
    except errors.BackendError as e:
        if not direct_io or "Invalid argument" not in str(e):
            raise
        # Older kernels refuse direct I/O outright where the backing file cannot do it
        # (tmpfs, for one) instead of falling back; fall back here.
        logger.warning("direct I/O refused for %s; attaching buffered", path)
        name = _losetup(path, offset=offset, sizelimit=sizelimit, direct_io=False,
                        readonly=readonly)
    if not name.startswith("/dev/"):
        raise errors.BackendError(f"losetup printed no device for {path}: {name!r}")
    logger.info("attached %s to %s offset=%d sizelimit=%d dio=%s ro=%s",
                name, path, offset, sizelimit, direct_io, readonly)
    return name


def _losetup(path: str, *, offset: int, sizelimit: int, direct_io: bool, readonly: bool) -> str:
    argv = ["losetup", "--find", "--show", f"--direct-io={'on' if direct_io else 'off'}"]
    if offset:
        argv += ["--offset", str(offset)]
    if sizelimit:
        argv += ["--sizelimit", str(sizelimit)]
    if readonly:
        argv.append("--read-only")
    argv.append(path)
    return commands.run(argv).stdout.strip()


def detach(device: str) -> None:
    """Detach a loop device; one already gone is fine."""
    if not _is_attached(device):
        return
    res = commands.run(["losetup", "-d", device], check=False)
    if res.returncode != 0 and _is_attached(device):
        raise errors.BackendError(f"losetup -d {device} failed: {res.stderr.strip()}")
    logger.info("detached %s", device)


def _is_attached(device: str) -> bool:
    base = os.path.basename(device)
    return os.path.exists(f"/sys/block/{base}/loop/backing_file")


def backing_file(device: str) -> str | None:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/backing_file", encoding="utf-8") as f:
            back = f.read().strip()
    except OSError:
        return None
    return back[: -len(_DELETED)] if back.endswith(_DELETED) else back


def refresh_capacity(device: str) -> int:
    """Tell the loop driver its backing file changed size; return the new size."""
    commands.run(["losetup", "-c", device])
    return device_size(device)


def device_size(device: str) -> int:
    """Bytes in a block device."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise errors.BackendError(f"cannot open {device}: {e}") from e
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False
