"""Crashes during a live cut (issue 9 scope 3): the controller, the node plugin or the FUSE
concatenation daemon SIGKILLed at each step of a snapshot of a volume in use, then
restarted; an application writes throughout.

The controller and the node plugin run as separate processes (`serve --mode controller` and
`serve --mode node` on one state store), so each can be killed alone; the daemon is its own
process already.  `VIRTVOL_FAILPOINTS` names the step.  The source is a mounted ext4 over two
arrays (a reflink XFS pool, cloned at the cut with the writes held, and an ext4 pool, host
copied from the cut's view), or on the ext4 pool only, written by a writer that fdatasyncs
sequence-numbered records.

After the kill and the restart, for every step:
- the application's writes are not left held;
- every record acknowledged to the writer is on the source;
- the snapshot completes (its copy resumes), or, where the kill takes the volume's device
  (the daemon), fails cleanly: the pair `failed` with a reason, nothing stuck, nothing of
  its cut left; then a new attempt completes.  The image is a prefix of the acknowledged
  records, holding every record acknowledged before the cut and at most one more;
- once the snapshot is deleted and the volume unstaged, no copy-on-write store, tracking
  bitmap, view, daemon, FUSE mount, loop device, LUN or LUN record is left.

A killed daemon takes the volume's device with it (auto_unmount detaches its FUSE mount;
the loop device above returns EIO): for the application that is a disk failure.  Its
acknowledged writes are on the LUNs, and staging the volume again brings them back.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest
import yaml

from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.records import RECORD, Writer, prefix_length
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from csi_virtvol.model.volume import VolumeKind
from csi_virtvol.services.volumes import volume_id_for
from csi_virtvol.store import base as S
from csi_virtvol.store.sqlite import SqliteStore
from harness.plugin import _teardown_node, mount_cap
from test_live_stage import leftovers

MiB = 1 << 20
NODE = "crash-node"
CAP = mount_cap("ext4")

# (process killed, failpoint, what the snapshot then does): before the cut, inside it (writes
# held), during the copy, at its end.  "completed": the attempt resumes and completes;
# "failed": it fails cleanly (the volume's device died with its daemon) and a new one completes.
POINTS = [
    ("controller", "cut-requested", "completed"), ("controller", "cut-answered", "completed"),
    ("controller", "cut-clones-made", "completed"), ("controller", "copy-fenced", "completed"),
    ("controller", "copy-luns-made", "completed"), ("controller", "copy-checkpointed", "completed"),
    ("controller", "copy-finishing", "completed"), ("controller", "copy-released", "completed"),
    ("node", "cut-node-begin", "completed"), ("node", "cut-node-frozen", "completed"),
    ("node", "cut-node-made", "completed"),
    ("node", "cut-node-answered", "either"),   # the controller may let go before the node restarts, or not
    ("node", "cut-node-copying", "completed"), ("node", "cut-node-ending", "completed"),
    ("daemon", "daemon-cut-held", "failed"), ("daemon", "daemon-cut-made", "failed"),
    ("daemon", "daemon-preserved", "failed"), ("daemon", "daemon-view-read", "failed"),
    ("daemon", "daemon-cut-ending", "completed"),
]
# The layout: "clone+host" spans a reflink XFS pool (cloned at the cut, the writes held until
# the clone is made) and an ext4 pool (host copied); "host" is on the ext4 pool only (the
# writes let go right after the cut, before the controller hears of it).
CASES = [(*pt, "clone+host") for pt in POINTS] + [
    ("node", "cut-node-frozen", "completed", "host"), ("node", "cut-node-made", "completed", "host"),
    ("controller", "cut-requested", "completed", "host"), ("daemon", "daemon-cut-made", "failed", "host"),
]
SIZES = {"clone+host": 320 * MiB, "host": 96 * MiB}

pytestmark = pytest.mark.root


@contextmanager
def serving(data: Path, config: Path, mode: str, *, failpoint: str = "") -> Iterator[subprocess.Popen[bytes]]:
    sock = f"/tmp/virtvol-lc-{uuid.uuid4().hex[:8]}.sock"
    env = dict(os.environ, VIRTVOL_FAILPOINTS=failpoint)
    log = open(data / f"{mode}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "csi_virtvol", "serve", "--endpoint", f"unix://{sock}",
                             "--data-dir", str(data), "--node-id", NODE, "--mode", mode, "--config", str(config)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        grpc.channel_ready_future(channel).result(timeout=60)
        proc.channel = channel  # type: ignore[attr-defined]
        yield proc
    finally:
        channel.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        log.close()
        if os.path.exists(sock):
            os.unlink(sock)


class Cluster:
    """A controller process and a node process, each restartable, and stubs to them."""

    def __init__(self, stack: ExitStack, data: Path, config: Path) -> None:
        self._stack, self._data, self._config = stack, data, config
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._exits: dict[str, ExitStack] = {}

    def start(self, mode: str, failpoint: str = "") -> None:
        inner = ExitStack()
        self.procs[mode] = inner.enter_context(serving(self._data, self._config, mode, failpoint=failpoint))
        self._exits[mode] = inner
        self._stack.callback(inner.close)

    def restart(self, mode: str) -> None:
        self._exits.pop(mode).close()
        self.start(mode)

    @property
    def ctl(self) -> rpc.ControllerStub:
        return rpc.ControllerStub(self.procs["controller"].channel)  # type: ignore[attr-defined]

    @property
    def node(self) -> rpc.NodeStub:
        return rpc.NodeStub(self.procs["node"].channel)  # type: ignore[attr-defined]


def lun_content(data: Path, pools: dict[str, Path], vid: str) -> bytes:
    with SqliteStore(str(data / "state.db"), readonly=True) as st:
        vol = st.get(S.VOLUMES, vid)
        assert vol is not None
        extents = vol.value.extents
    out = bytearray()
    for e in extents:
        with open(pools[e.array] / "luns" / f"{e.lun}.img", "rb") as f:
            f.seek(e.offset)
            out += f.read(e.length)
    return bytes(out)


def daemon_pid(data: Path) -> int:
    (pid_file,) = (data / "node" / "volumes").glob("*/concatfs.pid")
    return int(pid_file.read_text())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stage(c: Cluster, vid: str, staging: Path) -> None:
    ctx = c.ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=NODE, volume_capability=CAP)).publish_context
    staging.mkdir(exist_ok=True)
    c.node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=str(staging),
                                                     volume_capability=CAP, publish_context=ctx))


def unstage(c: Cluster, vid: str, staging: Path) -> None:
    c.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)))
    c.ctl.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE))


def pair(data: Path, sid: str):  # type: ignore[no-untyped-def]
    with SqliteStore(str(data / "state.db"), readonly=True) as st:
        rec = st.get(S.PAIRS, sid)
        return None if rec is None else rec.value


def first_attempt(data: Path, sid: str, timeout: float = 120) -> str:
    """How the attempt under way when the process was killed ended, from the records alone
    (a CreateSnapshot would start a failed attempt again): "" when it completed, else why it
    failed: the pair `failed` (with a reason), or undone (the cut failed under the request)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with SqliteStore(str(data / "state.db"), readonly=True) as st:
            p = st.get(S.PAIRS, sid)
            vol = st.get(S.VOLUMES, sid)
        if p is None and vol is None:
            return "undone: its cut failed and CreateSnapshot answered the error"
        if p is not None and p.value.state.value == "failed":
            assert p.value.targets[0].reason, "the pair failed without a reason"
            return p.value.targets[0].reason
        if p is not None and p.value.state.value == "split" and vol is not None and vol.value.state.value == "available":
            return ""
        time.sleep(0.2)
    raise AssertionError(f"snapshot {sid} neither completed nor failed in {timeout:.0f}s: {pair(data, sid)}")


