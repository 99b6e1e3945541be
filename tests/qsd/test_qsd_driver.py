"""The qsd driver against real qemu-storage-daemons: what only this driver does.

The ArrayDriver contract (lifecycle, capacity, resize, wipe, discovery,
internal copy) runs in tests/contract with the "qsd-xfs" factory; here: the
QMP probe, the NBD exports seen from outside (nbdinfo, qemu-img), the backup
copy as a point-in-time copy, restart of the daemon, and remote copy from one
daemon into another's export.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_virtvol import errors
from csi_virtvol.backends import registry
from csi_virtvol.backends.base import CopyProgress, DirtyTrackingCapable, RemoteCopyCapable
from csi_virtvol.backends.qmp import qmp_session
from csi_virtvol.backends.qsd import QsdDriver, parse_nbd_uri
from csi_virtvol.model.array import Ability, ArraySpec
from csi_virtvol.model.ids import ArrayId, LunId
from blockio import write_at
from qsdarrays import spec_for

MiB = 2**20


def read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def nbd_read(uri: str, out: Path) -> bytes:
    """The export's bytes as qemu-img, a client other than the driver, reads them."""
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)], check=True,
                   capture_output=True)
    return out.read_bytes()


def qmp_path(d: QsdDriver) -> str:
    return os.path.join(d.spec.params["pool"], "qmp.sock")


def test_probe_identity_and_effective_abilities(daemons: list[QsdDriver]) -> None:
    a = daemons[0]
    info = a.describe()
    version = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True,
                             check=True).stdout.split()[2]
    assert (info.identity.vendor, info.identity.model) == ("QEMU", "qsd")
    assert version.startswith(info.identity.version)
    assert info.probed == (Ability.GROW_LUN | Ability.INTERNAL_COPY | Ability.REMOTE_COPY
                           | Ability.DIRTY_TRACKING)
    # through the registry (a second driver on the same running daemon): all of it effective
    driver, eff = registry.open_array(a.spec)
    assert isinstance(driver, QsdDriver)
    assert eff.abilities == info.probed
    # an admin override switches remote copy off
    off = ArraySpec(id=a.spec.id, kind="qsd", params=a.spec.params, ability_overrides={"remote-copy": False})
    assert Ability.REMOTE_COPY not in registry.open_array(off)[1].abilities


def test_lun_is_an_nbd_export_other_clients_can_use(daemons: list[QsdDriver], tmp_path: Path) -> None:
    a = daemons[0]
    lun = a.create_lun(name="exp", size=8 * MiB)
    server, export = parse_nbd_uri(lun.address)
    assert export == "exp" and server.unix.endswith("nbd.sock")
    size = subprocess.run(["nbdinfo", "--size", lun.address], capture_output=True, text=True, check=True)
    assert int(size.stdout) == 8 * MiB
    # written by qemu-io over NBD, read through the driver's host path
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", lun.address], check=True,
                   capture_output=True)
    data = read_all(a.open_path(lun_id=lun.id))
    assert data[MiB:MiB + 65536] == b"\x5a" * 65536
    assert data[:MiB] == bytes(MiB)
    # written through the host path, read by qemu-img over NBD
    write_at(a.open_path(lun_id=lun.id), 7 * MiB, b"tail" * 1024)
    assert nbd_read(lun.address, tmp_path / "out.raw")[7 * MiB:7 * MiB + 4096] == b"tail" * 1024
    # the image on disk is qcow2, thin
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json",
                           os.path.join(a.spec.params["pool"], "luns", "exp.img")],
                          capture_output=True, text=True, check=True).stdout
    assert '"format": "qcow2"' in info and '"virtual-size": 8388608' in info


def test_backup_copy_is_an_independent_copy_at_the_cut(daemons: list[QsdDriver]) -> None:
    a = daemons[0]
    src = a.create_lun(name="src", size=32 * MiB)
    path = a.open_path(lun_id=src.id)
    write_at(path, 0, os.urandom(32 * MiB))
    at_cut = read_all(path)
    copy = a.copy_lun_internal(source=src.id, name="snap")
    write_at(path, 0, b"\xee" * MiB)
    assert read_all(a.open_path(lun_id=copy.id)) == at_cut
    with qmp_session(qmp_path(a)) as qmp:
        assert qmp.execute("query-jobs") == []  # the job was dismissed
    assert not [n for n in os.listdir(os.path.join(a.spec.params["pool"], "luns")) if n.startswith(".tmp-")]
    info = subprocess.run(["qemu-img", "info", "-U", os.path.join(a.spec.params["pool"], "luns", "snap.img")],
                          capture_output=True, text=True, check=True).stdout
    assert "backing file" not in info  # a full copy, not an overlay of the source


