"""Crash and retry matrix of a host copy on a cluster (issue 12): each fault at each step.

The controller runs as its own process (so it can be SIGKILLed) on the CRD store, against the
fake API server; a stand-in Job controller, kubelet and garbage collector (standin.py) run each
copy Job's pods on this host.  The source volume lives on an ext4 pool, so its snapshot is a host
copy made by a copy Job, of random data with holes.

Faults, each at a step (a failpoint, csi_virtvol/failpoints.py, in the controller or in the copy):

* ``controller``: the controller process is SIGKILLed there, and started again;
* ``pod-killed``: the copy pod's process is SIGKILLed there (exit 137); the Job makes a new pod;
* ``pod-failed``: the copy exits 1 there, once; the Job makes a new pod;
* ``api-errors``: the API server answers 5xx/429 or drops the connection on what the copy path
  asks there (create the Job; list/watch Jobs and pods; pods/log; the VolumePair's status; delete
  the Job).

Steps: ``before-job`` (the Job is not created yet), ``job-created`` (created, its pod not running
yet), ``mid-copy`` (after a durable checkpoint), ``copied`` (the copy wrote everything, nothing is
verified yet), ``verified`` (verified, the pair's row not marked done yet), ``done`` (the row is
done, the Job not deleted yet).  A pod has no part in ``before-job`` and has ended by ``done``.

Every case must end the same way: the snapshot ready, its image byte-identical to the source at
the cut, the VolumePair split with each host extent verified (``blake2b-256``/``match``), the
same VolumePair and VirtualVolume objects as at the start (nothing discarded and made again), one
Job incarnation (nothing copied again needlessly), no CopyFailed event, no Job and no checkpoint
left once it is ready; and once the snapshot and volume are deleted, no VirtualVolume, VolumePair,
PhysicalVolume, Job, pod, checkpoint or LUN file.  Each case also checks its fault really struck.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from fakeapi import FakeApiServer
from standin import JobCluster, PodRun, wait_for

MiB = 1 << 20
NS = "csi-virtvol"
GROUP = "virtvol.csi.example.org"
SIZE = 48 * MiB
DATA = ((0, 32 * MiB), (40 * MiB, 6 * MiB))  # random data; the rest of the volume is holes
SLOW = "6Mi"  # copyBandwidth where a step needs the copy to run a while: a checkpoint every 2 s
pytestmark = [pytest.mark.root, pytest.mark.slow]

CONTROLLER_POINTS = {"before-job": "copy-host-starting", "job-created": "copy-host-started",
                     "mid-copy": "copy-checkpointed", "copied": "copy-host-ended",
                     "verified": "copy-verified", "done": "copy-host-done"}
COPIER_POINTS = {"job-created": "copier-started", "mid-copy": "copier-checkpointed",
                 "copied": "copier-copied", "verified": "copier-verified"}
STEPS = list(CONTROLLER_POINTS)
CASES = ([("controller", s) for s in STEPS] + [("pod-killed", s) for s in COPIER_POINTS]
         + [("pod-failed", s) for s in COPIER_POINTS] + [("api-errors", s) for s in STEPS])
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
PODS = f"/api/v1/namespaces/{NS}/pods"


class Controller:
    """`csi-virtvol serve --mode controller` as its own process, restartable under one pod name."""

    def __init__(self, tmp: Path, config: Path) -> None:
        self.tmp, self.config = tmp, config
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.stub: rpc.ControllerStub | None = None
        self.exits: list[int] = []
        self.log = tmp / "controller.log"

    def start(self, failpoint: str = "") -> None:
        sock = f"/tmp/virtvol-matrix-{uuid.uuid4().hex[:8]}.sock"
        env = dict(os.environ, VIRTVOL_FAILPOINTS=failpoint, POD_NAME="csi-virtvol-controller-0")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "csi_virtvol", "serve", "--mode", "controller", "--endpoint", f"unix://{sock}",
                 "--data-dir", str(self.tmp / "data"), "--node-id", "node-1", "--config", str(self.config)],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        self.sock = sock
        self.channel = grpc.insecure_channel(f"unix://{sock}")
        grpc.channel_ready_future(self.channel).result(timeout=60)
        self.stub = rpc.ControllerStub(self.channel)

    def died(self) -> bool:
        """True once (and each time) the process ended by itself; it is then restarted by the caller."""
        assert self.proc is not None
        if self.proc.poll() is None:
            return False
        self.exits.append(self.proc.returncode)
        self._close()
        return True

    def _close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if os.path.exists(self.sock):
            os.unlink(self.sock)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._close()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""


class Matrix:
    def __init__(self, api: FakeApiServer, tmp: Path, pools: dict[str, Path]) -> None:
        self.api, self.tmp, self.pools = api, tmp, pools
        self.ckpt_dir = tmp / "host" / "copy"
        self.config = tmp / "controller.yaml"
        self.configure()
        self.controller = Controller(tmp, self.config)

    def configure(self, **copy_job: Any) -> None:
        self.config.write_text(yaml.safe_dump({
            "store": "crd", "kubeApi": self.api.url, "namespace": NS, "copyImage": "csi-virtvol:test",
            "leaderElection": {"enabled": True, "leaseName": "csi-virtvol-controller"},
            "copyJob": {"serviceAccountName": "csi-virtvol-copy", "hostDataDir": str(self.tmp / "host"),
                        **copy_job},
            "arrays": [{"id": a, "kind": "file", "params": {"path": str(p), "capacity": "256Mi"}}
                       for a, p in self.pools.items()]}))

    def source(self, ctl: Controller, *, slow: bool) -> tuple[str, str]:
        """A volume on the ext4 pool holding random data and holes; (its id, sha256 of its image)."""
        cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER), mount=pb.VolumeCapability.MountVolume())
        vol = ctl.stub.CreateVolume(pb.CreateVolumeRequest(
            name="pvc-matrix", capacity_range=pb.CapacityRange(required_bytes=SIZE), volume_capabilities=[cap],
            parameters={"arrays": "slow"}, mutable_parameters={"copyBandwidth": SLOW} if slow else {})).volume
        vid = vol.volume_id
        src = next(o for o in self.objects("virtualvolumes") if o["metadata"]["name"] == vid)
        assert [e["array"] for e in src["spec"]["extents"]] == ["slow"], "the source is on the ext4 pool"
        pv = next(o for o in self.objects("physicalvolumes") if o["spec"]["id"] == src["spec"]["extents"][0]["lun"])
        with open(pv["spec"]["address"], "r+b") as f:
            for off, n in DATA:
                f.seek(off)
                f.write(os.urandom(n))
        self.api.put("snapshot.storage.k8s.io", "volumesnapshots", {
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "snap", "namespace": "default"}, "spec": {}}, "default")
        return vid, hashlib.sha256(self.image(vid)).hexdigest()

    def snapshot_request(self, vid: str) -> pb.CreateSnapshotRequest:
        return pb.CreateSnapshotRequest(name="snapshot-matrix", source_volume_id=vid, parameters={
            "csi.storage.k8s.io/volumesnapshot/name": "snap",
            "csi.storage.k8s.io/volumesnapshot/namespace": "default"})

    def delete_all(self, ctl: Controller, cluster: JobCluster, *, snapshot_id: str, volume_id: str) -> None:
        """Delete the snapshot and the volume: nothing of either may be left anywhere."""
        assert ctl.stub is not None
        ctl.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id))
        ctl.stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
        for plural in ("virtualvolumes", "volumepairs", "physicalvolumes"):
            assert self.objects(plural) == [], plural
        assert self.lun_files() == set()
        wait_for(lambda: self.api.objects("", "pods", NS) == [] and cluster.idle(), timeout=15,
                 what="the copy pods to be collected")
        assert self.api.objects("batch", "jobs", NS) == []
        assert self.checkpoints() == []
        assert not cluster.errors, cluster.errors

    def objects(self, plural: str) -> list[dict[str, Any]]:
        return self.api.objects(GROUP, plural)

    def image(self, vid: str) -> bytes:
        vv = next(o for o in self.objects("virtualvolumes") if o["metadata"]["name"] == vid)
        pvs = {(o["spec"]["array"], o["spec"]["id"]): o["spec"]["address"] for o in self.objects("physicalvolumes")}
        out = bytearray()
        for e in vv["spec"]["extents"]:
            with open(pvs[(e["array"], e["lun"])], "rb") as f:
                f.seek(e["offset"])
                out += f.read(e["length"])
        return bytes(out)

    def lun_files(self) -> set[tuple[str, str]]:
        return {(a, f.stem) for a, p in self.pools.items() for f in p.joinpath("luns").glob("*.img")}

    def checkpoints(self) -> list[str]:
        return sorted(p.name for p in self.ckpt_dir.glob("*")) if self.ckpt_dir.exists() else []


@pytest.fixture
def matrix(fake_api: FakeApiServer, xfs_mount: Path, ext4_mount: Path, tmp_path: Path) -> Iterator[Matrix]:
    tag = uuid.uuid4().hex[:8]
    pools = {"fast": xfs_mount / f"mf-{tag}", "slow": ext4_mount / f"ms-{tag}"}
    m = Matrix(fake_api, tmp_path, pools)
    try:
        yield m
    finally:
        m.controller.kill()
        for p in pools.values():
            for f in sorted(p.rglob("*"), reverse=True):
                if f.is_file():
                    f.unlink()


def _arm(api: FakeApiServer, method: str, path: str, codes: tuple[int | str, ...]) -> None:
    """One fault per entry: an HTTP status, or "drop" (the connection closed unanswered)."""
    for c in codes:
        if c == "drop":
            api.inject_fault(method, path, drop=True)
        else:
            api.inject_fault(method, path, code=int(c))


@pytest.mark.parametrize(("fault", "step"), CASES, ids=[f"{f}@{s}" for f, s in CASES])
def test_a_host_copy_survives(fault: str, step: str, matrix: Matrix) -> None:
    api = matrix.api
    ctl = matrix.controller
    slow = step == "mid-copy"
    hold = threading.Event() if step == "job-created" and fault in ("controller", "api-errors") else None
    armed = threading.Event()

    def on_output(run: PodRun, line: str) -> None:  # api-errors@mid-copy: the log is read through faults
        if fault == "api-errors" and step == "mid-copy" and '"progress"' in line and not armed.is_set():
            armed.set()
            _arm(api, "GET", r"/pods/[^/]+/log$", (500, 500, "drop", 429, 503))

    def on_exit(run: PodRun) -> None:  # before the pod's end is reported
        if fault != "api-errors" or run.code != 0 or armed.is_set():
            return
        armed.set()
        if step == "copied":  # the informers lose their watches and must list through faults
            _arm(api, "GET", f"{PODS}$", (500, "drop", 429))
            _arm(api, "GET", f"{JOBS}$", (503, 500))
            api.end_watches()
        elif step == "verified":  # the row's verification and done state are written through faults
            _arm(api, "PUT", r"/volumepairs/[^/]+$", (500,))
            _arm(api, "PUT", r"/volumepairs/[^/]+/status$", (503, "drop"))
        elif step == "done":
            _arm(api, "DELETE", f"{JOBS}/[^/]+$", (500, "drop", 429))

    pod_env = {}
    if fault in ("pod-killed", "pod-failed"):
        pod_env["VIRTVOL_FAILPOINTS"] = COPIER_POINTS[step] + ("=error" if fault == "pod-failed" else "")

    with JobCluster(api, NS, pod_env=pod_env, hold=hold, on_output=on_output, on_exit=on_exit) as cluster:
        ctl.start(failpoint=CONTROLLER_POINTS[step] if fault == "controller" else "")  # none on CreateVolume's way
        vid, at_cut = matrix.source(ctl, slow=slow)

        if fault == "api-errors" and step == "before-job":
            _arm(api, "POST", f"{JOBS}$", (500, "drop", 429, 503))
        if fault == "api-errors" and step == "job-created":
            def through_faults() -> None:  # the Job is there, its pod waits: the informers reconnect
                wait_for(lambda: api.objects("batch", "jobs", NS), timeout=60, what="the copy Job")
                _arm(api, "GET", f"{JOBS}$", (500, "drop", 429))
                _arm(api, "GET", f"{PODS}$", (503, 500))
                api.end_watches()
                wait_for(lambda: api.faults_left() == 0, timeout=60, what="the faults to be hit")
                assert hold is not None
                hold.set()
            threading.Thread(target=through_faults, daemon=True).start()

        req = matrix.snapshot_request(vid)
        surfaced: list[str] = []  # errors the sidecar would see while the controller runs
        first_pair: dict[str, str] = {}
        deadline = time.monotonic() + 120
        snap = None
        while time.monotonic() < deadline:
            if ctl.died():
                if hold is not None:
                    hold.set()  # controller@job-created: the pod runs once the controller is gone
                ctl.start()
            assert ctl.stub is not None
            try:
                got = ctl.stub.CreateSnapshot(req, timeout=30).snapshot
                if got.ready_to_use:
                    snap = got
                    break
            except grpc.RpcError as e:
                if ctl.proc is not None and ctl.proc.poll() is None and \
                        e.code() is not grpc.StatusCode.UNAVAILABLE:  # not the killed process's socket
                    surfaced.append(f"{e.code().name}: {e.details()}")
            for o in matrix.objects("volumepairs"):
                first_pair.setdefault(o["metadata"]["name"], o["metadata"]["uid"])
            assert not cluster.errors, cluster.errors
            time.sleep(0.3)
        assert snap is not None, f"the snapshot never became ready\n{ctl.tail()}"
        assert surfaced == [], f"a fault surfaced as an error of CreateSnapshot: {surfaced}"

        # the fault struck where it was meant to
        if fault == "controller":
            assert ctl.exits == [-signal.SIGKILL], f"failpoint {CONTROLLER_POINTS[step]} was not reached: {ctl.exits}"
        elif fault in ("pod-killed", "pod-failed"):
            codes = [r.code for r in cluster.runs]
            assert codes == [137 if fault == "pod-killed" else 1, 0], f"pod exits {codes}"
        else:
            assert api.faults_left() == 0, "not every injected API fault was met"
        assert ctl.exits == ([-signal.SIGKILL] if fault == "controller" else [])

        # the image is the source at the cut, verified, recorded once
        assert hashlib.sha256(matrix.image(snap.snapshot_id)).hexdigest() == at_cut, \
            "the snapshot does not hold the source's bytes at the cut"
        pairs = matrix.objects("volumepairs")
        assert len(pairs) == 1, pairs
        vp = pairs[0]
        assert first_pair == {vp["metadata"]["name"]: vp["metadata"]["uid"]}, "the pair was discarded and made again"
        assert vp["status"]["state"] == "split" and vp["status"]["progress"] == "100%"
        host = [e for e in vp["status"]["targets"][0]["extents"] if e["method"] == "host"]
        assert host and all((e["verifyMethod"], e["verifyResult"], e["state"]) == ("blake2b-256", "match", "done")
                            for e in host), host
        vvs = {o["metadata"]["name"] for o in matrix.objects("virtualvolumes")}
        assert vvs == {vid, snap.snapshot_id}
        luns = {(o["spec"]["array"], o["spec"]["id"]) for o in matrix.objects("physicalvolumes")}
        used = {(e["array"], e["lun"]) for o in matrix.objects("virtualvolumes") for e in o["spec"]["extents"]}
        assert luns == used == matrix.lun_files(), "LUN records, volumes' extents and LUN files disagree"
        assert cluster.incarnations() == 1, "the copy was started again from scratch"
        assert len(cluster.runs) == (2 if fault.startswith("pod-") else 1), [r.name for r in cluster.runs]
        wait_for(lambda: api.objects("batch", "jobs", NS) == [], timeout=15,
                 what="the finished copy's Job to be deleted")
        assert matrix.checkpoints() == [], "a checkpoint outlived its copy"
        events = api.objects("events.k8s.io", "events", "default")
        assert [e for e in events if e.get("reason") == "CopyFailed"] == []
        assert {"CopyStarted", "CopyComplete"} <= {e.get("reason") for e in events}

        matrix.delete_all(ctl, cluster, snapshot_id=snap.snapshot_id, volume_id=vid)


def test_a_retried_snapshot_never_resumes_the_discarded_attempts_checkpoint(matrix: Matrix) -> None:
    """Issue 12 item 1: an attempt at a snapshot is discarded in the middle of its copy (here: the
    VolumeSnapshot is deleted), and the snapshot is asked for again under the same name.  The new
    attempt's Job has the same name, so the same checkpoint file on the node, and its target is
    made afresh.  A checkpoint belongs to one target and one cut: the new copy starts from 0 and is
    right the first time (not resumed into zeros, caught by verification and copied again)."""
    import json

    api, ctl = matrix.api, matrix.controller
    with JobCluster(api, NS) as cluster:
        ctl.start()
        assert ctl.stub is not None
        vid, at_cut = matrix.source(ctl, slow=True)
        req = matrix.snapshot_request(vid)
        first = ctl.stub.CreateSnapshot(req, timeout=30).snapshot
        assert not first.ready_to_use

        def checkpointed() -> list[dict[str, Any]]:
            found = [json.loads(p.read_text()) for p in matrix.ckpt_dir.glob("*.json")]
            return [c for c in found if 0 < c["bytes_done"] < c["length"]]
        stale = wait_for(checkpointed, timeout=60, what="a checkpoint in the middle of the copy")
        ctl.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=first.snapshot_id))
        wait_for(lambda: cluster.idle() and api.objects("", "pods", NS) == [], timeout=15,
                 what="the discarded copy's pod to go")
        left = [json.loads(p.read_text()) for p in matrix.ckpt_dir.glob("*.json")]
        assert [c["checkpoint_id"] for c in left] == [stale[0]["checkpoint_id"]], \
            "the discarded attempt left its checkpoint behind (as a killed pod does)"

        deadline = time.monotonic() + 120
        snap = None
        while snap is None and time.monotonic() < deadline:
            got = ctl.stub.CreateSnapshot(req, timeout=30).snapshot
            snap = got if got.ready_to_use else None
            time.sleep(0.3)
        assert snap is not None and snap.snapshot_id == first.snapshot_id, f"not ready\n{ctl.tail()}"
        assert hashlib.sha256(matrix.image(snap.snapshot_id)).hexdigest() == at_cut, \
            "the snapshot does not hold the source's bytes at the cut"
        assert cluster.incarnations() == 2, "the new attempt's copy was not right the first time"
        old, new = cluster.runs
        assert old.job_uid != new.job_uid and new.code == 0
        result = json.loads(new.result)
        assert result["event"] == "done" and result["resumed_from"] == 0, result
        assert result["checkpoint_id"] != stale[0]["checkpoint_id"], "the new attempt has the old identity"
        vp = matrix.objects("volumepairs")[0]
        assert [(e["verifyMethod"], e["verifyResult"]) for e in vp["status"]["targets"][0]["extents"]] == \
            [("blake2b-256", "match")]
        matrix.delete_all(ctl, cluster, snapshot_id=snap.snapshot_id, volume_id=vid)


def test_a_failed_job_is_made_again_and_resumes_from_its_checkpoint(matrix: Matrix) -> None:
    """With no pod retries left (backoffLimit 0 here), the copy's Job fails; the controller's copy
    loop restarts the copy "from its checkpoint" (services/snapshots.py): a new Job of the same
    attempt, whose pod resumes where the killed one stopped.  It used to take the failed Job as
    its own, so every restart was a no-op and the snapshot failed and was copied again from 0."""
    import json

    api, ctl = matrix.api, matrix.controller
    matrix.configure(backoffLimit=0)
    with JobCluster(api, NS, pod_env={"VIRTVOL_FAILPOINTS": "copier-checkpointed"}) as cluster:
        ctl.start()
        assert ctl.stub is not None
        vid, at_cut = matrix.source(ctl, slow=True)
        req = matrix.snapshot_request(vid)
        surfaced: list[str] = []
        first_pair: dict[str, str] = {}
        deadline = time.monotonic() + 120
        snap = None
        while snap is None and time.monotonic() < deadline:
            try:
                got = ctl.stub.CreateSnapshot(req, timeout=30).snapshot
                snap = got if got.ready_to_use else None
            except grpc.RpcError as e:
                surfaced.append(f"{e.code().name}: {e.details()}")
            for o in matrix.objects("volumepairs"):
                first_pair.setdefault(o["metadata"]["name"], o["metadata"]["uid"])
            time.sleep(0.3)
        assert snap is not None, f"the snapshot never became ready\n{ctl.tail()}"
        assert hashlib.sha256(matrix.image(snap.snapshot_id)).hexdigest() == at_cut
        assert surfaced == [], surfaced
        vp = matrix.objects("volumepairs")[0]
        assert first_pair == {vp["metadata"]["name"]: vp["metadata"]["uid"]}, "the pair was discarded and made again"
        assert [(e["verifyMethod"], e["verifyResult"]) for e in vp["status"]["targets"][0]["extents"]] == \
            [("blake2b-256", "match")]
        assert cluster.incarnations() == 2 and [r.code for r in cluster.runs] == [137, 0]
        killed, resumed = cluster.runs
        assert killed.job_uid != resumed.job_uid
        result = json.loads(resumed.result)
        assert result["event"] == "done" and result["resumed_from"] > 0, "not resumed from the checkpoint"
        wait_for(lambda: api.objects("batch", "jobs", NS) == [], timeout=15, what="the copy's Job to go")
        matrix.delete_all(ctl, cluster, snapshot_id=snap.snapshot_id, volume_id=vid)
