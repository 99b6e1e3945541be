"""The whole driver in its cluster shape, against the fake API server.

The plugin runs with the CRD store, copy Jobs, Events and a Lease, over real
file pools (reflink XFS and ext4).  A stand-in kubelet runs each copy Job's
container command on this host, as a node would, and reports its log and
outcome.  A PVC-like volume, a snapshot that needs a host copy, and a clone
are made through CSI; the VirtualVolume and VolumePair objects are then read
as `kubectl get` would.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from csi_virtvol import app
from csi_virtvol.config import load_config
from csi_virtvol.csi._gen import csi_pb2 as pb
from csi_virtvol.csi._gen import csi_pb2_grpc as rpc
from chart_rbac import COPY_SA, CONTROLLER_SA, NODE_SA, enforce_chart_rbac, service_account_kubeconfig
from fakeapi import FakeApiServer
from fakerbac import RbacAuthorizer

MiB = 1 << 20
NS = "csi-virtvol"
GROUP = "virtvol.csi.example.org"
pytestmark = pytest.mark.root


def run_copy_pod(api: FakeApiServer, job: dict[str, Any], *, attempt: int = 0,
                 before: Callable[[dict[str, Any], list[str]], None] | None = None) -> int:
    """Run one pod of `job` here, as its node's kubelet would: the pod is labelled with the Job's
    uid, its container's termination message is what the copy wrote to /dev/termination-log
    (redirected to a file here), and its log is the copy's stdout.  Returns the exit code."""
    name = job["metadata"]["name"]
    spec = job["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["command"] == ["csi-virtvol"]
    for v in spec["volumes"]:  # what the kubelet does for hostPath volumes
        if v["hostPath"].get("type") == "DirectoryOrCreate":
            Path(v["hostPath"]["path"]).mkdir(parents=True, exist_ok=True)
        else:
            assert Path(v["hostPath"]["path"]).is_dir(), v
    pod = f"{name}-{job['metadata']['uid'][:5]}-{attempt}"
    api.put("", "pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": pod, "namespace": NS, "labels": {**job["spec"]["template"]["metadata"]["labels"],
                                                 "batch.kubernetes.io/job-name": name,
                                                 "batch.kubernetes.io/controller-uid": job["metadata"]["uid"]}},
        "spec": {"containers": [{"name": "copy", "image": c["image"]}]},
        "status": {"phase": "Running"}}, NS)
    api.set_status("batch", "jobs", name, {"active": 1}, NS)
    with tempfile.NamedTemporaryFile(prefix="termination-log-") as term:
        args = [term.name if a == c["terminationMessagePath"] else a for a in c["args"]]
        if before is not None:
            before(job, args)
        run = subprocess.run([sys.executable, "-m", "csi_virtvol", *args], capture_output=True, text=True)
        message = Path(term.name).read_text()
    api.set_pod_log(NS, pod, run.stdout)
    api.set_status("", "pods", pod, {"phase": "Succeeded" if run.returncode == 0 else "Failed",
                                     "containerStatuses": [{
                                         "name": "copy", "ready": False, "restartCount": 0, "image": c["image"],
                                         "imageID": "", "state": {"terminated": {
                                             "exitCode": run.returncode, "message": message[-4096:]}}}]}, NS)
    return run.returncode


