"""The copy Job: pinned shape, schema-valid, and followed by JobRunner on the fake API server."""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import kubernetes_validate
import pytest

from csi_virtvol import errors
from csi_virtvol.kube.jobs import (
    CopyProgress, JobRunner, build_copy_job, copy_job_name, parse_progress,
)

from fakeapi import FakeApiServer

NS = "csi-virtvol"

ARGS: dict[str, Any] = dict(
    name="copy-p1-1-abc", namespace=NS, image="registry.example.org/csi-virtvol:0.1.0", node="node-a",
    src="/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn.x-lun-1:0:1073741824",
    dst="/var/lib/virtvol/pools/gold/l7.img:4096", pair_id="p1", target="vol-2", extent_index=1,
    resume_from="auto", bwlimit=100 << 20, service_account="csi-virtvol-copy",
    host_paths=("/dev", "/var/lib/virtvol/pools"),
)

GOLDEN_LABELS = {
    "app.kubernetes.io/name": "csi-virtvol",
    "app.kubernetes.io/component": "copy",
    "app.kubernetes.io/managed-by": "csi-virtvol",
    "virtvol.csi.example.org/pair": "p1",
    "virtvol.csi.example.org/target": "vol-2",
    "virtvol.csi.example.org/extent": "1",
}

GOLDEN: dict[str, Any] = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {
        "name": "copy-p1-1-abc",
        "namespace": NS,
        "labels": GOLDEN_LABELS,
        "annotations": {
            "virtvol.csi.example.org/pair": "p1",
            "virtvol.csi.example.org/target": "vol-2",
            "virtvol.csi.example.org/src": "/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn.x-lun-1:0:1073741824",
            "virtvol.csi.example.org/dst": "/var/lib/virtvol/pools/gold/l7.img:4096",
            "virtvol.csi.example.org/checkpoint": "",
        },
    },
    "spec": {
        "backoffLimit": 3,
        "activeDeadlineSeconds": 86400,
        "ttlSecondsAfterFinished": 3600,
        "podFailurePolicy": {"rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": "copy", "operator": "In", "values": [2, 3]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {
            "metadata": {"labels": GOLDEN_LABELS},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a"]}]}]}}},
                "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],
                "containers": [{
                    "name": "copy",
                    "image": "registry.example.org/csi-virtvol:0.1.0",
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["csi-virtvol"],
                    "args": ["copy",
                             "--src", "/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn.x-lun-1:0:1073741824",
                             "--dst", "/var/lib/virtvol/pools/gold/l7.img:4096",
                             "--resume-from", "auto", "--progress",
                             "--progress-file", "/var/lib/csi-virtvol/copy/copy-p1-1-abc.json",
                             "--result-file", "/dev/termination-log",
                             "--bwlimit", "104857600"],
                    "securityContext": {"privileged": True, "allowPrivilegeEscalation": True, "runAsUser": 0},
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                  "limits": {"cpu": "1", "memory": "256Mi"}},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "volumeMounts": [
                        {"name": "host-0", "mountPath": "/dev", "mountPropagation": "HostToContainer"},
                        {"name": "host-1", "mountPath": "/var/lib/virtvol/pools",
                         "mountPropagation": "HostToContainer"},
                        {"name": "host-2", "mountPath": "/var/lib/csi-virtvol/copy"},
                    ],
                }],
                "volumes": [
                    {"name": "host-0", "hostPath": {"path": "/dev", "type": "Directory"}},
                    {"name": "host-1", "hostPath": {"path": "/var/lib/virtvol/pools", "type": "Directory"}},
                    {"name": "host-2", "hostPath": {"path": "/var/lib/csi-virtvol/copy",
                                                    "type": "DirectoryOrCreate"}},
                ],
                "serviceAccountName": "csi-virtvol-copy",
            },
        },
    },
}


def test_golden_job() -> None:
    assert build_copy_job(**ARGS) == GOLDEN


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_job_validates(version: str) -> None:
    kubernetes_validate.validate(build_copy_job(**ARGS), version, strict=True)


def test_job_names_are_dns_labels() -> None:
    a = copy_job_name("pair-" + "x" * 200, "vol/with:odd chars", 12)
    assert len(a) <= 63 and a.startswith("copy-pair-") and a == a.lower()
    assert a != copy_job_name("pair-" + "x" * 200, "vol/with:odd chars", 13)
    with pytest.raises(errors.InvalidRequest):
        build_copy_job(**{**ARGS, "name": "Copy_1"})
    with pytest.raises(errors.InvalidRequest):
        build_copy_job(**{**ARGS, "name": "c" * 64})