def test_backup_copy_is_one_instant_while_a_writer_runs(daemons: list[QsdDriver]) -> None:
    """The writer stamps generation g first at the head, then at the tail of the
    LUN; at any instant tail is g or g-1 when head is g.  The backup copies
    head first, so a copy that is not point-in-time shows a tail newer than its head."""
    a = daemons[0]
    size = 64 * MiB
    src = a.create_lun(name="src", size=size)
    path = a.open_path(lun_id=src.id)
    write_at(path, MiB, os.urandom(size - 2 * MiB))  # data to copy between head and tail
    gen = 0
    stop = threading.Event()

    def writer() -> None:
        nonlocal gen
        fd = os.open(path, os.O_WRONLY)
        try:
            while not stop.is_set():
                gen += 1
                stamp = gen.to_bytes(8, "big") * 512
                os.pwrite(fd, stamp, 0)
                os.fsync(fd)
                os.pwrite(fd, stamp, size - 4096)
                os.fsync(fd)
        finally:
            os.close(fd)

    t = threading.Thread(target=writer)
    t.start()
    try:
        while gen < 3:
            time.sleep(0.005)
        copy = a.copy_lun_internal(source=src.id, name="snap")
        at_end = gen
    finally:
        stop.set()
        t.join()
    data = read_all(a.open_path(lun_id=copy.id))
    head = int.from_bytes(data[:8], "big")
    tail = int.from_bytes(data[size - 4096:size - 4088], "big")
    assert data[:4096] == head.to_bytes(8, "big") * 512
    assert 1 <= head <= at_end
    assert head - tail in (0, 1), (head, tail)


def test_luns_survive_a_daemon_restart(tmp_path: Path) -> None:
    spec = spec_for(tmp_path / "qr", "qr")
    d = QsdDriver(spec)
    try:
        lun = d.create_lun(name="keep", size=4 * MiB)
        write_at(d.open_path(lun_id=lun.id), 4096, b"persist")
    finally:
        d.shutdown()
    with pytest.raises(errors.BackendUnavailable):
        QsdDriver(ArraySpec(id=spec.id, kind="qsd", params={"pool": spec.params["pool"]}))  # no start
    d2 = QsdDriver(spec)  # starts a new daemon; the image is attached when first used
    try:
        assert d2.get_lun(lun_id=LunId("keep")) == lun
        assert read_all(d2.open_path(lun_id=lun.id))[4096:4096 + 7] == b"persist"
        grown = d2.resize_lun(lun_id=lun.id, size=6 * MiB)
        assert grown.size == 6 * MiB
        assert os.path.getsize(d2.open_path(lun_id=lun.id)) == 6 * MiB
    finally:
        d2.shutdown()


def test_daemon_on_tcp(tmp_path: Path) -> None:
    port = 20000 + uuid.uuid4().int % 20000
    d = QsdDriver(spec_for(tmp_path / "qt", "qt", nbd=f"127.0.0.1:{port}"))
    try:
        lun = d.create_lun(name="tcp", size=MiB)
        assert lun.address == f"nbd://127.0.0.1:{port}/tcp"
        size = subprocess.run(["nbdinfo", "--size", lun.address], capture_output=True, text=True, check=True)
        assert int(size.stdout) == MiB
        write_at(d.open_path(lun_id=lun.id), 0, b"over tcp")
        assert read_all(d.open_path(lun_id=lun.id))[:8] == b"over tcp"
    finally:
        d.shutdown()


def wait_done(d: RemoteCopyCapable, job: str) -> CopyProgress:
    deadline = time.monotonic() + 60
    while True:
        p = d.remote_copy_progress(job=job)
        if p.done or time.monotonic() > deadline:
            return p
        time.sleep(0.02)