def finish_job(api: FakeApiServer, job: dict[str, Any], code: int, stderr: str = "") -> None:
    name = job["metadata"]["name"]
    if code == 0:
        api.set_status("batch", "jobs", name, {"succeeded": 1, "conditions": [
            {"type": "Complete", "status": "True"}]}, NS)
    else:
        api.set_status("batch", "jobs", name, {"failed": 1, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": stderr[-300:]}]}, NS)


def kubelet(api: FakeApiServer, stop: threading.Event) -> None:
    """Run every copy Job (each incarnation, by uid) once, locally, and report it like a kubelet."""
    seen: set[str] = set()
    while not stop.wait(0.1):
        for job in api.objects("batch", "jobs", NS):
            if job["metadata"]["uid"] in seen:
                continue
            seen.add(job["metadata"]["uid"])
            code = run_copy_pod(api, job)
            if api.find("batch", "jobs", job["metadata"]["name"], NS) is not None:
                try:
                    finish_job(api, job, code)
                except Exception:  # the Job went (or was made again) meanwhile
                    pass


@dataclasses.dataclass
class Driver:
    close: Callable[[], None]
    channel: grpc.Channel          # the controller's CSI socket
    node_channel: grpc.Channel     # the node plugin's
    authz: RbacAuthorizer | None


def start_driver(api: FakeApiServer, tmp_path: Path, arrays: list[dict[str, Any]], *,
                 rbac: bool = True, run_jobs: bool = True) -> Driver:
    """The controller and the node plugin, as the chart runs them: two processes' worth of
    driver (mode controller, mode node) with the chart's ServiceAccounts, against `api`
    enforcing the chart's RBAC; and a stand-in kubelet for copy Jobs (unless not `run_jobs`:
    then they stay pending)."""
    tag = uuid.uuid4().hex[:8]
    authz = enforce_chart_rbac(api) if rbac else None

    def conn(sa: str) -> dict[str, str]:
        if authz is None:
            return {"kubeApi": api.url}
        return {"kubeconfig": str(service_account_kubeconfig(api, authz, sa, tmp_path / f"{sa}.kubeconfig"))}

    host = tmp_path / "host"  # hostDataDir: the controller's and the node's data, and copy checkpoints
    ctl_cfg = tmp_path / "controller.yaml"
    ctl_cfg.write_text(yaml.safe_dump({
        "store": "crd", **conn(CONTROLLER_SA), "namespace": NS, "copyImage": "csi-virtvol:test",
        "leaderElection": {"enabled": True, "leaseName": "csi-virtvol-controller"},
        "copyJob": {"serviceAccountName": COPY_SA, "hostDataDir": str(host)}, "arrays": arrays}))
    node_cfg = tmp_path / "node.yaml"
    node_cfg.write_text(yaml.safe_dump({"store": "crd", **conn(NODE_SA), "namespace": NS, "arrays": []}))
    socks = (f"/tmp/virtvol-k8s-{tag}.sock", f"/tmp/virtvol-k8s-{tag}-node.sock")
    configs = [load_config(endpoint=f"unix://{socks[0]}", data_dir=str(host / "controller"), node_id="node-1",
                           mode="controller", config_file=str(ctl_cfg)),
               load_config(endpoint=f"unix://{socks[1]}", data_dir=str(host / "node"),
                           node_id="node-1", mode="node", config_file=str(node_cfg))]
    stop, kstop = threading.Event(), threading.Event()
    servers = [threading.Thread(target=app.serve, args=(c,), kwargs={"stop": stop}, daemon=True) for c in configs]
    for t in servers:
        t.start()
    kube = threading.Thread(target=kubelet, args=(api, kstop), daemon=True)
    if run_jobs:
        kube.start()
    channels = [grpc.insecure_channel(f"unix://{s}") for s in socks]
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=30)

    def close() -> None:
        for ch in channels:
            ch.close()
        stop.set()
        kstop.set()
        for t in servers:
            t.join(timeout=30)
        if run_jobs:
            kube.join(timeout=30)

    return Driver(close=close, channel=channels[0], node_channel=channels[1], authz=authz)


@pytest.fixture
def cluster(fake_api: FakeApiServer, xfs_mount: Path, ext4_mount: Path,
            tmp_path: Path) -> Iterator[tuple[FakeApiServer, rpc.ControllerStub, grpc.Channel]]:
    tag = uuid.uuid4().hex[:8]
    d = start_driver(fake_api, tmp_path, [
        {"id": "fast", "kind": "file", "params": {"path": str(xfs_mount / f"kf-{tag}"), "capacity": "256Mi"}},
        {"id": "slow", "kind": "file", "params": {"path": str(ext4_mount / f"ks-{tag}"), "capacity": "256Mi"}}])
    try:
        yield fake_api, rpc.ControllerStub(d.channel), d.channel
    finally:
        d.close()
    assert d.authz is not None and d.authz.denied() == [], "the chart's RBAC refused the driver"


def _until(fn: Any, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except grpc.RpcError as e:
            if e.code() is not grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
        time.sleep(0.3)


def test_volume_snapshot_and_clone_on_crds(cluster: tuple[FakeApiServer, rpc.ControllerStub, grpc.Channel]) -> None:
    api, ctl, _ = cluster
    cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
        mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER), mount=pb.VolumeCapability.MountVolume())
    vol = ctl.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-1", capacity_range=pb.CapacityRange(required_bytes=320 * MiB), volume_capabilities=[cap],
        parameters={"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "default"})).volume
    arrays = {o["metadata"]["name"]: o["status"] for o in api.objects(GROUP, "storagearrays")}
    assert arrays["fast"]["identity"]["model"] == "xfs" and "internal-copy" in arrays["fast"]["abilities"]
    assert arrays["slow"]["identity"]["model"] == "ext4" and "internal-copy" not in arrays["slow"]["abilities"]
    assert arrays["fast"]["luns"] == []  # the inventory as of the last synchronisation (start-up)
    vvs = {o["spec"]["name"]: o for o in api.objects(GROUP, "virtualvolumes")}
    assert vvs["pvc-1"]["status"]["state"] == "available"
    assert [e["array"] for e in vvs["pvc-1"]["spec"]["extents"]] == ["fast", "slow"]

    for pv in api.objects(GROUP, "physicalvolumes"):  # data to copy, not only holes
        with open(pv["spec"]["address"], "r+b") as f:
            f.write(os.urandom(MiB))
    deadline = time.monotonic() + 90
    while True:
        snap = ctl.CreateSnapshot(pb.CreateSnapshotRequest(name="snapshot-1", source_volume_id=vol.volume_id,
            parameters={"csi.storage.k8s.io/volumesnapshot/name": "snap",
                        "csi.storage.k8s.io/volumesnapshot/namespace": "default"})).snapshot
        if snap.ready_to_use or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert snap.ready_to_use
    pods = api.objects("", "pods", NS)
    assert len(pods) == 1, "the ext4 extent is copied by one copy Job's pod"
    assert api.objects("batch", "jobs", NS) == [], "a copy Job goes once its result is in the pair"
    pairs = api.objects(GROUP, "volumepairs")
    assert len(pairs) == 1
    vp = pairs[0]
    assert vp["spec"]["source"] == vol.volume_id and vp["spec"]["targets"] == [snap.snapshot_id]
    assert vp["status"]["state"] == "split" and vp["status"]["progress"] == "100%"
    assert vp["status"]["methods"] == "internal,host"
    host = [e for e in vp["status"]["targets"][0]["extents"] if e["method"] == "host"]
    assert host and all(e["bytesWritten"] > 0 for e in host), "bytesWritten of host extents (issue 12 item 7)"
    assert all(e["verifyMethod"] == "blake2b-256" and e["verifyResult"] == "match" for e in host)
    reasons = {e.get("reason") for e in api.objects("events.k8s.io", "events", "default")}
    assert {"CopyStarted", "CopyComplete"} <= reasons
    assert api.find("coordination.k8s.io", "leases", "csi-virtvol-controller", NS) is not None

    clone = _until(lambda: ctl.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-2", capacity_range=pb.CapacityRange(required_bytes=320 * MiB), volume_capabilities=[cap],
        volume_content_source=pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)))).volume)
    assert clone.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert len(api.objects(GROUP, "volumepairs")) == 2

    ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=clone.volume_id))
    ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    left = [o["metadata"]["name"] for o in api.objects(GROUP, "virtualvolumes")]
    assert left == [] and api.objects(GROUP, "volumepairs") == [] and api.objects(GROUP, "physicalvolumes") == []
    print(json.dumps(vp["status"], indent=1)[:400])


