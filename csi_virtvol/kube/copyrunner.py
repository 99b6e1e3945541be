"""Host-copy steps as Kubernetes Jobs: the CopyRunner the controller uses on a cluster.

Each step is one Job built by `jobs.build_copy_job`, pinned to a node that
reaches both LUNs, running `csi-virtvol copy --resume-from auto` with its
checkpoint in a hostPath directory, so a retried pod continues where the
last one stopped; the checkpoint carries the attempt's identity, so a Job of
another attempt (same name) never resumes from it.

Following a copy is cheap: the Jobs and pods are followed by one watch each
for the whole process (JobRunner.follow); the copy's result is its
container's termination message, in the pod's status; progress while it runs
is the last line of its log, read at most every `progress_seconds`.  Only the
pod's own exit decides the copy's result: an API error is retried, and while
the API server cannot answer the copy is taken as still running.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from csi_virtvol import errors
from csi_virtvol.copy.cli import EXIT_MISMATCH
from csi_virtvol.copy.runner import HostCopy, JobStatus, closing_event
from csi_virtvol.kube import jobs

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSettings:
    namespace: str
    image: str
    default_node: str                 # where to run when no array is pinned to a node
    service_account: str = ""
    image_pull_policy: str = "IfNotPresent"
    backoff_limit: int = 3
    ttl_seconds_after_finished: int = 3600
    active_deadline_seconds: int = 24 * 3600
    priority_class: str = ""
    state_dir: str = jobs.STATE_DIR
    labels: Mapping[str, str] = field(default_factory=dict)
    resources: Mapping[str, Any] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] | None = None  # None: tolerate every NoSchedule taint
    image_pull_secrets: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_config(cls, doc: Mapping[str, Any], *, namespace: str, image: str, node: str) -> "JobSettings":
        res = doc.get("resources") or {}
        return cls(namespace=namespace, image=image, default_node=node,
                   service_account=str(doc.get("serviceAccountName", "")),
                   image_pull_policy=str(doc.get("imagePullPolicy", "IfNotPresent")),
                   backoff_limit=int(doc.get("backoffLimit", 3)),
                   ttl_seconds_after_finished=int(doc.get("ttlSecondsAfterFinished", 3600)),
                   active_deadline_seconds=int(doc.get("activeDeadlineSeconds", 24 * 3600)),
                   priority_class=str(doc.get("priorityClassName", "")),
                   state_dir=os.path.join(str(doc.get("hostDataDir", "/var/lib/csi-virtvol")), "copy"),
                   labels={str(k): str(v) for k, v in (doc.get("labels") or {}).items()},
                   resources=res,
                   tolerations=(tuple(dict(t) for t in doc["tolerations"])
                                if doc.get("tolerations") is not None else None),
                   image_pull_secrets=tuple({"name": x} if isinstance(x, str) else dict(x)
                                            for x in doc.get("imagePullSecrets") or ()))


def job_name(job: str) -> str:
    """The Job's name from the step's "<pair>-<index>": the same after a restart."""
    pair, _, index = job.rpartition("-")
    return jobs.copy_job_name(pair, pair, int(index))


def job_for(copy: HostCopy, s: JobSettings, *, owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Job the controller makes for one host-copy step: always this template (the chart's
    ValidatingAdmissionPolicy admits nothing else from the controller)."""
    req = (s.resources.get("requests") or {})
    lim = (s.resources.get("limits") or {})
    return jobs.build_copy_job(
        name=job_name(copy.job), namespace=s.namespace, image=s.image,
        node=copy.node or s.default_node,
        src=f"{copy.src}:{copy.src_offset}:{copy.length}", dst=f"{copy.dst}:{copy.dst_offset}",
        pair_id=copy.pair, target=copy.pair, extent_index=copy.index, bwlimit=copy.bwlimit,
        verify=copy.verify, only_changed=copy.only_changed, checksums=copy.checksums,
        checkpoint_id=copy.checkpoint_id,
        service_account=s.service_account,
        host_paths=tuple(dict.fromkeys(["/dev", os.path.dirname(copy.src), os.path.dirname(copy.dst)])),
        state_dir=s.state_dir,
        cpu_request=str(req.get("cpu", "100m")), cpu_limit=str(lim.get("cpu", "1")),
        memory_request=str(req.get("memory", "64Mi")), memory_limit=str(lim.get("memory", "256Mi")),
        backoff_limit=s.backoff_limit, ttl_seconds_after_finished=s.ttl_seconds_after_finished,
        active_deadline_seconds=s.active_deadline_seconds,
        image_pull_policy=s.image_pull_policy, priority_class=s.priority_class,
        labels=s.labels, tolerations=s.tolerations, image_pull_secrets=s.image_pull_secrets, owner=owner)


