#!/usr/bin/env python3
"""Copy methods of the SAN arrays (`lio`, `lvm`) against dd, measured inside vmtest.

The host kernel has no LIO target, iSCSI initiator or device-mapper, so the script, run
on the host, boots one throwaway VM (/work/shared/vmtest/vmtest --udev) and runs itself
there with --in-vm; the VM's output (the tables) streams to stdout.  Per LUN size
(--sizes, default 64,256 MiB; --quick 64), each source LUN filled with random data:

  lio (a LIO iSCSI target whose LUNs report 3PC, pool on ext4 on a loop device)
    dd              dd bs=4M iflag=direct oflag=direct between the two LUNs' iSCSI
                    devices (both attached by the driver's open_path): the baseline
    copy engine     csi_virtvol.copy.engine.copy_range between the same two devices
    internal        copy_lun_internal: a new LUN filled by the target itself with
                    EXTENDED COPY (sg_xcopy), its LUN creation and attach included
    create+attach   create_lun + open_path of an empty LUN: the part of the internal
                    copy that dd and the engine had done for them before their clock
  lvm (an LVM thin pool on two loop devices)
    dd              dd between the source thin LV and another thin LV
    copy engine     copy_range between the same two LVs
    internal        copy_lun_internal: a thin snapshot (lvcreate -s)
    create+attach   create_lun + open_path of an empty thin LV (one lvcreate): what any
                    LVM command costs here, for comparison with the snapshot

Each method runs --repeat times (default 3), each time into a fresh LUN, and the median
is shown with every run.  Every copy is compared with its source (cmp, through the block
devices).  Before each measured step udev is settled and the page cache dropped; the
guest-tmpfs images under the loop devices are preallocated and every path runs once
unmeasured on a 16 MiB LUN first (TCG translates code on first use, and a first touch of
guest RAM is slow: either would bias whichever method runs first).  Exit status 1 when a
copy differs or a step failed.  Everything (LUNs, targets, sessions, iscsid, loop devices,
the VG) is removed also on failure; the VM is thrown away anyway.  About 10 minutes on the
idle 2-CPU dev VM (4.5 with --repeat 1; --quick about 3), more when other jobs share it.

  .venv/bin/python bench/bench_san.py [--quick] [--sizes 64,256] [--repeat 3] [--arrays lio,lvm] [--mem 3G]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VMTEST = Path(os.environ.get("VMTEST", ROOT.parent / "shared" / "vmtest" / "vmtest"))
for p in (ROOT, ROOT / "tests", ROOT / "tests" / "vm"):
    sys.path.insert(0, str(p))

MiB = 1 << 20
T0 = time.monotonic()


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    array: str
    method: str
    size: int
    seconds: float
    identical: bool | None  # None: nothing copied (a setup step)
    runs: list[float]


def run(*argv: str) -> str:
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: rc={res.returncode}: {res.stderr.strip()}")
    return res.stdout


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fill_random(dev: str, size: int) -> None:
    run("dd", "if=/dev/urandom", f"of={dev}", "bs=4M", f"count={size // (4 * MiB)}", "iflag=fullblock",
        "oflag=direct", "status=none")


def same(a: str, b: str) -> bool:
    drop_caches()
    return subprocess.run(["cmp", "-s", a, b], stdin=subprocess.DEVNULL).returncode == 0


def preallocate(work: Path) -> None:
    """Allocate the guest-tmpfs images under the loop devices now: the first write to a
    tmpfs page (and to the VM's RAM behind it) is slow under TCG, and would otherwise
    land on whichever copy runs first."""
    for img in work.glob("*.img"):
        run("fallocate", "-l", str(img.stat().st_size), str(img))


def quiesce() -> None:
    """Before each measured step: udev done with the events of the previous ones (a write
    to a disk makes udev re-read it; LVM commands wait for udev), nothing dirty, caches cold."""
    subprocess.run(["udevadm", "settle", "-t", "60"], stdin=subprocess.DEVNULL, capture_output=True)
    drop_caches()


def timed(fn: Callable[[], object]) -> float:
    quiesce()
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def dd(src: str, dst: str) -> None:
    run("dd", f"if={src}", f"of={dst}", "bs=4M", "iflag=direct", "oflag=direct", "status=none")


def engine(src: str, dst: str) -> None:
    from csi_virtvol.copy.engine import copy_range
    copy_range(src=src, dst=dst)


def median(xs: list[float]) -> float:
    ys = sorted(xs)
    return ys[len(ys) // 2] if len(ys) % 2 else (ys[len(ys) // 2 - 1] + ys[len(ys) // 2]) / 2


def measure(driver: Any, *, array: str, internal: str, size: int, repeat: int, rows: list[Row] | None) -> None:
    """One LUN size on one array: a random source, then each method `repeat` times, each
    into a fresh LUN that is compared with the source and deleted.  `rows` None: a warm-up
    (TCG translates code on first use; the first run of each path would pay for it)."""
    def new_id(prefix: str) -> Any:
        return f"{prefix}{uuid.uuid4().hex[:6]}"

    src = driver.create_lun(name=new_id("src"), size=size)
    try:
        src_dev = driver.open_path(lun_id=src.id)
        fill_random(src_dev, size)

        def host_copy(fn: Callable[[str, str], None]) -> tuple[float, bool | None]:
            dst = driver.create_lun(name=new_id("dst"), size=size)
            try:
                dst_dev = driver.open_path(lun_id=dst.id)
                secs = timed(lambda: fn(src_dev, dst_dev))
                return secs, same(src_dev, dst_dev) if rows is not None else None
            finally:
                driver.delete_lun(lun_id=dst.id)

        def internal_copy() -> tuple[float, bool | None]:
            copy_id = new_id("copy")
            try:
                secs = timed(lambda: driver.copy_lun_internal(source=src.id, name=copy_id))
                return secs, same(src_dev, driver.open_path(lun_id=copy_id)) if rows is not None else None
            finally:
                driver.delete_lun(lun_id=copy_id)

        def setup() -> tuple[float, bool | None]:
            empty_id = new_id("empty")
            try:
                return timed(lambda: driver.open_path(lun_id=driver.create_lun(name=empty_id, size=size).id)), None
            finally:
                driver.delete_lun(lun_id=empty_id)

        steps: list[tuple[str, Callable[[], tuple[float, bool | None]]]] = [
            ("dd (baseline)", lambda: host_copy(dd)),
            ("copy engine (copy_range)", lambda: host_copy(engine)),
            (internal, internal_copy),
            ("create_lun + open_path (setup)", setup)]
        for method, step in steps:
            results = [step() for _ in range(repeat if rows is not None else 1)]
            if rows is not None:
                oks = [ok for _, ok in results]
                rows.append(Row(array=array, method=method, size=size, seconds=median([t for t, _ in results]),
                                identical=None if oks[0] is None else all(oks), runs=[t for t, _ in results]))
    finally:
        driver.delete_lun(lun_id=src.id)
    what = "warm-up" if rows is None else "done"
    print(f"  {array} {size // MiB} MiB {what} at {time.monotonic() - T0:.0f} s", flush=True)


WARMUP = 16 * MiB


# ---- lio ------------------------------------------------------------------------------------

def bench_lio(work: Path, sizes: list[int], repeat: int, rows: list[Row]) -> None:
    from csi_virtvol.backends.lio import LioDriver
    from csi_virtvol.model.array import Ability
    from liotarget import ext4_mount, iscsid, lio_spec, remove_array

    with contextlib.ExitStack() as stack:
        pools = stack.enter_context(ext4_mount(work, size=3 * max(sizes) + 128 * MiB))
        preallocate(work)
        stack.enter_context(iscsid(work))
        driver = LioDriver(lio_spec(pools, name="lio-bench"))
        stack.callback(remove_array, driver)
        info = driver.describe()
        if Ability.INTERNAL_COPY not in info.probed:
            raise SystemExit(f"the LIO target's LUNs do not report 3PC (probed {info.probed!r})")
        print(f"- lio: {info.identity.vendor}/{info.identity.model} {info.identity.version}, "
              f"3PC set, iblock backstores on loop devices over images on ext4 (itself on a loop "
              f"device over guest tmpfs), initiator on 127.0.0.1:3260", flush=True)
        measure(driver, array="lio", internal="internal (EXTENDED COPY)", size=WARMUP, repeat=1, rows=None)
        for size in sizes:
            measure(driver, array="lio", internal="internal (EXTENDED COPY)", size=size, repeat=repeat, rows=rows)


# ---- lvm ------------------------------------------------------------------------------------

def bench_lvm(work: Path, sizes: list[int], repeat: int, rows: list[Row]) -> None:
    from csi_virtvol.backends.lvm import LvmThinDriver
    from csi_virtvol.model.array import ArraySpec
    from csi_virtvol.model.ids import ArrayId
    from lvmvg import thin_pool, volume_group

    pool_size = 2 * max(sizes) + 64 * MiB
    with contextlib.ExitStack() as stack:
        vg = stack.enter_context(volume_group(work, pvs=2, pv_size=pool_size // 2 + 64 * MiB))
        preallocate(work)
        pool = stack.enter_context(thin_pool(vg, size=pool_size))
        driver = LvmThinDriver(ArraySpec(id=ArrayId("lvm-bench"), kind="lvm", params={"vg": vg, "pool": pool}))
        info = driver.describe()
        print(f"- lvm: lvm {info.identity.version}, thin pool of {pool_size // MiB} MiB (default chunk "
              f"size, zeroing on) on 2 loop devices over guest tmpfs", flush=True)
        measure(driver, array="lvm", internal="internal (thin snapshot)", size=WARMUP, repeat=1, rows=None)
        for size in sizes:
            measure(driver, array="lvm", internal="internal (thin snapshot)", size=size, repeat=repeat, rows=rows)


# ---- report ---------------------------------------------------------------------------------

def guest_facts() -> list[str]:
    cpu, mem = "?", "?"
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    with contextlib.suppress(OSError):
        mem = next(f"{int(line.split()[1]) // 1024} MiB" for line in open("/proc/meminfo")
                   if line.startswith("MemTotal"))
    return [f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- VM (vmtest, qemu TCG): {os.cpu_count()} vCPUs ({cpu}), {mem} RAM, kernel {platform.release()}"]


def table(rows: list[Row]) -> list[str]:
    many = any(len(r.runs) > 1 for r in rows)
    out = ["| array | method | size MiB | seconds | MiB/s | time vs dd | identical |" + (" runs s |" if many else ""),
           "|---|---|---:|---:|---:|---:|---|" + ("---|" if many else "")]
    base = {(r.array, r.size): r.seconds for r in rows if r.method.startswith("dd")}
    for r in rows:
        b = base.get((r.array, r.size))
        ratio = f"{r.seconds / b:.2f}x" if b else "–"
        rate = f"{r.size / MiB / max(r.seconds, 1e-9):.1f}" if r.identical is not None else "–"
        ident = {True: "yes", False: "**NO**", None: "–"}[r.identical]
        runs = f" {' '.join(f'{t:.2f}' for t in r.runs)} |" if many else ""
        out.append(f"| {r.array} | {r.method} | {r.size // MiB} | {r.seconds:.2f} | {rate} | {ratio} | {ident} |"
                   + runs)
    return out


def guest(sizes: list[int], arrays: list[str], repeat: int) -> int:
    print("# bench_san (inside vmtest)", flush=True)
    for line in guest_facts():
        print(line, flush=True)
    rows: list[Row] = []
    failed: BaseException | None = None
    with tempfile.TemporaryDirectory(prefix="bench-san-", dir="/tmp") as tmp:
        work = Path(tmp)
        for name, fn in (("lio", bench_lio), ("lvm", bench_lvm)):
            if name not in arrays:
                continue
            try:
                (work / name).mkdir()
                fn(work / name, sizes, repeat, rows)
            except Exception as e:  # report what was measured, then fail
                failed = e
                print(f"{name}: FAILED: {e!r}", flush=True)
    print()
    print("\n".join(table(rows)), flush=True)
    bad = [r for r in rows if r.identical is False]
    for r in bad:
        print(f"MISMATCH: {r.array} {r.method} {r.size // MiB} MiB differs from its source")
    return 1 if bad or failed else 0


def host(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise SystemExit("run as root (vmtest, loop devices)")
    if not VMTEST.exists():
        raise SystemExit(f"no vmtest at {VMTEST}")
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "?"
    print(f"host: {platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}; "
          f"csi-virtvol at {commit}", flush=True)
    argv = [str(VMTEST), "--udev", "--mem", args.mem, "--cpus", str(args.cpus), "--timeout", str(args.timeout),
            "--", sys.executable, str(Path(__file__).resolve()), "--in-vm", "--sizes", ",".join(
                str(s // MiB) for s in sizes_of(args)), "--arrays", args.arrays, "--repeat", str(args.repeat)]
    return subprocess.run(argv, cwd=ROOT, stdin=subprocess.DEVNULL).returncode


def sizes_of(args: argparse.Namespace) -> list[int]:
    return [64 * MiB] if args.quick else [int(s) * MiB for s in args.sizes.split(",") if s]


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB only")
    ap.add_argument("--sizes", default="64,256", help="LUN sizes in MiB, multiples of 4 (default 64,256)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method and size, the median shown (default 3)")
    ap.add_argument("--arrays", default="lio,lvm", help="which arrays to measure (default lio,lvm)")
    ap.add_argument("--mem", default="3G", help="VM memory (default 3G; images live in guest tmpfs)")
    ap.add_argument("--cpus", type=int, default=2, help="VM vCPUs (default 2)")
    ap.add_argument("--timeout", type=int, default=1500, help="vmtest timeout in seconds (default 1500)")
    ap.add_argument("--in-vm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = sizes_of(args)
    if any(s <= 0 or s % (4 * MiB) for s in sizes):
        raise SystemExit("--sizes: positive multiples of 4 MiB")
    if args.in_vm:
        if not os.environ.get("VMTEST_GUEST"):
            raise SystemExit("--in-vm is for the guest side (vmtest)")
        return guest(sizes, args.arrays.split(","), args.repeat)
    return host(args)


if __name__ == "__main__":
    sys.exit(main())
