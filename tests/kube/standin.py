"""What a cluster does with copy Jobs, played on this host against the fake API server.

`JobCluster` is the Job controller, one node's kubelet and the garbage collector, for the Jobs
of one namespace, as far as copy Jobs need them:

* Job controller: a pod per Job at a time (``restartPolicy: Never``); a pod that fails makes
  another one (same Job, same name, new pod) until ``backoffLimit``; an exit code that the Job's
  ``podFailurePolicy`` names (FailJob) fails the Job at once; a succeeded pod completes it.  Its
  status counters (active/succeeded/failed) and conditions are written as the real one does.
* kubelet: each pod's container command runs here as a process, with the Job's hostPath
  directories; its stdout is the pod's log as it is printed (so progress can be read while it
  runs), its ``terminationMessagePath`` is redirected to a file whose text becomes the container's
  termination message, and a process killed by a signal ends with 128 + the signal (137 for
  SIGKILL), as a container's does.  A pod that is deleted has its process stopped (SIGTERM, then
  SIGKILL after the grace period).
* garbage collector: pods are owned by their Job (ownerReferences); once the Job is gone
  (deleted with propagationPolicy Background) its pods are deleted too.

Hooks for the crash/retry matrix (tests/kube/test_copy_matrix.py): `pod_env` gives the first pod
(of the first Job) extra environment (``VIRTVOL_FAILPOINTS`` kills or fails it at a step),
`hold` keeps that pod from starting until it is set, and `on_output` / `on_exit` are called with
each line a pod prints and before a pod's end is reported.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakeapi import ApiError, FakeApiServer

Obj = dict[str, Any]
GRACE = 2.0  # seconds between SIGTERM and SIGKILL of a deleted pod's process


@dataclass
class PodRun:
    job: str
    job_uid: str
    name: str
    attempt: int
    proc: subprocess.Popen[str] | None = None
    code: int | None = None
    result: str = ""
    deleted: bool = False


@dataclass
class _JobState:
    obj: Obj
    failed: int = 0
    active: PodRun | None = None
    finished: bool = False
    pods: list[PodRun] = field(default_factory=list)


class JobCluster:
    def __init__(self, api: FakeApiServer, namespace: str, *, pod_env: dict[str, str] | None = None,
                 hold: threading.Event | None = None,
                 on_output: Callable[[PodRun, str], None] | None = None,
                 on_exit: Callable[[PodRun], None] | None = None) -> None:
        self.api = api
        self.ns = namespace
        self.pod_env = pod_env or {}
        self.hold = hold
        self.on_output = on_output
        self.on_exit = on_exit
        self.jobs: dict[str, _JobState] = {}   # by Job uid: every incarnation seen
        self.runs: list[PodRun] = []           # every pod run, in order
        self.errors: list[BaseException] = []  # what went wrong in the stand-in itself
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop = threading.Thread(target=self._run, name="standin-cluster", daemon=True)

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> JobCluster:
        self._loop.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._loop.join(timeout=10)
        for run in list(self.runs):
            self._kill(run)
        for t in list(self._threads):
            t.join(timeout=10)

    # -- the loop --------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self._step()
            except Exception as e:  # a broken stand-in must fail the test, not hang it
                self.errors.append(e)

    def _step(self) -> None:
        live = {j["metadata"]["uid"]: j for j in self.api.objects("batch", "jobs", self.ns)}
        with self._lock:
            for uid, job in live.items():
                if uid not in self.jobs:
                    self.jobs[uid] = _JobState(obj=job)
            for uid, st in self.jobs.items():
                if uid in live and not st.finished and st.active is None:
                    if self.hold is not None and not self.hold.is_set() and not self.runs:
                        continue
                    run = PodRun(job=st.obj["metadata"]["name"], job_uid=uid, attempt=len(st.pods),
                                 name=f"{st.obj['metadata']['name'][:50]}-{uid[:5]}-{len(st.pods)}")
                    st.active = run
                    st.pods.append(run)
                    self.runs.append(run)
                    t = threading.Thread(target=self._pod, args=(st, run), name=f"pod-{run.name}", daemon=True)
                    self._threads.append(t)
                    t.start()
        # the garbage collector: pods whose owner Job is gone go too, and the kubelet stops them
        for pod in self.api.objects("", "pods", self.ns):
            owners = [o["uid"] for o in pod["metadata"].get("ownerReferences") or [] if o.get("kind") == "Job"]
            if owners and not any(o in live for o in owners):
                with self._lock:
                    run = next((r for r in self.runs if r.name == pod["metadata"]["name"]), None)
                if run is not None:
                    run.deleted = True
                    self._kill(run)
                try:
                    self.api.delete(self.api._res("", "pods"), self.ns, pod["metadata"]["name"], None)
                except ApiError as e:
                    if e.code != 404:
                        raise

    # -- one pod ---------------------------------------------------------------

    def _pod(self, st: _JobState, run: PodRun) -> None:
        try:
            self._pod_body(st, run)
        except Exception as e:
            self.errors.append(e)
        finally:
            with self._lock:
                if st.active is run:
                    st.active = None

    def _pod_body(self, st: _JobState, run: PodRun) -> None:
        job = st.obj
        spec = job["spec"]["template"]["spec"]
        c = spec["containers"][0]
        for v in spec["volumes"]:
            path = Path(v["hostPath"]["path"])
            if v["hostPath"].get("type") == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            elif not path.is_dir():
                raise AssertionError(f"hostPath {path} of {run.name} is not a directory")
        labels = {**job["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-name": run.job,
                  "batch.kubernetes.io/controller-uid": run.job_uid}
        self.api.put("", "pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": run.name, "namespace": self.ns, "labels": labels,
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": run.job, "uid": run.job_uid,
                                 "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"containers": [{"name": c["name"], "image": c["image"]}]},
            "status": {"phase": "Running", "containerStatuses": [{
                "name": c["name"], "ready": True, "restartCount": 0, "image": c["image"], "imageID": "",
                "state": {"running": {}}}]}}, self.ns)
        self._job_status(st, active=1)
        env = dict(os.environ)
        env.pop("VIRTVOL_FAILPOINTS", None)
        if run is self.runs[0]:
            env.update(self.pod_env)
        fd, term = tempfile.mkstemp(prefix="termination-log-")
        os.close(fd)
        try:
            args = [term if a == c["terminationMessagePath"] else a for a in c["args"]]
            assert c["command"] == ["csi-virtvol"]
            run.proc = subprocess.Popen([sys.executable, "-m", "csi_virtvol", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
            log = ""
            assert run.proc.stdout is not None
            for line in run.proc.stdout:
                log += line
                try:
                    self.api.set_pod_log(self.ns, run.name, log)
                except ApiError:
                    pass
                if self.on_output is not None:
                    self.on_output(run, line)
            err = run.proc.stderr.read() if run.proc.stderr is not None else ""
            rc = run.proc.wait()
            run.code = 128 - rc if rc < 0 else rc
            run.result = Path(term).read_text()
            if run.code != 0 and not run.result:  # terminationMessagePolicy: FallbackToLogsOnError
                run.result = (log + err)[-4096:]
        finally:
            os.unlink(term)
            for s in (run.proc.stdout, run.proc.stderr) if run.proc is not None else ():
                if s is not None:
                    s.close()
        if run.deleted or self.api.find("", "pods", run.name, self.ns) is None:
            return  # deleted while it ran: nothing to report, no one to report to
        if self.on_exit is not None:
            self.on_exit(run)
        self.api.set_status("", "pods", run.name, {
            "phase": "Succeeded" if run.code == 0 else "Failed",
            "containerStatuses": [{"name": c["name"], "ready": False, "restartCount": 0, "image": c["image"],
                                   "imageID": "", "state": {"terminated": {
                                       "exitCode": run.code, "message": run.result[-4096:]}}}]}, self.ns)
        self._judge(st, run)

    def _judge(self, st: _JobState, run: PodRun) -> None:
        """The Job controller's answer to a pod's end."""
        job = st.obj
        if run.code == 0:
            st.finished = True
            self._job_status(st, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
            return
        codes: list[int] = []
        for rule in (job["spec"].get("podFailurePolicy") or {}).get("rules") or []:
            on = rule.get("onExitCodes")
            if rule.get("action") == "FailJob" and on and on.get("operator") == "In":
                codes += [int(x) for x in on.get("values") or []]
        st.failed += 1
        if run.code in codes:
            st.finished = True
            self._job_status(st, conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                              "message": f"container copy exited with {run.code}"}])
        elif st.failed > int(job["spec"].get("backoffLimit", 6)):
            st.finished = True
            self._job_status(st, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                              "message": "Job has reached the specified backoff limit"}])
        else:
            self._job_status(st)  # the next pod is made by the loop

    def _job_status(self, st: _JobState, *, active: int = 0, succeeded: int = 0,
                    conditions: list[Obj] | None = None) -> None:
        status: Obj = {k: v for k, v in (("active", active), ("succeeded", succeeded), ("failed", st.failed)) if v}
        if conditions:
            status["conditions"] = conditions
        try:
            cur = self.api.find("batch", "jobs", st.obj["metadata"]["name"], self.ns)
            if cur is None or cur["metadata"]["uid"] != st.obj["metadata"]["uid"]:
                return  # deleted or made again meanwhile
            self.api.set_status("batch", "jobs", st.obj["metadata"]["name"], status, self.ns)
        except ApiError as e:
            if e.code != 404:
                raise

    def _kill(self, run: PodRun) -> None:
        p = run.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=GRACE)
        except subprocess.TimeoutExpired:
            p.kill()

    # -- for assertions ----------------------------------------------------------

    def incarnations(self) -> int:
        with self._lock:
            return len(self.jobs)

    def idle(self) -> bool:
        """No pod process is running."""
        with self._lock:
            return all(r.proc is None or r.proc.poll() is not None for r in self.runs) and \
                all(st.active is None for st in self.jobs.values())


def wait_for(fn: Callable[[], Any], *, timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