class JobCopyRunner:
    """`owner_of(pair_id)`: the ownerReference each Job gets (jobs.JobRunner.pair_owner on a
    cluster, so that a Job goes with its VolumePair); None makes Jobs with no owner."""

    def __init__(self, runner: jobs.JobRunner, settings: JobSettings, *, progress_seconds: float = 2.0,
                 owner_of: Callable[[str], Mapping[str, Any]] | None = None) -> None:
        self._runner = runner
        self._owner_of = owner_of
        self._s = settings
        self._progress_seconds = progress_seconds
        self._want: dict[str, str] = {}                  # step -> the checkpoint id of the attempt started
        self._tail: dict[str, tuple[float, int]] = {}    # step -> (when its log was last read, bytes done)
        runner.follow()

    @staticmethod
    def _name(job: str) -> str:
        return job_name(job)

    def start(self, copy: HostCopy) -> None:
        if not self._s.image:
            raise errors.PreconditionFailed("no copy image is configured (copyImage / VIRTVOL_IMAGE)")
        body = job_for(copy, self._s, owner=self._owner_of(copy.pair) if self._owner_of is not None else None)
        self._runner.start(body)
        self._want[copy.job] = copy.checkpoint_id

    def poll(self, job: str) -> JobStatus:
        try:
            return self._poll(job, self._name(job))
        except errors.BackendUnavailable as e:  # not an answer about the copy: it goes on
            log.warning("copy %s: %s; taking it as still running", job, e)
            return JobStatus(running=True, done=False, bytes_done=self._tail.get(job, (0.0, 0))[1],
                             message=str(e))

    def _poll(self, job: str, name: str) -> JobStatus:
        jobs_cache, pods_cache = self._runner.jobs, self._runner.pods
        assert jobs_cache is not None and pods_cache is not None
        obj = jobs_cache.get(name)
        if obj is None:  # not (yet) seen by the watch: ask once
            obj = self._runner.get(name)
            if obj is None:
                return JobStatus(running=False, done=False, bytes_done=0, message=f"job {name} is gone")
            jobs_cache.put(obj)
        if not pods_cache.synced.is_set():  # its pods are not known yet (a restart): no result yet
            return JobStatus(running=True, done=False, bytes_done=self._tail.get(job, (0.0, 0))[1],
                             message="the copy pods are not listed yet")
        meta = obj.get("metadata") or {}
        want = self._want.get(job)
        if want is not None and str((meta.get("annotations") or {}).get(jobs.CHECKPOINT_ANNOTATION, "")) != want:
            return JobStatus(running=False, done=False, bytes_done=0, message=f"job {name} is of another attempt")
        pod = jobs.newest(jobs.own_pods(obj, pods_cache.items()))
        code = jobs.pod_exit(pod) if pod is not None else None
        ev: dict[str, Any] | None = jobs.pod_result(pod) if pod is not None else None
        if pod is not None and code is not None and ev is None:
            ev = closing_event(self._runner.last_line(str(pod["metadata"]["name"])))
        total = 0  # known from the result only
        if code == 0 or (pod is None and jobs._condition(obj, "Complete") is not None):
            written = int(ev.get("bytes_written", -1)) if ev is not None and ev.get("event") == "done" else -1
            done = int(ev.get("length", total)) if ev is not None else total
            return JobStatus(running=False, done=True, bytes_done=done, bytes_written=written, result=ev)
        if code == EXIT_MISMATCH:
            return JobStatus(running=False, done=False, bytes_done=0, result=ev, mismatch=True,
                             message=f"job {name}: the copy did not verify: {(ev or {}).get('error', '')}")
        failed = jobs._condition(obj, "Failed") or jobs._condition(obj, "FailureTarget")
        if failed is not None:
            why = (ev or {}).get("error", "")
            return JobStatus(running=False, done=False, bytes_done=self._tail.get(job, (0.0, 0))[1], result=ev,
                             message=f"job {name} failed ({failed.get('reason') or 'Failed'}): "
                                     f"{failed.get('message') or ''}{': ' + str(why) if why else ''}")
        return JobStatus(running=True, done=False, bytes_done=self._progress(job, pod if code is None else None))

    def _progress(self, job: str, pod: dict[str, Any] | None) -> int:
        """Bytes done by the running pod: its last log line, read at most every progress_seconds."""
        at, done = self._tail.get(job, (0.0, 0))
        now = time.monotonic()
        if pod is None or now - at < self._progress_seconds:
            return done
        prog = jobs.parse_progress(self._runner.last_line(str(pod["metadata"]["name"])))
        if prog is not None:
            done = prog.bytes_done
        self._tail[job] = (now, done)
        return done

    def stop(self, job: str, *, timeout: float = 60.0) -> None:
        """Delete the Job (its checkpoint is on the node's state_dir, so start() resumes) and
        wait until none of its pods runs: a pod in its grace period still reads the source."""
        name = self._name(job)
        self.cancel(job)
        pods = self._runner.pods
        deadline = time.monotonic() + timeout
        while pods is not None and time.monotonic() < deadline:
            live = [p for p in pods.items()
                    if ((p.get("metadata") or {}).get("labels") or {}).get(jobs.JOB_NAME_LABEL) == name
                    and (p.get("status") or {}).get("phase") in ("Pending", "Running", None)
                    and jobs.pod_exit(p) is None]
            if not live:
                return
            pods.wait_changed(0.5)
        if pods is not None:
            log.warning("copy %s: its pod still runs %.0fs after its Job was deleted", job, timeout)

    def cancel(self, job: str) -> None:
        self._runner.delete(self._name(job))
        self._want.pop(job, None)
        self._tail.pop(job, None)

    def finished(self, job: str) -> None:
        self.cancel(job)  # its result is in the pair: the Job and its pods serve nothing more

    def forget(self, job: str) -> None:
        self.cancel(job)  # a manifest on the node's state dir is left for the node's cleanup

    def close(self) -> None:
        self._runner.close()
