"""Live cuts through the real plugin on device-mapper: the node cuts with dm-snapshot and
tracks with dm-era (node/dmcut.py), inside vmtest (this host has no device-mapper;
test_dmcut_vm.py boots the VM).  The same checks as tests/integration/test_live_cut.py
(the FUSE path), with its helpers: a writer fsyncs numbered records every few ms through
the snapshot; the snapshot succeeds, the writer's longest stall stays under STALL_MAX, the
restored image holds exactly a prefix of the acknowledged records.  Then a store that
fills up, and a resync from dm-era's tracking.

VIRTVOL_VM_REPORT names a file (in a --share directory) where the measured stalls and
holds are written for the launcher to print.
"""
from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.node import devices
from csi_virtvol.store import base as S
from csi_virtvol.store.sqlite import SqliteStore
from harness.plugin import NODE_ID, Plugin, block_cap, mount_cap, running_plugin, unique
from loopfs import loop_filesystem

from lvmvg import IN_VM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_live_cut import (  # noqa: E402  (helpers only: no test of that module is collected here)
    PERIOD, RECORD, STALL_MAX, Writer, _check_image, _create, _mono_offset, _pair, _restored_bytes, _snapshot,
    _stage, _unstage)

NOT_IN_VM = "needs device-mapper: runs inside vmtest (tests/vm/test_dmcut_vm.py starts it)"
pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.skipif(not IN_VM, reason=NOT_IN_VM)]

MiB = 1 << 20
GiB = 1 << 30
SIZE = int(os.environ.get("VIRTVOL_DMCUT_SIZE", str(GiB)))   # the 1 GiB
HELD = re.compile(r"cut (\S+) with the writes held ([\d.]+) ms")


WRITER = r"""
import os, signal, sys, time
path, create, period, size = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3]), int(sys.argv[4])
os.nice(-10)   # see ProcWriter
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
fd = os.open(path, os.O_WRONLY | (os.O_CREAT if create else 0), 0o644)
out = []
i = 0
print("ready", flush=True)
while not stop:
    head = b"REC%010d|" % i
    t = time.monotonic_ns()
    os.pwrite(fd, head + bytes([i % 251 + 1]) * (size - len(head)), i * size)
    os.fdatasync(fd)
    now = time.monotonic_ns()
    out.append(f"{i} {now} {now - t}")
    i += 1
    time.sleep(period)
os.close(fd)
print("\n".join(out), flush=True)
"""


