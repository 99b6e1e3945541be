"""The controller's host copies as Jobs: JobCopyRunner against the fake API server."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from csi_virtvol.copy.runner import HostCopy
from csi_virtvol.kube.copyrunner import JobCopyRunner, JobSettings
from csi_virtvol.kube.jobs import JobRunner, copy_job_name
from fakeapi import FakeApiServer

NS = "csi-virtvol"
COPY = HostCopy(job="vs-1234-1", pair="vs-1234", index=1, node="", src="/pools/a/luns/vv-1-1.img",
                src_offset=0, dst="/pools/b/luns/vs-1234-1.img", dst_offset=4096, length=1 << 20, bwlimit=0)


def until(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """fn() once it is true (the runner reads a watch's cache: it lags a little)."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def run_pod(api: FakeApiServer, job: dict[str, Any], suffix: str = "x") -> str:
    """What the Job controller and kubelet do: a pod of this incarnation of the Job, running."""
    name = f"{job['metadata']['name']}-{suffix}"
    api.put("", "pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": NS, "labels": {**job["spec"]["template"]["metadata"]["labels"],
                                                   "batch.kubernetes.io/job-name": job["metadata"]["name"],
                                                   "batch.kubernetes.io/controller-uid": job["metadata"]["uid"]}},
        "spec": {"containers": [{"name": "copy", "image": "i"}]},
        "status": {"phase": "Running", "containerStatuses": [
            {"name": "copy", "ready": True, "restartCount": 0, "image": "i", "imageID": "",
             "state": {"running": {}}}]}}, NS)
    return name


def end_pod(api: FakeApiServer, pod: str, code: int, result: dict[str, Any] | None) -> None:
    """The copy container exits with `code`; its termination message is the copy's closing event."""
    api.set_status("", "pods", pod, {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [
        {"name": "copy", "ready": False, "restartCount": 0, "image": "i", "imageID": "",
         "state": {"terminated": {"exitCode": code, "message": json.dumps(result) if result else ""}}}]}, NS)


_OPEN: list[JobCopyRunner] = []


@pytest.fixture(autouse=True)
def _close_runners() -> Any:
    yield
    while _OPEN:
        _OPEN.pop().close()


def _runner(client: Any, **kw: Any) -> JobCopyRunner:
    settings = JobSettings.from_config(
        {"serviceAccountName": "csi-virtvol-copy", "hostDataDir": "/var/lib/csi-virtvol", "backoffLimit": 2,
         "resources": {"limits": {"cpu": "2", "memory": "512Mi"}}},
        namespace=NS, image="csi-virtvol:0.1.0", node="node-1")
    r = JobCopyRunner(JobRunner(client, namespace=NS, delays=(0.05, 0.1, 0.2)), settings, **kw)
    _OPEN.append(r)
    return r


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
    pod = run_pod(fake_api, job)
    fake_api.set_pod_log(NS, pod, json.dumps({"event": "progress", "bytes_done": 4096,
                                              "bytes_total": 1 << 20}) + "\n")
    assert until(lambda: runner.poll(COPY.job).bytes_done == 4096)
    end_pod(fake_api, pod, 0, {"event": "done", "length": 1 << 20, "bytes_written": 1 << 20})
    fake_api.set_status("batch", "jobs", name, {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True"}]}, NS)
    st = until(lambda: (s := runner.poll(COPY.job)).done and s)
    assert st.done and not st.running and st.bytes_written == 1 << 20
    runner.cancel(COPY.job)
    assert fake_api.find("batch", "jobs", name, NS) is None


def test_a_failed_job_reports_why(fake_api: FakeApiServer, client: Any) -> None:
    runner = _runner(client)
    runner.start(COPY)
    name = copy_job_name("vs-1234", "vs-1234", 1)
    fake_api.set_status("batch", "jobs", name, {"failed": 3, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "too many"}]}, NS)
    st = until(lambda: next((s for s in [runner.poll(COPY.job)] if not s.running), None))
    assert not st.done and not st.running and "BackoffLimitExceeded" in st.message


def test_a_restarted_controller_finds_and_cancels_the_job(fake_api: FakeApiServer, client: Any) -> None:
    _runner(client).start(COPY)
    fresh = _runner(client)  # no memory of the first
    assert fresh.poll(COPY.job).running
    fresh.cancel(COPY.job)
    assert fake_api.find("batch", "jobs", copy_job_name("vs-1234", "vs-1234", 1), NS) is None
