"""The controller's host copies as Jobs: JobCopyRunner against the fake API server."""
from __future__ import annotations

import json
from typing import Any

from csi_virtvol.copy.runner import HostCopy
from csi_virtvol.kube.copyrunner import JobCopyRunner, JobSettings
from csi_virtvol.kube.jobs import JobRunner, copy_job_name
from fakeapi import FakeApiServer

NS = "csi-virtvol"
COPY = HostCopy(job="vs-1234-1", pair="vs-1234", index=1, node="", src="/pools/a/luns/vv-1-1.img",
                src_offset=0, dst="/pools/b/luns/vs-1234-1.img", dst_offset=4096, length=1 << 20, bwlimit=0)


def _runner(client: Any) -> JobCopyRunner:
    settings = JobSettings.from_config(
        {"serviceAccountName": "csi-virtvol-copy", "hostDataDir": "/var/lib/csi-virtvol", "backoffLimit": 2,
         "resources": {"limits": {"cpu": "2", "memory": "512Mi"}}},
        namespace=NS, image="csi-virtvol:0.1.0", node="node-1")
    return JobCopyRunner(JobRunner(client, namespace=NS), settings)


def test_a_step_becomes_a_pinned_job_and_is_followed_to_the_end(fake_api: FakeApiServer, client: Any) -> None:
    runner = _runner(client)
    runner.start(COPY)
    runner.start(COPY)  # a resumed controller takes its own Job over
    name = copy_job_name("vs-1234", "vs-1234", 1)
    job = fake_api.find("batch", "jobs", name, NS)
    assert job is not None
    pod = job["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[:5] == ["copy", "--src", "/pools/a/luns/vv-1-1.img:0:1048576", "--dst", "/pools/b/luns/vs-1234-1.img:4096"]
    assert "--resume-from" in args and args[args.index("--resume-from") + 1] == "auto"
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["node-1"]
    mounted = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/dev", "/pools/a/luns", "/pools/b/luns", "/var/lib/csi-virtvol/copy"} <= mounted
    assert pod["serviceAccountName"] == "csi-virtvol-copy" and pod["automountServiceAccountToken"] is False
    assert job["spec"]["backoffLimit"] == 2
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "512Mi"}

    st = runner.poll(COPY.job)
    assert st.running and not st.done
    fake_api.put("", "pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"{name}-x", "namespace": NS, "labels": {"batch.kubernetes.io/job-name": name}},
        "spec": {"containers": [{"name": "copy", "image": "i"}]}}, NS)
    fake_api.set_pod_log(NS, f"{name}-x", json.dumps({"event": "progress", "bytes_done": 4096,
                                                      "bytes_total": 1 << 20}) + "\n")
    assert runner.poll(COPY.job).bytes_done == 4096
    fake_api.set_status("batch", "jobs", name, {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True"}]}, NS)
    st = runner.poll(COPY.job)
    assert st.done and not st.running
    runner.cancel(COPY.job)
    assert fake_api.find("batch", "jobs", name, NS) is None


def test_a_failed_job_reports_why(fake_api: FakeApiServer, client: Any) -> None:
    runner = _runner(client)
    runner.start(COPY)
    name = copy_job_name("vs-1234", "vs-1234", 1)
    fake_api.set_status("batch", "jobs", name, {"failed": 3, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "too many"}]}, NS)
    st = runner.poll(COPY.job)
    assert not st.done and not st.running and "BackoffLimitExceeded" in st.message


def test_a_restarted_controller_finds_and_cancels_the_job(fake_api: FakeApiServer, client: Any) -> None:
    _runner(client).start(COPY)
    fresh = _runner(client)  # no memory of the first
    assert fresh.poll(COPY.job).running
    fresh.cancel(COPY.job)
    assert fake_api.find("batch", "jobs", copy_job_name("vs-1234", "vs-1234", 1), NS) is None