class ProcWriter(Writer):
    """test_live_cut.Writer's records, written by a process of its own, as an application
    is: a thread of this process would share the interpreter with the plugin running here,
    and under emulation the plugin's Python work then stalls the writer, not the storage.
    It runs at nice -10: in the emulated VM the copy (a process saturating both vCPUs)
    otherwise starves any other process for half a second at times (measured: a 512 ms
    write+fdatasync 70 s after the cut, with the host loaded); a device that holds its
    writes holds them whatever the writer's priority.  Also keeps how long each
    write+fdatasync took."""

    def __init__(self, path: Path, *, create: bool) -> None:  # noqa: D107
        self.acked: list[tuple[int, float]] = []
        self.ops: list[tuple[float, float]] = []      # (acknowledged at, seconds it took)
        self._argv = [sys.executable, "-c", WRITER, str(path), "1" if create else "0", str(PERIOD), str(RECORD)]
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ProcWriter:
        self._proc = subprocess.Popen(self._argv, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None and self._proc.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        self._proc.send_signal(signal.SIGTERM)
        out, _ = self._proc.communicate(timeout=120)
        for line in out.splitlines():
            i, done, took = line.split()
            at = int(done) / 1e9 - _mono_offset
            self.acked.append((int(i), at))
            self.ops.append((at, int(took) / 1e9))

    def wait_records(self, n: int) -> None:
        """Let the writer run for at least n records (the child reports at the end only)."""
        time.sleep(n * PERIOD * 3)

    def longest_op(self, since: float, until: float) -> float:
        return max(took for at, took in self.ops if since <= at <= until)


def report(line: str) -> None:
    path = os.environ.get("VIRTVOL_VM_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def worst_gaps(acked: list[tuple[int, float]], since: float, until: float, cut: float, k: int = 3) -> str:
    """The k longest gaps between acknowledged records, and when they began, from the cut."""
    times = [t for _, t in acked if since <= t <= until]
    gaps = sorted(((b - a, a - cut) for a, b in zip(times, times[1:])), reverse=True)[:k]
    return ", ".join(f"{g * 1000:.0f} ms at {at:+.2f} s" for g, at in gaps)


def held_ms(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [float(m.group(2)) for r in caplog.records if (m := HELD.search(r.getMessage()))]


def dm_devices() -> list[str]:
    out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()]


@pytest.fixture(scope="module")
def big_ext4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with loop_filesystem("ext4", tmp_path_factory.mktemp("fs-big-ext4"), size=8 * GiB) as mnt:
        yield mnt


@pytest.fixture
def dm_plugin(big_ext4: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Plugin]:
    caplog.set_level(logging.INFO, logger="csi_virtvol.node.dmcut")
    tag = unique("p")
    with running_plugin(tmp_path / "plugin", [("pool-a", big_ext4 / f"a-{tag}", 0, {}),
                                              ("pool-b", big_ext4 / f"b-{tag}", 0, {})]) as p:
        yield p


def _cut_view(p: Plugin, sid: str) -> str:
    with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
        rec = st.get(S.PAIRS, sid)
        assert rec is not None
        return rec.value.cut_view


def test_snapshot_of_a_mounted_ext4_on_dm_holds_its_writer_only_for_an_instant(
        dm_plugin: Plugin, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = dm_plugin
    cap = mount_cap("ext4")
    src = _create(p, SIZE, cap)
    staging = tmp_path / "staging"
    _stage(p, src.volume_id, cap, staging)
    try:
        with ProcWriter(staging / "seq.bin", create=True) as w:
            w.wait_records(50)
            t0 = time.time()
            snap = _snapshot(p, src.volume_id)
            t1 = time.time()
            time.sleep(0.3)
        assert snap.ready_to_use
        cut, fence, methods = _pair(p, snap.snapshot_id)
        assert set(methods) == {"host"} and fence == "released"
        assert _cut_view(p, snap.snapshot_id).startswith(("/dev/mapper/virtvol-", "/dev/dm-")), \
            "the copy read a dm-snapshot view"
        holds = held_ms(caplog)
        assert len(holds) == 1, "one cut, made by dm"
        stall = w.longest_stall(t0, t1)
        report(f"dm mounted ext4 {SIZE >> 20} MiB: writer's longest stall {stall * 1000:.0f} ms, "
               f"writes held {holds[0]:.1f} ms, snapshot {t1 - t0:.1f} s, {len(w.acked)} records; "
               f"longest write+fdatasync {w.longest_op(t0, t1) * 1000:.0f} ms; "
               f"longest gaps {worst_gaps(w.acked, t0, t1, cut)}")
        assert stall < STALL_MAX, f"the writer stalled {stall:.3f}s while the snapshot ran"
        restored = tmp_path / "restored"
        req = pb.CreateVolumeRequest(name=unique(), capacity_range=pb.CapacityRange(required_bytes=SIZE),
                                     volume_capabilities=[cap])
        req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        vol = None
        deadline = time.monotonic() + 600
        while vol is None:
            try:
                vol = p.controller.CreateVolume(req).volume
            except Exception as e:
                if "ABORTED" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        _stage(p, vol.volume_id, cap, restored)
        try:
            image = (restored / "seq.bin").read_bytes()
        finally:
            _unstage(p, vol.volume_id, restored)
        _check_image(image, w.acked, cut)
    finally:
        _unstage(p, src.volume_id, staging)
    assert not [d for d in dm_devices() if "@" in d], "the cut's devices outlived it"


def test_snapshot_of_a_raw_block_volume_in_use_on_dm_is_cut_live(
        dm_plugin: Plugin, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = dm_plugin
    cap = block_cap()
    src = _create(p, SIZE, cap)
    staging = tmp_path / "staging"
    _stage(p, src.volume_id, cap, staging)
    target = tmp_path / "target"
    p.node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=src.volume_id, staging_target_path=str(staging), target_path=str(target), volume_capability=cap))
    try:
        with ProcWriter(target, create=False) as w:
            w.wait_records(50)
            t0 = time.time()
            snap = _snapshot(p, src.volume_id)
            t1 = time.time()
            time.sleep(0.3)
        assert snap.ready_to_use, "a raw block volume in use is snapshotted, not refused"
        cut, fence, _ = _pair(p, snap.snapshot_id)
        assert fence == "released"
        holds = held_ms(caplog)
        assert len(holds) == 1, "one cut, made by dm"
        stall = w.longest_stall(t0, t1)
        report(f"dm raw block {SIZE >> 20} MiB: writer's longest stall {stall * 1000:.0f} ms, "
               f"writes held {holds[0]:.1f} ms, snapshot {t1 - t0:.1f} s, {len(w.acked)} records; "
               f"longest write+fdatasync {w.longest_op(t0, t1) * 1000:.0f} ms; "
               f"longest gaps {worst_gaps(w.acked, t0, t1, cut)}")
        assert stall < STALL_MAX, f"the writer stalled {stall:.3f}s while the snapshot ran"
        image = _restored_bytes(p, snap.snapshot_id, SIZE, (len(w.acked) + 64) * 4096)
        _check_image(image, w.acked, cut)
    finally:
        p.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=src.volume_id, target_path=str(target)))
        _unstage(p, src.volume_id, staging)