def complete(c: Cluster, name: str, vid: str, timeout: float = 120) -> pb.Snapshot:
    """CreateSnapshot, as the CO repeats it, until the snapshot is ready."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            snap = c.ctl.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=vid),
                                        timeout=60).snapshot
            if snap.ready_to_use:
                return snap
            err = "not ready"
        except grpc.RpcError as e:
            err = f"{e.code().name}: {e.details()}"
        assert time.monotonic() < deadline, f"snapshot {name} was never made: {err}"
        time.sleep(0.3)


def restored_file(c: Cluster, sid: str, size: int, where: Path) -> bytes:
    req = pb.CreateVolumeRequest(name=f"restore-{sid[:8]}", capacity_range=pb.CapacityRange(required_bytes=size),
                                 volume_capabilities=[CAP])
    req.volume_content_source.snapshot.snapshot_id = sid
    deadline = time.monotonic() + 120
    while True:
        try:
            rid = c.ctl.CreateVolume(req).volume.volume_id
            break
        except grpc.RpcError as e:
            assert e.code() is grpc.StatusCode.ABORTED and time.monotonic() < deadline, e
            time.sleep(0.3)
    stage(c, rid, where)
    try:
        return (where / "seq.bin").read_bytes()
    finally:
        unstage(c, rid, where)
        c.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=rid))


@pytest.mark.parametrize("process,point,outcome,layout", CASES, ids=[f"{c[3]}:{c[0]}:{c[1]}" for c in CASES])
def test_live_cut_survives_a_kill_at_each_step(process: str, point: str, outcome: str, layout: str,
                                               xfs_mount: Path, ext4_mount: Path, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    pools = {"slow": ext4_mount / f"ls-{tag}"}
    if layout == "clone+host":
        pools = {"fast": xfs_mount / f"lf-{tag}", **pools}
    size = SIZES[layout]
    cap = {"fast": 256 * MiB, "slow": 256 * MiB if layout == "clone+host" else 3 * size}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"arrays": [
        {"id": a, "kind": "file", "params": {"path": str(p), "capacity": str(cap[a])}}
        for a, p in pools.items()]}))   # the source, its snapshot and a restore
    data = tmp_path / "data"
    data.mkdir()
    staging = tmp_path / "staging"
    name = "snap"
    sid = volume_id_for(name, VolumeKind.SNAPSHOT)
    with ExitStack() as stack:
        stack.callback(_teardown_node, str(data / "node"), tmp_path)   # after the processes, if a check failed
        c = Cluster(stack, data, config)
        c.start("controller", point if process == "controller" else "")
        c.start("node", point if process in ("node", "daemon") else "")
        vid = c.ctl.CreateVolume(pb.CreateVolumeRequest(
            name="src", capacity_range=pb.CapacityRange(required_bytes=size),
            volume_capabilities=[CAP])).volume.volume_id
        for lun in pools["slow"].joinpath("luns").glob("*.img"):   # data to copy (mkfs keeps most of it)
            with open(lun, "r+b") as f:
                f.write(os.urandom(64 * MiB))
        c.ctl.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            volume_id=vid, mutable_parameters={"copyBandwidth": "8Mi"}))   # a host copy of ~8 s
        stage(c, vid, staging)
        dpid = daemon_pid(data)
        w = Writer(staging / "seq.bin")
        try:
            w.wait(50)
            victim = c.procs.get(process)
            ctl = c.ctl

            def attempt() -> None:
                try:
                    ctl.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=vid), timeout=60)
                except grpc.RpcError:
                    pass   # the controller died under the call, or the cut failed
            threading.Thread(target=attempt, daemon=True).start()
            deadline = time.monotonic() + 90
            if process == "daemon":
                while alive(dpid):
                    assert time.monotonic() < deadline, f"failpoint {point} was not reached"
                    time.sleep(0.1)
                logs = "".join(p.read_text(errors="replace") for p in (data / "node").glob("volumes/*/concatfs.log"))
                assert f"failpoint {point}: killing" in logs
            else:
                assert victim is not None
                victim.wait(timeout=90)
                assert victim.returncode == -signal.SIGKILL, f"failpoint {point} was not reached"
                c.restart(process)
            failure = first_attempt(data, sid)
            print(f"{layout}:{process}:{point}: {'failed: ' + failure if failure else 'completed'}")
            if process != "daemon":
                w.wait(len(w.acked) + 20)   # the application writes on (nothing left held)
            if failure:   # failed cleanly: nothing of its cut is left, even before anyone restages
                deadline = time.monotonic() + 15
                while (left := [x for x in leftovers(data) if "cuts/" in x or "mnt/cut-" in x]) \
                        and time.monotonic() < deadline:
                    time.sleep(0.3)
                assert not left, f"the failed attempt left {left}"
        finally:
            w.stop()
        if outcome != "either":
            assert ("failed" if failure else "completed") == outcome, f"the attempt {failure or 'completed'}"
        acked = w.acked
        assert len(acked) > 50
        if process == "daemon":   # a disk failure for the application: it stages the volume again
            assert w.error is not None or point == "daemon-cut-ending"
            c.restart("node")   # only so that the next daemon does not inherit the failpoint
            unstage(c, vid, staging)
            stage(c, vid, staging)
        source = (staging / "seq.bin").read_bytes()
        assert prefix_length(source) >= acked[-1][0] + 1, \
            f"records up to {acked[-1][0]} were acknowledged; the source holds {prefix_length(source)}"
        snap = complete(c, name, vid)   # a failed attempt is made again
        p = pair(data, snap.snapshot_id)
        assert p is not None and p.fence.value == "released"
        image = restored_file(c, snap.snapshot_id, size, tmp_path / "restored")
        n = prefix_length(image)
        tail = image[n * RECORD:]
        assert tail.count(0) == len(tail), f"the image holds a torn or foreign record after record {n}"
        before = [i for i, t in acked if t < p.cut_at]
        last_before = before[-1] if before else -1
        assert n - 1 >= last_before, f"record {last_before} was acknowledged before the cut but is not in the image"
        assert n - 1 <= last_before + 1, f"the image holds records up to {n - 1}; only {last_before} (+1) preceded the cut"

        c.ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
        deadline = time.monotonic() + 15
        while (left := [x for x in leftovers(data) if "cuts/" in x or "tracking/" in x or "mnt/cut-" in x]) \
                and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not left, f"the deleted snapshot left {left}"
        with SqliteStore(str(data / "state.db"), readonly=True) as st:
            luns = {r.value.key: r.value for r in st.list(S.LUNS)}
        assert {lun.state.value for lun in luns.values()} == {"in-use"}, "the source stayed fenced"
        files = {f"{a}:{f.stem}" for a, d in pools.items() for f in d.joinpath("luns").glob("*.img")}
        assert files == set(luns), "LUN files and LUN records disagree (a leak or a loss)"
        unstage(c, vid, staging)
        c.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
        deadline = time.monotonic() + 15
        while (left := leftovers(data)) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not left, f"left behind: {left}"
    assert [f for d in pools.values() for f in d.joinpath("luns").glob("*")] == []