def test_group_snapshot_on_crds(cluster: tuple[FakeApiServer, rpc.ControllerStub, grpc.Channel]) -> None:
    """A VolumeGroupSnapshot of a volume on each array: one VirtvolGroupSnapshot object, a
    VolumePair per member, the host-copied member by a copy Job; deleting the group removes all."""
    api, ctl, channel = cluster
    groups = rpc.GroupControllerStub(channel)
    cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
        mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER), mount=pb.VolumeCapability.MountVolume())
    vids = [ctl.CreateVolume(pb.CreateVolumeRequest(
        name=f"pvc-{a}", capacity_range=pb.CapacityRange(required_bytes=32 * MiB), volume_capabilities=[cap],
        parameters={"arrays": a})).volume.volume_id for a in ("fast", "slow")]
    req = pb.CreateVolumeGroupSnapshotRequest(name="vgs-1", source_volume_ids=vids)
    deadline = time.monotonic() + 90
    while True:
        g = groups.CreateVolumeGroupSnapshot(req).group_snapshot
        if g.ready_to_use or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert g.ready_to_use and sorted(s.source_volume_id for s in g.snapshots) == sorted(vids)
    objs = api.objects(GROUP, "virtvolgroupsnapshots")
    assert len(objs) == 1
    assert objs[0]["spec"]["name"] == "vgs-1" and sorted(objs[0]["spec"]["sources"]) == sorted(vids)
    assert objs[0]["status"]["state"] == "cut" and objs[0]["status"]["cutAt"] > 0
    pairs = {p["spec"]["targets"][0]: p for p in api.objects(GROUP, "volumepairs")}
    assert set(pairs) == {s.snapshot_id for s in g.snapshots}
    assert all(p["status"]["state"] == "split" and p["status"]["fence"] == "released" for p in pairs.values())
    assert len(api.objects("", "pods", NS)) == 1, "the ext4 member is copied by one copy Job's pod"
    assert api.objects("batch", "jobs", NS) == [], "a copy Job goes once its result is in the pair"
    groups.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id, snapshot_ids=[s.snapshot_id for s in g.snapshots]))
    assert api.objects(GROUP, "virtvolgroupsnapshots") == [] and api.objects(GROUP, "volumepairs") == []
    for v in vids:
        ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v))
    assert api.objects(GROUP, "virtualvolumes") == [] and api.objects(GROUP, "physicalvolumes") == []