def test_a_full_copy_on_write_store_on_dm_fails_the_snapshot_and_leaves_the_source_working(
        dm_plugin: Plugin, tmp_path: Path) -> None:
    p = dm_plugin
    cap = block_cap()
    size = 64 * MiB
    src = _create(p, size, cap)
    staging = tmp_path / "staging"
    _stage(p, src.volume_id, cap, staging)
    target = tmp_path / "target"
    p.node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=src.volume_id, staging_target_path=str(staging), target_path=str(target), volume_capability=cap))
    state = p.data_dir / "node"
    try:
        fd = os.open(target, os.O_RDWR)
        try:
            os.pwrite(fd, os.urandom(size // 2), 0)
            os.fsync(fd)
            p.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
                volume_id=src.volume_id, mutable_parameters={"copyBandwidth": "2Mi"}))  # a copy of ~30 s
            # a store of 1 MiB: dm-snapshot's header, one metadata chunk and 14 chunks of data
            snap = p.controller.CreateSnapshot(pb.CreateSnapshotRequest(
                name=unique("snap"), source_volume_id=src.volume_id, parameters={"cutStoreSize": "1Mi"})).snapshot
            assert not snap.ready_to_use
            payload = os.urandom(16 * MiB)
            os.pwrite(fd, payload, 0)
            os.fsync(fd)
            deadline = time.monotonic() + 120
            state_name = reason = ""
            while time.monotonic() < deadline and state_name != "failed":
                with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
                    rec = st.get(S.PAIRS, snap.snapshot_id)
                    assert rec is not None
                    state_name, reason = rec.value.state.value, rec.value.targets[0].reason
                time.sleep(0.2)
            assert state_name == "failed"
            assert "copy-on-write store" in reason and "filled up" in reason, reason
            assert os.pread(fd, 16 * MiB, 0) == payload, "the source was harmed"
            os.pwrite(fd, b"x" * 4096, 0)
            os.fsync(fd)
            assert os.pread(fd, 4096, 0) == b"x" * 4096
        finally:
            os.close(fd)
        # everything the cut made is gone: the view, its store and its loop device
        deadline = time.monotonic() + 30
        while True:
            left = [d for d in dm_devices() if "@c" in d] + \
                   [str(x) for x in state.rglob("dmcut/cow-*")] + \
                   [lo.name for lo in devices.list_loops() if "/dmcut/cow-" in lo.back_file]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not left, left
    finally:
        p.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=src.volume_id, target_path=str(target)))
        _unstage(p, src.volume_id, staging)


