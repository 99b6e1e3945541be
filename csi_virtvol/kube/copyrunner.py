"""Host-copy steps as Kubernetes Jobs: the CopyRunner the controller uses on a cluster.

Each step is one Job built by `jobs.build_copy_job`, pinned to a node that
reaches both LUNs, running `csi-virtvol copy --resume-from auto` with its
checkpoint in a hostPath directory, so a retried pod continues where the
last one stopped.  Progress is read from the pod's JSON log lines.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from csi_virtvol import errors
from csi_virtvol.copy.runner import HostCopy, JobStatus
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
                   resources=res)


class JobCopyRunner:
    def __init__(self, runner: jobs.JobRunner, settings: JobSettings) -> None:
        self._runner = runner
        self._s = settings

    @staticmethod
    def _name(job: str) -> str:
        """The Job's name from the step's "<pair>-<index>": the same after a restart."""
        pair, _, index = job.rpartition("-")
        return jobs.copy_job_name(pair, pair, int(index))

    def start(self, copy: HostCopy) -> None:
        if not self._s.image:
            raise errors.PreconditionFailed("no copy image is configured (copyImage / VIRTVOL_IMAGE)")
        name = self._name(copy.job)
        req = (self._s.resources.get("requests") or {})
        lim = (self._s.resources.get("limits") or {})
        body = jobs.build_copy_job(
            name=name, namespace=self._s.namespace, image=self._s.image,
            node=copy.node or self._s.default_node,
            src=f"{copy.src}:{copy.src_offset}:{copy.length}", dst=f"{copy.dst}:{copy.dst_offset}",
            pair_id=copy.pair, target=copy.pair, extent_index=copy.index, bwlimit=copy.bwlimit,
            only_changed=copy.only_changed, checksums=copy.checksums,
            service_account=self._s.service_account,
            host_paths=tuple(dict.fromkeys(["/dev", os.path.dirname(copy.src), os.path.dirname(copy.dst)])),
            state_dir=self._s.state_dir,
            cpu_request=str(req.get("cpu", "100m")), cpu_limit=str(lim.get("cpu", "1")),
            memory_request=str(req.get("memory", "64Mi")), memory_limit=str(lim.get("memory", "256Mi")),
            backoff_limit=self._s.backoff_limit, ttl_seconds_after_finished=self._s.ttl_seconds_after_finished,
            active_deadline_seconds=self._s.active_deadline_seconds,
            image_pull_policy=self._s.image_pull_policy, priority_class=self._s.priority_class,
            labels=self._s.labels)
        self._runner.start(body)

    def poll(self, job: str) -> JobStatus:
        name = self._name(job)
        obj = self._runner.get(name)
        if obj is None:
            return JobStatus(running=False, done=False, bytes_done=0, message=f"job {name} is gone")
        outcome = self._runner.outcome(obj)
        prog = outcome.progress if outcome is not None else self._runner.progress(name)
        done = prog.bytes_done if prog is not None else 0
        if outcome is None:
            return JobStatus(running=True, done=False, bytes_done=done)
        if outcome.succeeded:
            return JobStatus(running=False, done=True, bytes_done=done)
        return JobStatus(running=False, done=False, bytes_done=done,
                         message=f"job {name} failed ({outcome.reason}): {outcome.message}")

    def cancel(self, job: str) -> None:
        self._runner.delete(self._name(job))

    def finished(self, job: str) -> None:
        pass  # the Job stays for `kubectl get jobs` until its ttlSecondsAfterFinished

    def forget(self, job: str) -> None:
        self.cancel(job)  # a manifest on the node's state dir is left for the node's cleanup

    def close(self) -> None:
        pass