def test_remote_copy_pushes_a_lun_into_another_daemon(daemons: list[QsdDriver], tmp_path: Path) -> None:
    a, b = daemons
    assert isinstance(a, RemoteCopyCapable)
    assert a.can_reach(target=b.describe())
    assert not a.can_reach(target=a.describe())
    src = a.create_lun(name="src", size=16 * MiB)
    write_at(a.open_path(lun_id=src.id), 0, os.urandom(16 * MiB))
    at_cut = read_all(a.open_path(lun_id=src.id))
    dst = b.create_lun(name="dst", size=16 * MiB)

    a.start_remote_copy(source=src.id, target_address=dst.address, job="push-1")
    a.start_remote_copy(source=src.id, target_address=dst.address, job="push-1")  # idempotent
    done = wait_done(a, "push-1")
    assert done.done and not done.error
    assert done.bytes_total == done.bytes_done == 16 * MiB
    assert a.remote_copy_progress(job="push-1") == done  # remembered after the job is gone
    assert read_all(b.open_path(lun_id=dst.id)) == at_cut
    assert nbd_read(dst.address, tmp_path / "dst.raw") == at_cut
    with qmp_session(qmp_path(a)) as qmp:
        assert qmp.execute("query-jobs") == []
        nodes = {n["drv"] for n in qmp.execute("query-named-block-nodes", {"flat": True})}
    assert "nbd" not in nodes  # the target node was removed with the job
    a.cancel_remote_copy(job="push-1")  # finished: nothing to cancel
    with pytest.raises(errors.NotFound):
        a.remote_copy_progress(job="push-1")


def test_remote_copy_failures_are_reported(daemons: list[QsdDriver], tmp_path: Path) -> None:
    a, b = daemons
    src = a.create_lun(name="src", size=4 * MiB)
    # nobody listens there: refused at start, nothing left behind
    with pytest.raises(errors.BackendError):
        a.start_remote_copy(source=src.id, target_address=f"nbd+unix:///x?socket={tmp_path}/none.sock",
                            job="bad")
    with pytest.raises(errors.NotFound):
        a.remote_copy_progress(job="bad")
    with pytest.raises(errors.InvalidRequest):
        a.start_remote_copy(source=src.id, target_address="http://example.com/x", job="bad")
    with pytest.raises(errors.NotFound):
        a.start_remote_copy(source=LunId("ghost"), target_address=src.address, job="bad")
    # a target of another size: the daemon refuses the backup
    small = b.create_lun(name="small", size=2 * MiB)
    with pytest.raises(errors.BackendError):
        a.start_remote_copy(source=src.id, target_address=small.address, job="bad")
    with qmp_session(qmp_path(a)) as qmp:
        assert qmp.execute("query-jobs") == []
        assert "nbd" not in {n["drv"] for n in qmp.execute("query-named-block-nodes", {"flat": True})}


def test_cancel_stops_a_running_remote_copy(daemons: list[QsdDriver]) -> None:
    a, b = daemons
    size = 256 * MiB
    src = a.create_lun(name="big", size=size)
    write_at(a.open_path(lun_id=src.id), 0, os.urandom(4 * MiB))
    dst = b.create_lun(name="big", size=size)
    a.start_remote_copy(source=src.id, target_address=dst.address, job="c1")
    a.cancel_remote_copy(job="c1")
    with pytest.raises(errors.NotFound):
        a.remote_copy_progress(job="c1")
    with qmp_session(qmp_path(a)) as qmp:
        assert qmp.execute("query-jobs") == []
    # the source is free again: it can be deleted and the daemon keeps serving
    a.delete_lun(lun_id=src.id)
    assert a.list_luns() == []


KiB = 1024
GRAIN = 64 * KiB  # the driver's bitmap granularity


def test_dirty_tracking_lists_exactly_the_written_regions(daemons: list[QsdDriver]) -> None:
    a = daemons[0]
    assert isinstance(a, DirtyTrackingCapable)
    lun = a.create_lun(name="trk", size=16 * MiB)
    path = a.open_path(lun_id=lun.id)
    write_at(path, 0, os.urandom(MiB))  # before tracking: not listed
    a.start_tracking(lun_id=lun.id, name="s1")
    a.start_tracking(lun_id=lun.id, name="s1")  # idempotent
    assert list(a.changed_ranges(lun_id=lun.id, name="s1")) == []
    write_at(path, MiB + 4096, b"x" * 4096)                 # inside one grain
    write_at(path, 5 * MiB + 60 * KiB, b"y" * 8 * KiB)      # straddles two grains
    write_at(path, 8 * MiB, os.urandom(3 * GRAIN))          # three grains
    expected = [(MiB, GRAIN), (5 * MiB, 2 * GRAIN), (8 * MiB, 3 * GRAIN)]
    assert list(a.changed_ranges(lun_id=lun.id, name="s1")) == expected
    assert list(a.changed_ranges(lun_id=lun.id, name="s1")) == expected  # reading does not reset
    # a second tracker started later sees only what came after it
    a.start_tracking(lun_id=lun.id, name="s2")
    write_at(path, 15 * MiB, b"z")
    assert list(a.changed_ranges(lun_id=lun.id, name="s2")) == [(15 * MiB, GRAIN)]
    assert list(a.changed_ranges(lun_id=lun.id, name="s1")) == expected + [(15 * MiB, GRAIN)]
    with qmp_session(qmp_path(a)) as qmp:
        exports = qmp.execute("query-block-exports")
    assert len(exports) == 1  # the map's read-only export is gone; the LUN's own stays

    a.stop_tracking(lun_id=lun.id, name="s2")
    a.stop_tracking(lun_id=lun.id, name="s2")  # gone: no error
    with pytest.raises(errors.NotFound):
        list(a.changed_ranges(lun_id=lun.id, name="s2"))
    with pytest.raises(errors.NotFound):
        a.start_tracking(lun_id=LunId("ghost"), name="s1")


