"""The fake API server's injected faults and Job retries (issue 12), through the real client."""
from __future__ import annotations

from typing import Any

import kubernetes.client as k8s
import pytest
import urllib3

from fakeapi import FakeApiServer

NS = "csi-virtvol"


def _pod(api: FakeApiServer, name: str) -> None:
    api.put("", "pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
                         "spec": {"containers": [{"name": "copy", "image": "i"}]}}, NS)


def test_injected_5xx_and_connection_errors_on_pod_logs(fake_api: FakeApiServer, client: Any) -> None:
    core = k8s.CoreV1Api(client)
    _pod(fake_api, "p")
    fake_api.set_pod_log(NS, "p", "one\ntwo\nthree\n")
    fake_api.inject_fault("GET", r"/pods/p/log$", code=500, times=1)
    with pytest.raises(k8s.ApiException) as e:
        core.read_namespaced_pod_log("p", NS)
    assert e.value.status == 500 and "connection refused" in str(e.value.body)
    fake_api.inject_fault("GET", r"/pods/p/log$", drop=True, times=10)  # more than urllib3's own retries
    with pytest.raises((urllib3.exceptions.HTTPError, OSError)):
        core.read_namespaced_pod_log("p", NS, _request_timeout=5)
    fake_api.clear_faults()
    assert core.read_namespaced_pod_log("p", NS) == "one\ntwo\nthree\n"
    assert core.read_namespaced_pod_log("p", NS, tail_lines=1) == "three\n"
    assert core.read_namespaced_pod_log("p", NS, tail_lines=2, limit_bytes=5) == "two\nt"


def test_a_job_retried_under_the_same_name_gets_a_new_uid(fake_api: FakeApiServer, client: Any) -> None:
    batch = k8s.BatchV1Api(client)
    body = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": NS},
            "spec": {"template": {"spec": {"restartPolicy": "Never",
                                           "containers": [{"name": "copy", "image": "i"}]}}}}
    first = batch.create_namespaced_job(NS, body)
    _pod(fake_api, "j-old")
    again = fake_api.recreate_job("j", NS)
    assert again["metadata"]["uid"] != first.metadata.uid and again["metadata"]["name"] == "j"
    assert fake_api.find("", "pods", "j-old", NS) is not None, "the old Job's pods are still there"


def test_end_watches_closes_open_watches(fake_api: FakeApiServer, client: Any) -> None:
    """What an API server restart does to its watches: each open stream ends at once, cleanly,
    long before its timeoutSeconds; a new watch is served as usual."""
    import threading
    import time

    import kubernetes.watch

    core = k8s.CoreV1Api(client)
    ended = threading.Event()
    seen: list[str] = []

    def follow() -> None:
        for ev in kubernetes.watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=60):
            seen.append(ev["object"].metadata.name)
        ended.set()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    _pod(fake_api, "before")
    deadline = time.monotonic() + 10
    while "before" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == ["before"] and not ended.is_set()
    fake_api.end_watches()
    assert ended.wait(5), "the watch is still open"
    again = kubernetes.watch.Watch()
    for ev in again.stream(core.list_namespaced_pod, NS, timeout_seconds=5):
        assert ev["object"].metadata.name == "before"
        again.stop()


def test_a_lost_answer_happened_all_the_same(fake_api: FakeApiServer, client: Any) -> None:
    """inject_fault(lost=True): the server carries the write out, the client gets no answer."""
    batch = k8s.BatchV1Api(client)
    body = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": NS},
            "spec": {"template": {"spec": {"restartPolicy": "Never",
                                           "containers": [{"name": "copy", "image": "i"}]}}}}
    fake_api.inject_fault("POST", r"/jobs$", lost=True, times=10)  # more than urllib3's own retries
    with pytest.raises((urllib3.exceptions.HTTPError, OSError)):
        batch.create_namespaced_job(NS, body, _request_timeout=5)
    assert fake_api.find("batch", "jobs", "j", NS) is not None, "the write happened"
    fake_api.clear_faults()
    with pytest.raises(k8s.ApiException) as e:
        batch.create_namespaced_job(NS, body)
    assert e.value.status == 409
