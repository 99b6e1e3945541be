"""The controller's host copies as Jobs: JobCopyRunner against the fake API server."""
from __future__ import annotations

import dataclasses
import json
import threading
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


def _started(fake_api: FakeApiServer, runner: JobCopyRunner, copy: HostCopy = COPY) -> dict[str, Any]:
    runner.start(copy)
    job = fake_api.find("batch", "jobs", copy_job_name(copy.pair, copy.pair, copy.index), NS)
    assert job is not None
    return job


def test_transient_api_errors_are_retried_never_a_failure(fake_api: FakeApiServer, client: Any) -> None:
    """Issue 12 item 2: one 500 from pods/log (the kubelet unreachable) failed a copy whose pod succeeded."""
    runner = _runner(client, progress_seconds=0.0)
    job = _started(fake_api, runner)
    pod = run_pod(fake_api, job)
    fake_api.set_pod_log(NS, pod, json.dumps({"event": "progress", "bytes_done": 8192, "bytes_total": 1 << 20}))
    assert until(lambda: runner._runner.pods is not None and runner._runner.pods.get(pod) is not None)
    fake_api.inject_fault("GET", r"/pods/[^/]+/log$", code=500, times=2)
    fake_api.inject_fault("GET", r"/pods/[^/]+/log$", drop=True, times=1)
    fake_api.inject_fault("GET", r"/pods/[^/]+/log$", code=429, times=1)
    st = runner.poll(COPY.job)
    assert st.running and not st.done and st.bytes_done == 8192, st
    assert fake_api.faults_left() == 0
    # the API server is down for longer than the retries last: still running, not failed
    fake_api.inject_fault("GET", r"/pods/[^/]+/log$", code=503, times=100)
    st = runner.poll(COPY.job)
    assert st.running and not st.done, st
    fake_api.clear_faults()
    end_pod(fake_api, pod, 0, {"event": "done", "length": 1 << 20, "bytes_written": 4096, "verified": True})
    fake_api.set_status("batch", "jobs", job["metadata"]["name"], {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True"}]}, NS)
    fake_api.inject_fault("GET", r"/jobs/", code=500, times=3)  # a direct read of the Job, if one is made
    st = until(lambda: next((s for s in [runner.poll(COPY.job)] if s.done), None))
    assert st is not None and st.done and st.bytes_written == 4096 and st.result["verified"] is True


def test_reading_progress_is_cheap(fake_api: FakeApiServer, client: Any) -> None:
    """Issue 12 item 5: ~3 requests every 0.28 s per running copy (GET job, LIST pods, the whole log).
    Now: the watches' caches, and the last log line at most every progress_seconds."""
    runner = _runner(client, progress_seconds=1.0)
    job = _started(fake_api, runner)
    pod = run_pod(fake_api, job)
    fake_api.set_pod_log(NS, pod, "".join(json.dumps({"event": "progress", "bytes_done": i * 4096,
                                                      "bytes_total": 1 << 20}) + "\n" for i in range(1, 500)))
    assert until(lambda: runner.poll(COPY.job).bytes_done == 499 * 4096)
    before = len(fake_api.requests)
    t0 = time.monotonic()
    polls = 0
    while time.monotonic() - t0 < 2.5:
        assert runner.poll(COPY.job).running
        polls += 1
        time.sleep(0.05)
    made = fake_api.requests[before:]
    logs = [p for m, p in made if p.endswith("/log")]
    assert polls > 30 and len(logs) <= 3, made
    assert [r for r in made if not r[1].endswith("/log")] == [], "no GET of the Job nor LIST of pods per poll"
    # and a log read is of the last line only
    assert runner._runner.last_line(pod) == json.dumps({"event": "progress", "bytes_done": 499 * 4096,
                                                        "bytes_total": 1 << 20}) + "\n"


def test_a_job_retried_under_the_same_name(fake_api: FakeApiServer, client: Any) -> None:
    """A Job deleted and made again under the same name (a new uid) is not judged by the old one's
    pods; a Job of a previous attempt (another checkpoint identity) is replaced, not adopted."""
    runner = _runner(client)
    first = dataclasses.replace(COPY, checkpoint_id="vs-1234/b:l@1.0")
    job = _started(fake_api, runner, first)
    old_pod = run_pod(fake_api, job, "old")
    end_pod(fake_api, old_pod, 0, {"event": "done", "length": 1 << 20, "bytes_written": 1 << 20,
                                   "checkpoint_id": first.checkpoint_id})
    again = fake_api.recreate_job(job["metadata"]["name"], NS)
    assert again["metadata"]["uid"] != job["metadata"]["uid"]
    assert until(lambda: runner._runner.jobs is not None and (runner._runner.jobs.get(job["metadata"]["name"])
                 or {}).get("metadata", {}).get("uid") == again["metadata"]["uid"])
    time.sleep(0.3)
    st = runner.poll(COPY.job)
    assert st.running and not st.done, "the old incarnation's pod is not this Job's result"

    second = dataclasses.replace(COPY, checkpoint_id="vs-1234/b:l@2.0")
    runner.start(second)
    now = fake_api.find("batch", "jobs", job["metadata"]["name"], NS)
    assert now is not None and now["metadata"]["uid"] not in (job["metadata"]["uid"], again["metadata"]["uid"])
    assert now["metadata"]["annotations"]["virtvol.csi.example.org/checkpoint"] == second.checkpoint_id
    args = now["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--checkpoint-id") + 1] == second.checkpoint_id


def test_a_verification_mismatch_is_reported(fake_api: FakeApiServer, client: Any) -> None:
    runner = _runner(client)
    job = _started(fake_api, runner)
    pod = run_pod(fake_api, job)
    end_pod(fake_api, pod, 3, {"event": "error", "error": "verify: differs", "offset": 0, "mismatch": True})
    st = until(lambda: next((s for s in [runner.poll(COPY.job)] if s.mismatch), None))
    assert st is not None and st.mismatch and not st.done and not st.running


def test_tolerations_and_image_pull_secrets_are_honoured(fake_api: FakeApiServer, client: Any) -> None:
    settings = JobSettings.from_config(
        {"hostDataDir": "/var/lib/csi-virtvol", "imagePullSecrets": [{"name": "regcred"}],
         "tolerations": [{"key": "storage", "operator": "Equal", "value": "yes", "effect": "NoExecute"}]},
        namespace=NS, image="csi-virtvol:0.1.0", node="node-1")
    runner = JobCopyRunner(JobRunner(client, namespace=NS), settings)
    _OPEN.append(runner)
    job = _started(fake_api, runner)
    pod = job["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["tolerations"] == [{"key": "storage", "operator": "Equal", "value": "yes", "effect": "NoExecute"}]


def test_a_finished_step_deletes_its_job(fake_api: FakeApiServer, client: Any) -> None:
    """Item 7: a deleted clone's copy Jobs stayed until their TTL; a step's Job goes once its result
    is in the pair."""
    runner = _runner(client)
    job = _started(fake_api, runner)
    runner.finished(COPY.job)
    assert fake_api.find("batch", "jobs", job["metadata"]["name"], NS) is None


def test_a_failed_job_is_started_again_not_adopted(fake_api: FakeApiServer, client: Any) -> None:
    """The copy loop restarts a copy whose Job failed (its pods' retries spent) "from its
    checkpoint": start() must make the Job again under the same attempt, so a new pod resumes from
    the checkpoint on the node.  It took the failed Job as its own, so each restart was a no-op
    and the pair failed (found by the copy matrix with backoffLimit 0)."""
    runner = _runner(client)
    copy = dataclasses.replace(COPY, checkpoint_id="vs-1234/b:l@1.0")
    job = _started(fake_api, runner, copy)
    name = job["metadata"]["name"]
    fake_api.set_status("batch", "jobs", name, {"failed": 3, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "too many"}]}, NS)
    st = until(lambda: next((s for s in [runner.poll(copy.job)] if not s.running), None))
    assert st is not None and not st.done and "BackoffLimitExceeded" in st.message
    runner.start(copy)
    again = fake_api.find("batch", "jobs", name, NS)
    assert again is not None and again["metadata"]["uid"] != job["metadata"]["uid"], "the failed Job was adopted"
    assert again["metadata"]["annotations"]["virtvol.csi.example.org/checkpoint"] == copy.checkpoint_id
    st = runner.poll(copy.job)
    assert st.running and not st.done, f"the old incarnation's failure is still reported: {st}"
    runner.start(copy)  # a running Job of the same attempt is ours
    assert fake_api.find("batch", "jobs", name, NS)["metadata"]["uid"] == again["metadata"]["uid"]  # type: ignore[index]