def test_tracking_survives_a_daemon_restart(tmp_path: Path) -> None:
    spec = spec_for(tmp_path / "qd", "qd")
    d = QsdDriver(spec)
    try:
        lun = d.create_lun(name="p", size=4 * MiB)
        d.start_tracking(lun_id=lun.id, name="keep")
        write_at(d.open_path(lun_id=lun.id), 2 * MiB, b"changed")
    finally:
        d.shutdown()
    d2 = QsdDriver(spec)
    try:
        assert list(d2.changed_ranges(lun_id=lun.id, name="keep")) == [(2 * MiB, GRAIN)]
    finally:
        d2.shutdown()


def test_differential_resync_moves_only_the_changed_grains(daemons: list[QsdDriver], tmp_path: Path) -> None:
    a, b = daemons
    size = 32 * MiB
    src = a.create_lun(name="src", size=size)
    spath = a.open_path(lun_id=src.id)
    write_at(spath, 0, os.urandom(size))
    dst = b.create_lun(name="dst", size=size)
    a.start_tracking(lun_id=src.id, name="pair")
    a.start_remote_copy(source=src.id, target_address=dst.address, job="full")
    full = wait_done(a, "full")
    assert full.done and not full.error and full.bytes_total == size

    # N grains change (one of them twice): the resync moves N grains, no more
    for off in (0, 3 * MiB, 3 * MiB + 100, 17 * MiB + GRAIN, 31 * MiB):
        write_at(spath, off, os.urandom(512))
    a.start_remote_copy(source=src.id, target_address=dst.address, job="resync-1", since="pair")
    inc = wait_done(a, "resync-1")
    assert inc.done and not inc.error
    assert inc.bytes_total == inc.bytes_done == 4 * GRAIN
    assert read_all(b.open_path(lun_id=dst.id)) == read_all(spath)
    # the bitmap was cleared by the successful resync: the next one moves only newer writes
    assert list(a.changed_ranges(lun_id=src.id, name="pair")) == []
    write_at(spath, 9 * MiB, os.urandom(2 * GRAIN))
    a.start_remote_copy(source=src.id, target_address=dst.address, job="resync-2", since="pair")
    assert wait_done(a, "resync-2").bytes_total == 2 * GRAIN
    assert nbd_read(dst.address, tmp_path / "dst.raw") == read_all(spath)
    with pytest.raises(errors.NotFound):
        a.start_remote_copy(source=src.id, target_address=dst.address, job="r3", since="nope")


def test_driver_uses_a_daemon_it_did_not_start(tmp_path: Path) -> None:
    """A daemon started elsewhere with only a QMP monitor: the driver starts its NBD server."""
    pool = tmp_path / "ext"
    pool.mkdir()
    qmp, nbd = pool / "m.sock", pool / "n.sock"
    subprocess.run(["qemu-storage-daemon", "--chardev", f"socket,id=m,path={qmp},server=on,wait=off",
                    "--monitor", "chardev=m", "--pidfile", str(pool / "qsd.pid"), "--daemonize"],
                   check=True, capture_output=True)
    d = QsdDriver(ArraySpec(id=ArrayId("ext"), kind="qsd",
                            params={"pool": str(pool), "qmp": str(qmp), "nbd": f"unix:{nbd}"}))
    try:
        lun = d.create_lun(name="e", size=MiB)
        assert lun.address == f"nbd+unix:///e?socket={nbd}"
        write_at(d.open_path(lun_id=lun.id), 0, b"external")
        assert nbd_read(lun.address, tmp_path / "e.raw")[:8] == b"external"
        d.delete_lun(lun_id=lun.id)
        assert sorted(os.listdir(pool / "mnt")) == []
    finally:
        d.shutdown()
    with pytest.raises(errors.BackendUnavailable):
        QsdDriver(ArraySpec(id=ArrayId("ext"), kind="qsd", params={"pool": str(pool), "qmp": str(qmp)}))


