#!/usr/bin/env python3
"""The control plane at 10,000 volumes: listing, CreateVolume latency and RSS, SQLite and CRD store.

    .venv/bin/python bench/bench_scale.py [--records 10000] [--small 10] [--creates 30]
                                          [--stores sqlite,crd] [--dir /var/tmp]

For each store and each population (``--small`` and ``--records`` volumes, plus as many
snapshots): the store is seeded straight through the StateStore API (volume, snapshot and
LUN records; no LUN files, as the issue allows), then a real plugin (``csi-virtvol serve
--mode controller``) starts on it with one file pool in a plain directory on ``--dir``.
Measured over gRPC from this process:

* a full paginated ListVolumes and ListSnapshots (max_entries 500), wall time;
* CreateVolume p50/p99 of ``--creates`` 16 MiB volumes, one client (then deleted);
* the plugin's VmRSS after all that (/proc/PID/status).

The CRD store runs against the fake API server of tests/kube/fakeapi.py, started in this
process (so the API server's own CPU shares this process, not the plugin's), with the
store's watch-fed cache.  The baseline in the same run is the small population:
"latency the same at 10 and 10,000" is the ratio of the two.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH), str(ROOT / "tests" / "kube")]

import grpc  # noqa: E402
import yaml  # noqa: E402

from _common import machine_facts, mount_cap  # noqa: E402
from csi_virtvol.csi._gen import csi_pb2 as pb  # noqa: E402
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc  # noqa: E402
from csi_virtvol.model.array import Lun, LunOrigin, LunState  # noqa: E402
from csi_virtvol.model.ids import ArrayId, LunId, VolumeId  # noqa: E402
from csi_virtvol.model.volume import (CopyRole, Extent, VirtualVolume, VolumeKind,  # noqa: E402
                                      VolumeState, volume_address)
from csi_virtvol.services.volumes import volume_id_for  # noqa: E402
from csi_virtvol.store.base import LUNS, VOLUMES, Put, StateStore  # noqa: E402

MiB = 1 << 20
POOL = "bench"


def records(n: int, pool: Path) -> Iterator[object]:
    for i in range(n):
        for kind in (VolumeKind.VOLUME, VolumeKind.SNAPSHOT):
            name = f"seed-{kind.value}-{i}"
            vid = volume_id_for(name, kind)
            lun = LunId(f"{vid}-0")
            yield Lun(array=ArrayId(POOL), id=lun, size=16 * MiB, address=str(pool / "luns" / f"{lun}.img"),
                      state=LunState.IN_USE, origin=LunOrigin.PROVISIONED, volume=vid)
            yield VirtualVolume(
                id=vid, name=name, size=16 * MiB, kind=kind, state=VolumeState.AVAILABLE,
                extents=(Extent(array=ArrayId(POOL), lun=lun, offset=0, length=16 * MiB),),
                address=volume_address(vid), parameters={"layout": "single"},
                source_volume=VolumeId(volume_id_for(f"seed-volume-{i}")) if kind is VolumeKind.SNAPSHOT else "",
                role=CopyRole.NONE, created_at=time.time())


def seed_sqlite(path: Path, n: int, pool: Path) -> None:
    from csi_virtvol.store.sqlite import SqliteStore
    path.parent.mkdir(parents=True, exist_ok=True)
    with SqliteStore(str(path)) as s:
        batch: list[Put[object]] = []
        for rec in records(n, pool):
            batch.append(Put(table=LUNS if isinstance(rec, Lun) else VOLUMES, record=rec))  # type: ignore[arg-type]
            if len(batch) >= 1000:
                s.apply(batch)
                batch = []
        s.apply(batch)


def seed_crd(api: object, n: int, pool: Path) -> None:
    """Straight into the fake server's objects, as the CRD store would have written them."""
    from csi_virtvol.kube.crdstore import CrdStore, api_client
    store = CrdStore(api_client(host=api.url), cache=False)  # type: ignore[attr-defined]
    try:
        from csi_virtvol.kube import crdstore as C
        for rec in records(n, pool):
            table = LUNS if isinstance(rec, Lun) else VOLUMES
            body, status = store._build(table, C.KINDS[table.name], rec, None)
            body["status"] = dict(status, observedGeneration=1)
            api.put(C.GROUP, C.KINDS[table.name].plural, body)  # type: ignore[attr-defined]
    finally:
        store.close()


