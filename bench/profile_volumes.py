#!/usr/bin/env python3
"""Where the time of a CreateVolume and a DeleteVolume goes: cProfile of the services, in process.

    .venv/bin/python bench/profile_volumes.py [--store sqlite|crd] [--n 100] [--extents 1]
                                              [--dir /var/tmp] [--top 25]

Builds the controller's services (ArrayPool, VolumeService, SnapshotService) the way
``app.build_controller`` does, over one file pool in a plain directory on ``--dir`` (the
machine's disk, so fsyncs are real) and the chosen store: SQLite in ``--dir``, or the CRD
store against the fake API server of ``tests/kube/fakeapi.py`` started in this process
(cProfile profiles only the calling thread, so the fake server's own work shows up as
time spent waiting in socket reads).  Runs N creates then N deletes, each phase under
its own profile, and prints per-call wall time, fsync counts (from /proc/self/io is not
per-syscall, so counted by wrapping os.fsync for Python-level calls; SQLite's own fsyncs
are counted by strace when ``--strace`` is given) and the top functions by own and
cumulative time.  Everything it makes is removed on exit.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH), str(ROOT / "tests" / "kube")]

from csi_virtvol.config import Config  # noqa: E402
from csi_virtvol.model.array import ArraySpec  # noqa: E402
from csi_virtvol.model.capability import AccessMode, AccessType, Capability  # noqa: E402
from csi_virtvol.model.ids import ArrayId, NodeId  # noqa: E402
from csi_virtvol.services.locks import KeyedLocks  # noqa: E402
from csi_virtvol.services.volumes import CreateVolume  # noqa: E402
from csi_virtvol.store.base import StateStore  # noqa: E402

MiB = 1 << 20


@contextlib.contextmanager
def open_store(kind: str, work: Path) -> Iterator[tuple[StateStore, Any]]:
    if kind == "sqlite":
        from csi_virtvol.store.sqlite import SqliteStore
        s = SqliteStore(str(work / "state.db"))
        try:
            yield s, None
        finally:
            s.close()
        return
    from fakeapi import FakeApiServer

    from csi_virtvol.kube.crdstore import CrdStore, api_client
    with FakeApiServer(crd_dir=ROOT / "charts" / "csi-virtvol" / "crds") as api:
        c = CrdStore(api_client(host=api.url))
        try:
            yield c, api
        finally:
            c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("sqlite", "crd"), default="sqlite")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--extents", type=int, default=1)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    from csi_virtvol.app import build_controller

    work = Path(tempfile.mkdtemp(prefix="csi-virtvol-prof-", dir=args.dir))
    fsyncs = [0]
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        fsyncs[0] += 1
        real_fsync(fd)

    os.fsync = counting_fsync  # type: ignore[assignment]
    try:
        pool = work / "pool"
        cfg = Config(endpoint="unix:///dev/null", data_dir=str(work / "data"), node_id=NodeId("prof"),
                     store=args.store,
                     arrays=(ArraySpec(id=ArrayId("p"), kind="file", params={"path": str(pool)}),))
        cap = Capability(access_type=AccessType.MOUNT, access_mode=AccessMode.SINGLE_NODE_WRITER, fs_type="ext4")
        params = {"layout": "single"} if args.extents == 1 else {
            "layout": "concat", "maxExtentSize": f"{64 // args.extents}Mi"}
        with open_store(args.store, work) as (store, api):
            core = build_controller(cfg, store, KeyedLocks())
            ids = []
            for phase in ("create", "delete"):
                prof = cProfile.Profile()
                f0 = fsyncs[0]
                r0 = len(api.requests) if api is not None else 0
                t0 = time.perf_counter()
                prof.enable()
                for i in range(args.n):
                    if phase == "create":
                        ids.append(core.volumes.create(CreateVolume(
                            name=f"prof-{i}", required_bytes=64 * MiB, capabilities=(cap,),
                            parameters=params)).id)
                    else:
                        core.volumes.delete(ids[i])
                prof.disable()
                wall = time.perf_counter() - t0
                print(f"## {args.store} {phase}, {args.extents} extent(s): {args.n} calls, "
                      f"{wall / args.n * 1e3:.2f} ms/call wall, "
                      f"{(fsyncs[0] - f0) / args.n:.1f} Python-level fsyncs/call (pool files and dirs)"
                      + (f", {(len(api.requests) - r0) / args.n:.1f} API requests/call" if api is not None else "")
                      + "\n")
                for order in ("tottime", "cumulative"):
                    out = io.StringIO()
                    st = pstats.Stats(prof, stream=out)
                    st.sort_stats(order).print_stats(args.top)
                    text = out.getvalue()
                    print(f"### by {order}\n```\n{text[text.find('   ncalls'):].rstrip()}\n```\n")
            core.snapshots.close()
    finally:
        os.fsync = real_fsync  # type: ignore[assignment]
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