def test_host_copy_engine_reads_and_writes_qsd_luns(daemons: list[QsdDriver], tmp_path: Path) -> None:
    """Host copy (the fallback between arrays without remote copy) works on the
    nbdfuse paths: qsd -> plain file -> other qsd, at offsets, verified."""
    from csi_virtvol.copy.engine import CopyOptions, copy_range

    a, b = daemons
    src = a.create_lun(name="h", size=12 * MiB)
    spath = a.open_path(lun_id=src.id)
    write_at(spath, 0, os.urandom(3 * MiB))
    write_at(spath, 8 * MiB, os.urandom(MiB))  # a zero gap in between
    want = read_all(spath)
    mid = tmp_path / "mid.img"
    r1 = copy_range(src=spath, dst=str(mid), options=CopyOptions(verify=True))
    assert r1.verified and mid.read_bytes() == want
    dst = b.create_lun(name="h", size=16 * MiB)
    dpath = b.open_path(lun_id=dst.id)
    write_at(dpath, 9 * MiB, b"\xff" * MiB)  # stale data where the source's zero gap lands
    r2 = copy_range(src=str(mid), dst=dpath, dst_offset=4 * MiB, options=CopyOptions(verify=True))
    assert r2.verified
    got = nbd_read(dst.address, tmp_path / "dst.raw")
    assert got[4 * MiB:16 * MiB] == want and got[:4 * MiB] == bytes(4 * MiB)


def test_a_raw_image_found_in_the_pool_is_a_usable_lun(daemons: list[QsdDriver], tmp_path: Path) -> None:
    a = daemons[0]
    raw = Path(a.spec.params["pool"]) / "luns" / "old.img"
    raw.write_bytes(b"legacy" + bytes(2 * MiB - 6))
    lun = a.get_lun(lun_id=LunId("old"))
    assert lun is not None and lun.size == 2 * MiB
    assert read_all(a.open_path(lun_id=lun.id))[:6] == b"legacy"
    assert nbd_read(lun.address, tmp_path / "o.raw")[:6] == b"legacy"
    a.start_tracking(lun_id=lun.id, name="t")  # a raw image keeps the bitmap in memory only
    write_at(a.open_path(lun_id=lun.id), MiB, b"new")
    assert list(a.changed_ranges(lun_id=lun.id, name="t")) == [(MiB, GRAIN)]
    grown = a.resize_lun(lun_id=lun.id, size=3 * MiB)
    assert grown.size == 3 * MiB == raw.stat().st_size
    copy = a.copy_lun_internal(source=lun.id, name="old-copy")
    assert read_all(a.open_path(lun_id=copy.id)) == raw.read_bytes()
    a.wipe_lun(lun_id=lun.id)
    assert read_all(a.open_path(lun_id=lun.id)) == bytes(3 * MiB)
    with open(Path(a.spec.params["pool"]) / "luns" / "old-copy.img", "rb") as f:
        assert f.read(4) == b"QFI\xfb"  # copies are qcow2 whatever the source


def test_internal_copy_cost_is_a_whole_new_lun_and_agrees_with_the_copy(tmp_path: Path) -> None:
    """Issue 12: the planner asks before it clones.  A qsd backup copy is a full new LUN,
    so under a capacity cap it fits only while the cap has the source's size left."""
    a = QsdDriver(spec_for(tmp_path / "qc", "qc", capacity=str(48 * MiB)))
    try:
        src = a.create_lun(name="src", size=32 * MiB)
        cost = a.internal_copy_cost(source=src.id)
        assert cost.needs == 32 * MiB and cost.room == 16 * MiB and not cost.fits
        with pytest.raises(errors.CapacityExceeded):
            a.copy_lun_internal(source=src.id, name="snap")
        small = a.create_lun(name="small", size=8 * MiB)
        cost = a.internal_copy_cost(source=small.id)
        assert cost.fits and cost.needs == 8 * MiB == cost.takes
        before = a.describe().capacity_free
        a.copy_lun_internal(source=small.id, name="small-copy")
        assert before - a.describe().capacity_free == cost.takes
        with pytest.raises(errors.NotFound):
            a.internal_copy_cost(source=LunId("missing"))
    finally:
        a.shutdown()