@contextlib.contextmanager
def plugin(work: Path, store: str, kube: str, pool: Path) -> Iterator[tuple[subprocess.Popen[bytes], rpc.ControllerStub]]:
    sock = f"/tmp/virtvol-scale-{uuid.uuid4().hex[:8]}.sock"
    cfg = work / "config.yaml"
    doc: dict[str, object] = {"arrays": [{"id": POOL, "kind": "file", "params": {"path": str(pool)}}]}
    if store == "crd":
        doc.update(store="crd", kubeApi=kube, namespace="csi-virtvol", copyImage="x")
    cfg.write_text(yaml.safe_dump(doc))
    log = open(work / "server.log", "ab")
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "csi-virtvol"), "serve", "--endpoint", f"unix://{sock}",
                             "--data-dir", str(work / "data"), "--node-id", "scale", "--mode", "controller",
                             "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                grpc.channel_ready_future(channel).result(timeout=1)
                break
            except grpc.FutureTimeoutError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("plugin did not start:\n" + (work / "server.log").read_text()[-3000:])
        yield proc, rpc.ControllerStub(channel)
    finally:
        channel.close()
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        Path(sock).unlink(missing_ok=True)


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(stub: rpc.ControllerStub, proc: subprocess.Popen[bytes], creates: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for what, call, req in (("ListVolumes", stub.ListVolumes, pb.ListVolumesRequest),
                            ("ListSnapshots", stub.ListSnapshots, pb.ListSnapshotsRequest)):
        best = math.inf
        for _ in range(3):
            t, token, n = time.perf_counter(), "", 0
            while True:
                resp = call(req(max_entries=500, starting_token=token), timeout=300)
                n += len(resp.entries)
                token = resp.next_token
                if not token:
                    break
            best = min(best, time.perf_counter() - t)
        out[what] = best
        out[what + " n"] = n
    lat, ids = [], []
    for i in range(creates):
        t = time.perf_counter()
        r = stub.CreateVolume(pb.CreateVolumeRequest(
            name=f"scale-{uuid.uuid4().hex[:6]}-{i}", capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
            volume_capabilities=[mount_cap()], parameters={"layout": "single"}), timeout=60)
        lat.append(time.perf_counter() - t)
        ids.append(r.volume.volume_id)
    for vid in ids:
        stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)
    s = sorted(lat)
    out["create p50"] = statistics.median(lat)
    out["create p99"] = s[max(0, math.ceil(0.99 * len(s)) - 1)]
    out["rss"] = rss_mib(proc.pid)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=10)
    ap.add_argument("--creates", type=int, default=30)
    ap.add_argument("--stores", default="sqlite,crd")
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    rows = []
    t0 = time.monotonic()
    for store in args.stores.split(","):
        for n in (args.small, args.records):
            work = Path(tempfile.mkdtemp(prefix="csi-virtvol-scale-", dir=args.dir))
            pool = work / "pools" / POOL
            try:
                with contextlib.ExitStack() as stack:
                    kube = ""
                    ts = time.monotonic()
                    if store == "crd":
                        from fakeapi import FakeApiServer
                        api = stack.enter_context(FakeApiServer(crd_dir=ROOT / "charts" / "csi-virtvol" / "crds"))
                        seed_crd(api, n, pool)
                        kube = api.url
                    else:
                        seed_sqlite(work / "data" / "state.db", n, pool)
                    seeded = time.monotonic() - ts
                    # the fake API server's 40,000 objects and their history live in this process:
                    # keep them out of this process's garbage collector scans, which would
                    # otherwise stall the server (the plugin's own heap is left as it is)
                    gc.collect()
                    gc.freeze()
                    ts = time.monotonic()
                    proc, stub = stack.enter_context(plugin(work, store, kube, pool))
                    started = time.monotonic() - ts
                    m = measure(stub, proc, args.creates)
                    rows.append((store, n, seeded, started, m))
                    print(f"# {store} {n}: {m}", file=sys.stderr, flush=True)
            finally:
                gc.unfreeze()
                shutil.rmtree(work, ignore_errors=True)
    print("# csi-virtvol at scale\n")
    print("\n".join(machine_facts()))
    print(f"- store seeded directly (volume + snapshot + LUN record each); pool: plain directory on {args.dir}")
    print("- CRD: fake API server (tests/kube/fakeapi.py) in the benchmark process; store with its watch-fed cache\n")
    print("| store | volumes + snapshots | ListVolumes s (entries) | ListSnapshots s (entries) "
          "| CreateVolume p50 / p99 ms | p50 × small | controller RSS MiB | start s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    small = {r[0]: r[4]["create p50"] for r in rows if r[1] == args.small}
    for store, n, _seeded, started, m in rows:
        print(f"| {store} | {n} + {n} | {m['ListVolumes']:.3f} ({m['ListVolumes n']:.0f}) "
              f"| {m['ListSnapshots']:.3f} ({m['ListSnapshots n']:.0f}) "
              f"| {m['create p50'] * 1e3:.1f} / {m['create p99'] * 1e3:.1f} "
              f"| {m['create p50'] / small[store]:.2f} | {m['rss']:.0f} | {started:.1f} |")
    print(f"\nruntime {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