def test_a_resync_on_dm_copies_only_the_chunks_dm_era_saw_written(dm_plugin: Plugin, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from csi_virtvol.csi._gen import virtvol_pb2 as vpb
    from csi_virtvol.csi._gen import virtvol_pb2_grpc as vrpc

    p = dm_plugin
    cap = block_cap()
    size = 128 * MiB
    chunk = 64 * 1024
    src = _create(p, size, cap)
    staging = tmp_path / "staging"
    _stage(p, src.volume_id, cap, staging)
    target = tmp_path / "target"
    p.node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=src.volume_id, staging_target_path=str(staging), target_path=str(target), volume_capability=cap))
    try:
        fd = os.open(target, os.O_RDWR)
        try:
            os.pwrite(fd, os.urandom(size), 0)
            os.fsync(fd)
            snap = _snapshot(p, src.volume_id)
            assert snap.ready_to_use
            rng = random.Random(9)
            changed = sorted(rng.sample(range(size // chunk), size // chunk // 20))   # 5% of the chunks
            for k in changed:
                os.pwrite(fd, os.urandom(4096), k * chunk + rng.randrange(0, chunk // 4096) * 4096)
            os.fsync(fd)
            t0 = time.monotonic()
            vrpc.PairsStub(p.channel).ResyncPair(vpb.ResyncPairRequest(target=snap.snapshot_id))
            while True:   # it answers after a few seconds; under emulation the resync takes longer
                with SqliteStore(str(p.data_dir / "state.db"), readonly=True) as st:
                    rec = st.get(S.PAIRS, snap.snapshot_id)
                    assert rec is not None
                    pair = rec.value
                    snap_vol = st.get(S.VOLUMES, snap.snapshot_id)
                    assert snap_vol is not None
                if pair.state.value != "resyncing" or time.monotonic() - t0 > 300:
                    break
                time.sleep(0.2)
            took = time.monotonic() - t0
            assert pair.state.value == "split", pair.targets[0].reason
            assert pair.since_cut and "/dmcut/changed-" in pair.cut_changed, \
                f"the resync must use dm-era's tracking: {pair.cut_changed!r}"
            seen = [int(m.group(1)) for r in caplog.records
                    if (m := re.search(r"(\d+) chunks written since cut", r.getMessage()))]
            # (a resync may cut twice: services/snapshots.py's ResyncPair and its copy worker race)
            assert seen and set(seen) == {len(changed)}, f"dm-era saw {seen} chunks written; {len(changed)} were"
            written = sum(e.bytes_written for e in pair.targets[0].extents)
            report(f"dm resync of {size >> 20} MiB after 5% changed: {written >> 10} KiB written "
                   f"for {len(changed)} changed chunks ({len(changed) * chunk >> 10} KiB), {took:.1f} s")
            assert written <= len(changed) * chunk, f"{written} bytes written for {len(changed)} changed chunks"
            now = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        image = bytearray()
        for e in snap_vol.value.extents:
            with open(p.pools[e.array] / "luns" / f"{e.lun}.img", "rb") as f:
                f.seek(e.offset)
                image += f.read(e.length)
        assert bytes(image[:size]) == now, "the resynced snapshot differs from its source"
    finally:
        p.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=src.volume_id, target_path=str(target)))
        _unstage(p, src.volume_id, staging)