def test_parse_progress() -> None:
    log = "\n".join([
        "starting copy",
        json.dumps({"event": "progress", "bytes_done": 10, "bytes_total": 100, "rate": 5}),
        "{not json",
        json.dumps({"event": "progress", "bytes_done": 60, "bytes_total": 100}),
    ])
    assert parse_progress(log) == CopyProgress(bytes_done=60, bytes_total=100)
    assert parse_progress(log + "\n" + json.dumps({"event": "error", "error": "EIO at 61"})) == \
        CopyProgress(bytes_done=60, bytes_total=100, event="error", error="EIO at 61")
    assert parse_progress("nothing") is None


def _kubelet(api: FakeApiServer, job: str, logs: list[str], final: dict[str, Any], go: threading.Event) -> None:
    """What the Job controller and kubelet would do: a pod, its log growing, then the Job's end."""
    deadline = time.monotonic() + 30
    while api.find("batch", "jobs", job, NS) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    api.put("", "pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"{job}-x1", "namespace": NS, "labels": {"batch.kubernetes.io/job-name": job}},
        "spec": {"containers": [{"name": "copy", "image": "i"}]}}, NS)
    text = ""
    for line in logs:
        text += line + "\n"
        api.set_pod_log(NS, f"{job}-x1", text)
        api.set_status("batch", "jobs", job, {"active": 1}, NS)  # a change the runner wakes on
        go.wait(30)
        go.clear()
    api.set_status("batch", "jobs", job, final, NS)


def test_runner_success_reports_progress(fake_api: FakeApiServer, client: Any) -> None:
    runner = JobRunner(client, namespace=NS)
    job = build_copy_job(**ARGS)
    logs = [json.dumps({"event": "progress", "bytes_done": n, "bytes_total": 300}) for n in (100, 200)]
    logs.append(json.dumps({"event": "done", "length": 300, "resumed_from": 0, "bytes_written": 300,
                            "bytes_zeroed": 0, "bytes_skipped": 0, "verified": False, "seconds": 1.5}))
    go = threading.Event()
    seen: list[CopyProgress] = []

    def on_progress(p: CopyProgress) -> None:
        seen.append(p)
        go.set()

    t = threading.Thread(target=_kubelet, args=(fake_api, job["metadata"]["name"], logs, {
        "succeeded": 1, "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]}, go))
    t.start()
    assert runner.start(job) == job["metadata"]["name"]
    assert runner.start(job) == job["metadata"]["name"]  # idempotent
    out = runner.wait(job["metadata"]["name"], timeout=60, poll=0.2, on_progress=on_progress)
    t.join()
    assert out.succeeded and out.reason == "Complete"
    assert out.progress == CopyProgress(bytes_done=300, bytes_total=300, event="done")
    assert [p.bytes_done for p in seen][:2] == [100, 200] and seen[-1].event == "done"
    runner.delete(job["metadata"]["name"])
    runner.delete(job["metadata"]["name"])
    assert fake_api.find("batch", "jobs", job["metadata"]["name"], NS) is None


def test_runner_failure_reason(fake_api: FakeApiServer, client: Any) -> None:
    runner = JobRunner(client, namespace=NS)
    job = build_copy_job(**ARGS)
    logs = [json.dumps({"event": "progress", "bytes_done": 50, "bytes_total": 300}),
            json.dumps({"event": "error", "error": "read /dev/sdx at 52428800: Input/output error"})]
    go = threading.Event()
    t = threading.Thread(target=_kubelet, args=(fake_api, job["metadata"]["name"], logs, {
        "failed": 4, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                     "message": "Job has reached the specified backoff limit"}]}, go))
    t.start()
    runner.start(job)
    out = runner.wait(job["metadata"]["name"], timeout=60, poll=0.2, on_progress=lambda p: go.set())
    t.join()
    assert not out.succeeded and out.reason == "BackoffLimitExceeded"
    assert "Input/output error" in out.message and "backoff limit" in out.message
    assert out.progress is not None and out.progress.bytes_done == 50


def test_runner_refuses_a_foreign_job(fake_api: FakeApiServer, client: Any) -> None:
    runner = JobRunner(client, namespace=NS)
    runner.start(build_copy_job(**ARGS))
    with pytest.raises(errors.Conflict):
        runner.start(build_copy_job(**{**ARGS, "pair_id": "p2"}))
    with pytest.raises(errors.NotFound):
        runner.wait("no-such-job", timeout=5)
