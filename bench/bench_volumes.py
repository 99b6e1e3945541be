#!/usr/bin/env python3
"""CreateVolume / DeleteVolume latency of a real csi-virtvol plugin, with same-run baselines.

    .venv/bin/python bench/bench_volumes.py [--quick] [--volumes 200] [--size-mib 64]
                                            [--extents 4] [--fs xfs|disk] [--dir /var/tmp]

What runs (all in one invocation, so ratios compare like with like):

* The plugin: ``csi-virtvol serve`` as a subprocess (mode all, sqlite store, default log
  level), one file pool ``bench`` on the pool filesystem, its state.db on the machine's
  disk (``--dir``), talking gRPC over a unix socket.
* Pool filesystem: ``--fs xfs`` (default, needs root) = XFS (reflink=1) on a loop device
  over a sparse image in ``--dir``; ``--fs disk`` = a plain directory in ``--dir``.
  The filesystem must have room for the reservations of N sparse LUNs (N x size).
* Scenarios: single extent (``layout=single``) and E extents (``layout=concat``,
  ``maxExtentSize=size/E``), each at 1 and 16 concurrent clients.  A scenario creates N
  volumes of the given size (sparse LUN files), then deletes them all.  Clients are
  closed-loop threads in this process, pulling the next volume when their last call
  returns, all sharing one gRPC channel (as the external-provisioner multiplexes its
  workers over one connection).  The pool fills from 0 to N volumes while creating.
* Baselines:
  - ``Probe``: an empty Identity.Probe round trip to the same plugin, same clients/channel.
  - ``raw fs``: the filesystem work the file pool does, without the driver, on the same
    filesystem, same thread counts: per LUN open(O_CREAT|O_EXCL) a temp file,
    ftruncate, setxattr, fsync, link to the final name, unlink the temp, fsync the
    directory; delete = unlink + fsync the directory per LUN.  No lock, no state store.
  Driver latency is reported as a multiple of these (p50 over p50).
* Warm-up (not measured): 50 Probes and 3 create+delete per layout.
* Percentiles are nearest-rank over all calls of the scenario.

Everything created (pool, image, loop device, mount, state, socket) is removed on exit.
Prints machine facts and a markdown table; about 1-2 minutes on the dev machine,
``--quick`` (50 volumes, fewer probes) well under a minute.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import grpc  # noqa: E402

from _common import Plugin, arg_parser, describe_fs, machine_facts, mount_cap, sh  # noqa: E402
from csi_virtvol.csi._gen import csi_pb2 as pb  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
POOL = "bench"
XATTR = "user.csi-virtvol.origin"


# ---- measurement ---------------------------------------------------------------------------

@dataclass
class Result:
    name: str
    op: str
    clients: int
    extents: int
    latencies: list[float]  # seconds, one per call
    wall: float  # seconds from first call to last return

    def pct(self, p: float) -> float:
        s = sorted(self.latencies)
        return s[max(0, math.ceil(p / 100 * len(s)) - 1)]

    @property
    def p50(self) -> float:
        return self.pct(50)

    @property
    def p99(self) -> float:
        return self.pct(99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.latencies)

    @property
    def ops(self) -> float:
        return len(self.latencies) / self.wall

    def drift(self) -> tuple[float, float]:
        """p50 of the first and of the last tenth of the calls, in issue order."""
        k = max(1, len(self.latencies) // 10)
        return statistics.median(self.latencies[:k]), statistics.median(self.latencies[-k:])


def run_clients(n: int, clients: int, call: Callable[[int], None]) -> tuple[list[float], float]:
    """Call `call(i)` for i in range(n) from `clients` closed-loop threads."""
    lat = [0.0] * n
    nxt = iter(range(n))
    lock = threading.Lock()
    failures: list[BaseException] = []
    start_gate = threading.Barrier(clients + 1)

    def worker() -> None:
        start_gate.wait()
        while not failures:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            t = time.perf_counter()
            try:
                call(i)
            except BaseException as e:  # surfaced below
                failures.append(e)
                return
            lat[i] = time.perf_counter() - t

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    start_gate.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if failures:
        raise failures[0]
    return lat, wall


# ---- the scenarios ------------------------------------------------------------------------

def lun_files(pool: Path) -> list[str]:
    luns = pool / "luns"
    return [f for f in os.listdir(luns) if not f.startswith(".")] if luns.is_dir() else []


def driver_scenario(plugin: Plugin, pool: Path, *, tag: str, n: int, size: int, extents: int,
                    clients: int) -> tuple[Result, Result]:
    params = {"layout": "single"} if extents == 1 else {
        "layout": "concat", "maxExtentSize": f"{size // extents // MiB}Mi"}
    names = [f"bench-{tag}-{uuid.uuid4().hex[:6]}-{i}" for i in range(n)]
    ids: list[str] = [""] * n
    cap = mount_cap()

    def create(i: int) -> None:
        resp = plugin.controller.CreateVolume(pb.CreateVolumeRequest(
            name=names[i], capacity_range=pb.CapacityRange(required_bytes=size),
            volume_capabilities=[cap], parameters=params), timeout=120)
        if resp.volume.capacity_bytes < size:
            raise SystemExit(f"{names[i]}: got {resp.volume.capacity_bytes} bytes, asked {size}")
        ids[i] = resp.volume.volume_id

    def delete(i: int) -> None:
        plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=ids[i]), timeout=120)

    try:
        lat, wall = run_clients(n, clients, create)
        made = len(lun_files(pool))
        if made != n * extents:
            raise SystemExit(f"{tag}: expected {n * extents} LUN files after create, found {made}")
        c = Result(tag, "create", clients, extents, lat, wall)
        lat, wall = run_clients(n, clients, delete)
        d = Result(tag, "delete", clients, extents, lat, wall)
    finally:
        for vid in ids:  # whatever a failure left behind
            if vid:
                with contextlib.suppress(grpc.RpcError):
                    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=120)
    left = lun_files(pool)
    if left:
        raise SystemExit(f"{tag}: {len(left)} LUN files left after delete: {left[:3]}")
    plugin.check_alive()
    return c, d


def probe_scenario(plugin: Plugin, *, n: int, clients: int) -> Result:
    lat, wall = run_clients(n, clients, lambda _i: plugin.identity.Probe(pb.ProbeRequest(), timeout=30))
    return Result("Probe", "probe", clients, 0, lat, wall)


# ---- the raw baseline ------------------------------------------------------------------------

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_scenario(root: Path, *, n: int, size: int, extents: int, clients: int) -> tuple[Result, Result]:
    """What the file pool does per LUN, minus the driver: no lock, no scan, no store, no gRPC."""
    luns = root / "raw" / "luns"
    luns.mkdir(parents=True)
    piece = size // extents
    tag = uuid.uuid4().hex[:6]

    def create(i: int) -> None:
        for e in range(extents):
            final = luns / f"v{tag}-{i}-{e}.img"
            tmp = luns / f".tmp-v{tag}-{i}-{e}"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, piece)
                os.setxattr(fd, XATTR, b"provisioned")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, final)
            os.unlink(tmp)
            fsync_dir(luns)

    def delete(i: int) -> None:
        for e in range(extents):
            os.unlink(luns / f"v{tag}-{i}-{e}.img")
            fsync_dir(luns)

    try:
        lat, wall = run_clients(n, clients, create)
        c = Result("raw fs", "create", clients, extents, lat, wall)
        lat, wall = run_clients(n, clients, delete)
        d = Result("raw fs", "delete", clients, extents, lat, wall)
    finally:
        shutil.rmtree(root / "raw", ignore_errors=True)
    return c, d


# ---- filesystems and facts -------------------------------------------------------------------

@contextlib.contextmanager
def pool_filesystem(kind: str, work: Path, need: int) -> Iterator[tuple[Path, str]]:
    """Yield (directory for pools, description)."""
    if kind == "disk":
        free = shutil.disk_usage(work).free
        if free < need:
            raise SystemExit(f"{work}: {free // GiB} GiB free, the pool needs {need // GiB} GiB to reserve")
        yield work / "pools", f"plain directory, {describe_fs(work)}"
        return
    if os.geteuid() != 0:
        raise SystemExit("--fs xfs needs root (loop device, mount); use --fs disk")
    image, mnt = work / "xfs.img", work / "mnt"
    mnt.mkdir()
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: image.unlink(missing_ok=True))
        with open(image, "wb") as f:
            f.truncate(need + 2 * GiB)
        sh("mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image))
        dev = sh("losetup", "--find", "--show", str(image))
        stack.callback(lambda: subprocess.run(["losetup", "-d", dev], check=False))
        sh("mount", "-t", "xfs", dev, str(mnt))
        stack.callback(lambda: subprocess.run(["umount", str(mnt)], check=False))
        yield mnt, (f"XFS reflink=1 on {dev} over a sparse {(need + 2 * GiB) // GiB} GiB image "
                    f"on {describe_fs(work)}")


def facts(pool_desc: str, state_dir: Path, args: argparse.Namespace, n: int) -> list[str]:
    return machine_facts() + [
        f"- pool filesystem: {pool_desc}",
        f"- plugin state (sqlite, WAL, synchronous=FULL): {describe_fs(state_dir)}",
        f"- per scenario: {n} volumes of {args.size_mib} MiB (sparse), created then deleted; "
        f"clients share one gRPC channel{' (--quick)' if args.quick else ''}",
    ]


# ---- report -----------------------------------------------------------------------------------

def slowest(k: int) -> str:
    if k == 1:
        return "the slowest"
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(k % 10 if k % 100 not in (11, 12, 13) else 0, "th")
    return f"the {k}{suffix} slowest"


def table(results: Sequence[Result]) -> list[str]:
    raw = {(r.op, r.clients, r.extents): r for r in results if r.name == "raw fs"}
    probe = {r.clients: r for r in results if r.name == "Probe"}
    out = ["| what | op | extents | clients | calls | p50 ms | p99 ms | mean ms | ops/s "
           "| p50 first→last 10% ms | p50 × raw fs | p50 × Probe |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        driver = r.name not in ("raw fs", "Probe")
        base = raw.get((r.op, r.clients, r.extents)) if driver else None
        pr = probe.get(r.clients) if driver else None
        xr = f"{r.p50 / base.p50:.0f}×" if base else "–"
        xp = f"{r.p50 / pr.p50:.0f}×" if pr else "–"
        first, last = r.drift()
        out.append(f"| {r.name} | {r.op} | {r.extents or '–'} | {r.clients} | {len(r.latencies)} "
                   f"| {r.p50 * 1e3:.2f} | {r.p99 * 1e3:.2f} | {r.mean * 1e3:.2f} | {r.ops:.0f} "
                   f"| {first * 1e3:.1f}→{last * 1e3:.1f} | {xr} | {xp} |")
    return out


def main() -> int:
    ap = arg_parser(__doc__, quick_help="50 volumes per scenario, fewer probes",
                    dir_help="work directory parent (a real disk)")
    ap.add_argument("--volumes", type=int, default=0, help="volumes per scenario (default 200, 50 quick)")
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--extents", type=int, default=4, help="extents of the concat variant")
    ap.add_argument("--clients", default="1,16", help="comma-separated concurrency levels")
    ap.add_argument("--fs", choices=("xfs", "disk"), default="xfs",
                    help="pool on XFS over a loop device (default) or a plain directory on --dir")
    args = ap.parse_args()
    n = args.volumes or (50 if args.quick else 200)
    probes = 500 if args.quick else 2000
    size = args.size_mib * MiB
    if size % (args.extents * MiB):
        raise SystemExit(f"--size-mib must be a multiple of {args.extents} (extents are whole MiB)")
    levels = [int(c) for c in args.clients.split(",")]
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="csi-virtvol-bench-", dir=args.dir))
    results: list[Result] = []
    try:
        with pool_filesystem(args.fs, work, n * size) as (fsdir, fs_desc):
            pool = fsdir / "pools" / POOL
            plugin = Plugin(work=work, arrays={POOL: pool}, labels={"bench": "yes"},
                            sock_prefix="virtvol-bench")
            try:
                for _ in range(50):
                    plugin.identity.Probe(pb.ProbeRequest())
                for ext in (1, args.extents):
                    driver_scenario(plugin, pool, tag="warmup", n=3, size=size, extents=ext, clients=1)
                for c in levels:
                    results.append(probe_scenario(plugin, n=probes, clients=c))
                for ext in (1, args.extents):
                    for c in levels:
                        cr, dr = raw_scenario(fsdir, n=n, size=size, extents=ext, clients=c)
                        cd, dd = driver_scenario(plugin, pool, tag=f"e{ext}c{c}", n=n, size=size,
                                                 extents=ext, clients=c)
                        results += [cd, cr, dd, dr]
                # the pool and the server's own state are both empty again
                listed = plugin.controller.ListVolumes(pb.ListVolumesRequest()).entries
                if listed:
                    raise SystemExit(f"{len(listed)} volumes still listed after the run")
            finally:
                plugin.close()
            lines = facts(fs_desc, work, args, n)
        for r in results:
            r.name = "csi-virtvol" if r.name not in ("raw fs", "Probe") else r.name
        probes_first = [r for r in results if r.name == "Probe"]
        rest = [r for r in results if r.name != "Probe"]
        print(f"# csi-virtvol CreateVolume/DeleteVolume latency\n")
        print("\n".join(lines))
        print()
        print("\n".join(table(probes_first + rest)))
        print(f"""
- csi-virtvol: the plugin subprocess over gRPC; extents 1 = layout=single, {args.extents} = layout=concat
  with maxExtentSize={args.size_mib // args.extents}Mi; all LUNs in one file pool.
- raw fs: the file pool's filesystem work without the driver, from threads in the benchmark
  process, same filesystem: per LUN open(O_EXCL)+ftruncate+setxattr+fsync+link+unlink temp
  +fsync dir (create), unlink+fsync dir (delete); no lock, no state store, no gRPC.
- Probe: an empty Identity.Probe round trip to the same plugin over the same channel.
- × columns: driver p50 / baseline p50 at the same clients (and extents, for raw fs).
- p99 is nearest-rank: of {n} calls, {slowest(n - math.ceil(0.99 * n) + 1)}.
- first→last 10%: p50 of the first and the last tenth of the calls in issue order; the pool
  holds 0→{n} volumes while creating and {n}→0 while deleting, so growth here is cost per
  volume already in the pool.""")
        print(f"\nruntime {time.monotonic() - t_start:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
