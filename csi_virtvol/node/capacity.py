"""How many volumes this node can hold at once: NodeGetInfo's max_volumes_per_node when the
configuration sets none (`maxVolumesPerNode`).

Each staged volume costs the node, whatever its size:

* loop devices: the FUSE composition puts one on the concatenation daemon's file, the dm
  composition one under each file-backed segment (so at least one per volume);
* with the FUSE composition, one concatenation daemon (node/concatfs.py: a Python process of
  about 40 MiB resident, more while a live cut keeps its bitmaps; DAEMON_MEMORY allows 64);
* where LUNs come over NBD (qsd arrays): a kernel nbd device (/dev/nbdN, a fixed set), or,
  where the kernel has no nbd, an nbdfuse daemon (NBDFUSE_MEMORY);
* the kernel's own structures for its devices (KERNEL_MEMORY: the loop device's queue, the
  dm table).

The node holds as many volumes as the scarcest of these allows, with the memory for all of
it kept to MEMORY_SHARE of the node's (the rest is the workloads').  Loop devices are made on
demand through /dev/loop-control, up to the minor numbers the loop driver has (2^20 with
max_part=0, fewer with partitions per loop device); without loop-control only the /dev/loopN
that exist can be used.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

MiB = 1 << 20
DAEMON_MEMORY = 64 * MiB    # one concatenation daemon (measured: ~40 MiB resident when idle)
NBDFUSE_MEMORY = 16 * MiB   # one nbdfuse daemon
KERNEL_MEMORY = 1 * MiB     # a volume's loop and dm devices in the kernel
MEMORY_SHARE = 4            # a quarter of the node's memory for the volumes' machinery
MINOR_BITS = 20             # Linux: minor numbers per major


@dataclass(frozen=True, slots=True, kw_only=True)
class Bound:
    limit: int
    why: str


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _int(path: str) -> int | None:
    text = _read(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def mem_total(proc_root: str = "/proc") -> int:
    """MemTotal in bytes (0 when /proc/meminfo cannot be read)."""
    text = _read(os.path.join(proc_root, "meminfo")) or ""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


def loop_devices(*, sys_root: str = "/sys", dev_root: str = "/dev") -> int:
    """Loop devices this node can have at once."""
    if os.path.exists(os.path.join(dev_root, "loop-control")):
        max_part = _int(os.path.join(sys_root, "module", "loop", "parameters", "max_part")) or 0
        part_shift = max_part.bit_length() if max_part > 0 else 0
        return (1 << MINOR_BITS) >> part_shift
    try:
        names = os.listdir(dev_root)
    except OSError:
        return 0
    return sum(1 for n in names if re.fullmatch(r"loop\d+", n))


def nbd_devices(*, sys_root: str = "/sys") -> int | None:
    """The kernel's nbd devices, or None when the kernel has no nbd module loaded."""
    if not os.path.isdir(os.path.join(sys_root, "module", "nbd")):
        return None
    try:
        names = os.listdir(os.path.join(sys_root, "block"))
    except OSError:
        return 0
    return sum(1 for n in names if re.fullmatch(r"nbd\d+", n))


def bounds(*, composer: str, nbd: bool, sys_root: str = "/sys", proc_root: str = "/proc",
           dev_root: str = "/dev") -> list[Bound]:
    """Each resource's limit on the number of volumes.  `composer`: "fuse" or "dm";
    `nbd`: whether LUNs may come over NBD (qsd arrays are configured)."""
    out = [Bound(limit=loop_devices(sys_root=sys_root, dev_root=dev_root), why="loop devices")]
    per_volume = KERNEL_MEMORY
    if composer == "fuse":
        per_volume += DAEMON_MEMORY
    if nbd:
        devices = nbd_devices(sys_root=sys_root)
        if devices is not None:
            out.append(Bound(limit=devices, why="kernel nbd devices"))
        else:
            per_volume += NBDFUSE_MEMORY
    total = mem_total(proc_root)
    if total:
        out.append(Bound(limit=total // MEMORY_SHARE // per_volume,
                         why=f"{per_volume // MiB} MiB a volume in a quarter of {total // MiB} MiB of memory"))
    return out


def max_volumes(*, composer: str, nbd: bool, sys_root: str = "/sys", proc_root: str = "/proc",
                dev_root: str = "/dev") -> tuple[int, str]:
    """The volumes this node can hold, at least 1 (0 would mean "no limit" in CSI), and the
    resource that sets it."""
    found = bounds(composer=composer, nbd=nbd, sys_root=sys_root, proc_root=proc_root, dev_root=dev_root)
    scarcest = min(found, key=lambda b: b.limit)
    return max(1, scarcest.limit), scarcest.why


__all__ = ["Bound", "bounds", "max_volumes", "loop_devices", "nbd_devices", "mem_total"]