def test_a_restarted_controller_waits_for_its_pod_cache_before_judging(fake_api: FakeApiServer, client: Any) -> None:
    """A controller restarted after its copy's Job completed polls before its pods watch has
    listed: a Complete Job without a known pod is no result yet (the copy is taken as running),
    not a copy done without a result, which verification refuses and copies again from 0."""
    first = _runner(client)
    copy = dataclasses.replace(COPY, checkpoint_id="vs-1234/b:l@1.0")
    job = _started(fake_api, first, copy)
    pod = run_pod(fake_api, job)
    end_pod(fake_api, pod, 0, {"event": "done", "length": 1 << 20, "bytes_written": 1 << 20,
                               "checkpoint_id": copy.checkpoint_id, "verified": True, "verify": "blake2b-256"})
    fake_api.set_status("batch", "jobs", job["metadata"]["name"], {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True"}]}, NS)
    _OPEN.remove(first)
    threading.Thread(target=first.close, daemon=True).start()  # the controller is gone
    fake_api.end_watches()
    fake_api.inject_fault("GET", r"/namespaces/csi-virtvol/pods$", code=503, times=1000)  # pods cannot be listed
    fresh = _runner(client)
    fresh.start(copy)  # the restarted copy loop takes its Job over
    for _ in range(10):
        st = fresh.poll(copy.job)
        assert not st.done and st.running, st
        time.sleep(0.05)
    fake_api.clear_faults()
    st = until(lambda: (s := fresh.poll(copy.job)).done and s, timeout=15)
    assert st and st.result is not None and st.result["verified"] is True, st


def test_stop_deletes_the_job_and_returns_once_its_pod_no_longer_reads(fake_api: FakeApiServer, client: Any) -> None:
    """stop() (a copy moving onto a cut's view mid-way) keeps the checkpoint, which lives on the
    node, and returns only when the old pod has ended: a pod in its grace period still reads the
    source, which the node is about to let the application write."""
    import threading

    runner = _runner(client)
    job = _started(fake_api, runner)
    pod = run_pod(fake_api, job)
    assert until(lambda: runner._runner.pods is not None and runner._runner.pods.get(pod) is not None)
    stopped = threading.Event()
    t = threading.Thread(target=lambda: (runner.stop(COPY.job), stopped.set()), daemon=True)
    t.start()
    assert until(lambda: fake_api.find("batch", "jobs", job["metadata"]["name"], NS) is None)
    assert not stopped.wait(1.0), "stop() returned while the old pod still ran"
    end_pod(fake_api, pod, 137, None)   # the kubelet killed it
    assert stopped.wait(10), "stop() did not return once the pod ended"
    t.join(5)


def test_closing_the_runner_does_not_wait_out_its_open_watches(fake_api: FakeApiServer, client: Any) -> None:
    """A controller's stop waited for each informer's watch to end on the server (its timeout):
    about 20 s per stop.  Closing wakes them."""
    runner = _runner(client)
    _started(fake_api, runner)
    assert until(lambda: runner._runner.pods is not None and runner._runner.pods.synced.is_set())
    time.sleep(0.3)  # the watches are open and blocked on the server
    _OPEN.remove(runner)
    t0 = time.monotonic()
    runner.close()
    took = time.monotonic() - t0
    assert took < 3, f"closing took {took:.1f} s"
