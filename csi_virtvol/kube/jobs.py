"""Host-copy steps as Kubernetes Jobs: one function builds the Job, `JobRunner`
starts it, follows it and reads its progress.

The Job runs ``csi-virtvol copy`` (csi_virtvol/copy/cli.py) from the driver's
image on a node that reaches both arrays, privileged (it opens block devices
and the arrays' files), with the host paths it needs mounted at the same
path.  The copy prints one JSON object per line (``{"event": "progress",
"bytes_done": ..}`` then ``done`` or ``error``); the runner reads the newest
pod's log for progress and the failure reason.  The pod has no API token:
it never talks to the API server.  Retries resume from the checkpoint file
kept on the node (``--resume-from auto``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import kubernetes.client as k8s
import kubernetes.watch as _k8s_watch
import urllib3.exceptions

from csi_virtvol import errors
from csi_virtvol.kube.crdstore import GROUP, label_value, wrap_api_error

Obj = dict[str, Any]
k8s_watch: Any = _k8s_watch

logger = logging.getLogger(__name__)

COMPONENT = "copy"
PAIR_LABEL = f"{GROUP}/pair"
TARGET_LABEL = f"{GROUP}/target"
EXTENT_LABEL = f"{GROUP}/extent"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
STATE_DIR = "/var/lib/csi-virtvol/copy"

# csi-virtvol copy's exit codes that no retry can fix (bad usage, verification mismatch)
PERMANENT_EXIT_CODES = (2, 3)


def copy_job_name(pair_id: str, target: str, extent_index: int) -> str:
    """A Job name (a DNS-1123 label of at most 63 characters) for one extent copy."""
    digest = hashlib.sha256(f"{pair_id}\0{target}\0{extent_index}".encode()).hexdigest()[:10]
    base = re.sub(r"[^a-z0-9-]+", "-", pair_id.lower()).strip("-")[:30].strip("-")
    return f"copy-{base + '-' if base else ''}{extent_index}-{digest}"


def build_copy_job(
    *,
    name: str,
    namespace: str,
    image: str,
    node: str,
    src: str,
    dst: str,
    pair_id: str,
    target: str,
    extent_index: int,
    resume_from: int | str = "auto",
    bwlimit: int = 0,
    verify: bool = False,
    only_changed: bool = False,
    checksums: bool = False,
    service_account: str = "",
    host_paths: Sequence[str] = ("/dev",),
    state_dir: str = STATE_DIR,
    cpu_request: str = "100m",
    cpu_limit: str = "1",
    memory_request: str = "64Mi",
    memory_limit: str = "256Mi",
    backoff_limit: int = 3,
    ttl_seconds_after_finished: int = 3600,
    active_deadline_seconds: int = 24 * 3600,
    image_pull_policy: str = "IfNotPresent",
    priority_class: str = "",
    labels: Mapping[str, str] | None = None,
) -> Obj:
    """The batch/v1 Job copying `src` (PATH[:OFFSET[:LENGTH]]) to `dst`
    (PATH[:OFFSET]) on `node`, for extent `extent_index` of `target` in pair `pair_id`.

    `host_paths` are host directories the copy needs (block devices, the file
    pools); each is mounted at the same path.  `resume_from` is a byte count
    or "auto" (continue from the checkpoint in `state_dir` after a retry).
    """
    if not name or len(name) > 63 or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        raise errors.InvalidRequest(f"job name {name!r} is not a DNS-1123 label of at most 63 characters")
    if bwlimit < 0 or extent_index < 0:
        raise errors.InvalidRequest("bwlimit and extent_index must not be negative")
    meta_labels = {
        "app.kubernetes.io/name": "csi-virtvol",
        "app.kubernetes.io/component": COMPONENT,
        "app.kubernetes.io/managed-by": "csi-virtvol",
        PAIR_LABEL: label_value(pair_id),
        TARGET_LABEL: label_value(target),
        EXTENT_LABEL: str(extent_index),
        **(labels or {}),
    }
    args = ["copy", "--src", src, "--dst", dst, "--resume-from", str(resume_from),
            "--progress", "--progress-file", f"{state_dir}/{name}.json"]
    if bwlimit:
        args += ["--bwlimit", str(bwlimit)]
    if verify:
        args.append("--verify")
    if only_changed:
        args.append("--only-changed")
    if checksums:
        args += ["--checksums", f"{state_dir}/{name}.sums"]
    paths = [p.rstrip("/") or "/" for p in dict.fromkeys([*host_paths, state_dir])]
    volumes = [{"name": f"host-{i}", "hostPath": {"path": p, "type": "DirectoryOrCreate" if p == state_dir
                                                 else "Directory"}} for i, p in enumerate(paths)]
    mounts = [{"name": f"host-{i}", "mountPath": p,
               **({"mountPropagation": "HostToContainer"} if p != state_dir else {})}
              for i, p in enumerate(paths)]
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}},
        "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{
            "name": "copy",
            "image": image,
            "imagePullPolicy": image_pull_policy,
            "command": ["csi-virtvol"],
            "args": args,
            "securityContext": {"privileged": True, "allowPrivilegeEscalation": True, "runAsUser": 0},
            "resources": {"requests": {"cpu": cpu_request, "memory": memory_request},
                          "limits": {"cpu": cpu_limit, "memory": memory_limit}},
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    }
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if priority_class:
        pod_spec["priorityClassName"] = priority_class
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": meta_labels,
            "annotations": {PAIR_LABEL: pair_id, TARGET_LABEL: target, f"{GROUP}/src": src,
                            f"{GROUP}/dst": dst},
        },
        "spec": {
            "backoffLimit": backoff_limit,
            "activeDeadlineSeconds": active_deadline_seconds,
            "ttlSecondsAfterFinished": ttl_seconds_after_finished,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "copy", "operator": "In",
                                                      "values": list(PERMANENT_EXIT_CODES)}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "template": {"metadata": {"labels": meta_labels}, "spec": pod_spec},
        },
    }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CopyProgress:
    bytes_done: int
    bytes_total: int
    event: str = "progress"  # progress | done | error | cancelled
    error: str = ""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class JobOutcome:
    succeeded: bool
    reason: str = ""      # the Job's Failed condition reason (BackoffLimitExceeded, DeadlineExceeded, ...)
    message: str = ""     # what went wrong, with the copy's own error when it printed one
    progress: CopyProgress | None = None


def parse_progress(log: str) -> CopyProgress | None:
    """The last progress/done/error line of a copy's log (other lines are skipped)."""
    last: CopyProgress | None = None
    error = ""
    for line in log.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if not isinstance(ev, dict) or "event" not in ev:
            continue
        if ev["event"] == "error":
            error = str(ev.get("error", ""))
            done = last.bytes_done if last else 0
            total = last.bytes_total if last else 0
            last = CopyProgress(bytes_done=int(ev.get("bytes_done") or done),
                                bytes_total=int(ev.get("bytes_total") or total), event="error", error=error)
        elif ev["event"] == "done":  # csi-virtvol copy's CopyResult: the whole range is copied
            total = int(ev.get("length") or ev.get("bytes_total") or 0)
            last = CopyProgress(bytes_done=total, bytes_total=total, event="done")
        elif ev["event"] in ("progress", "cancelled"):
            done = int(ev.get("bytes_done") or 0)
            total = int(ev.get("bytes_total") or done)
            last = CopyProgress(bytes_done=done, bytes_total=total, event=str(ev["event"]))
    return last


def _condition(job: Obj, type_: str) -> Obj | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return cast(Obj, c)
    return None


class JobRunner:
    """Creates copy Jobs in `namespace`, follows them and reads their progress."""

    def __init__(self, api_client: k8s.ApiClient, *, namespace: str, request_timeout: float = 30.0) -> None:
        self._client: Any = api_client
        self._batch = k8s.BatchV1Api(api_client)
        self._core = k8s.CoreV1Api(api_client)
        self._namespace = namespace
        self._timeout = request_timeout

    def start(self, job: Obj) -> str:
        """Create the Job; an existing Job of the same name and pair is taken as ours."""
        name = str(job["metadata"]["name"])
        try:
            self._batch.create_namespaced_job(self._namespace, cast(Any, job),  # a dict body is sent as is
                                              _request_timeout=self._timeout)
            logger.info("started copy job %s/%s", self._namespace, name)
        except k8s.ApiException as e:
            if e.status != 409:
                raise wrap_api_error(e, f"create job {name}") from e
            have = self.get(name)
            want = job["metadata"]["labels"].get(PAIR_LABEL)
            if have is None or (have.get("metadata") or {}).get("labels", {}).get(PAIR_LABEL) != want:
                raise errors.Conflict(f"job {self._namespace}/{name} exists and belongs to another pair") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"create job {name}") from e
        return name

    def get(self, name: str) -> Obj | None:
        try:
            job = self._batch.read_namespaced_job(name, self._namespace, _request_timeout=self._timeout)
        except k8s.ApiException as e:
            if e.status == 404:
                return None
            raise wrap_api_error(e, f"get job {name}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"get job {name}") from e
        return cast(Obj, self._client.sanitize_for_serialization(job))

    def progress(self, name: str) -> CopyProgress | None:
        """Progress from the log of the Job's newest pod (None before it printed any)."""
        try:
            pods = self._core.list_namespaced_pod(self._namespace, label_selector=f"{JOB_NAME_LABEL}={name}",
                                                  _request_timeout=self._timeout)
            metas: list[Any] = [p.metadata for p in pods.items or [] if p.metadata is not None]
            metas.sort(key=lambda m: (str(m.creation_timestamp or ""), str(m.name)))
            for meta in reversed(metas):
                log = self._core.read_namespaced_pod_log(str(meta.name), self._namespace, container="copy",
                                                         _request_timeout=self._timeout)
                got = parse_progress(str(log or ""))
                if got is not None:
                    return got
        except k8s.ApiException as e:
            if e.status in (400, 404):  # pod gone or not started yet: no log to read
                return None
            raise wrap_api_error(e, f"read progress of job {name}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"read progress of job {name}") from e
        return None

    def outcome(self, job: Obj) -> JobOutcome | None:
        """The finished Job's outcome, or None while it runs."""
        name = str(job["metadata"]["name"])
        if _condition(job, "Complete") is not None or _condition(job, "SuccessCriteriaMet") is not None:
            return JobOutcome(succeeded=True, reason="Complete", progress=self.progress(name))
        failed = _condition(job, "Failed") or _condition(job, "FailureTarget")
        if failed is None:
            return None
        prog = self.progress(name)
        message = str(failed.get("message") or "")
        if prog is not None and prog.error:
            message = f"{message}: {prog.error}" if message else prog.error
        return JobOutcome(succeeded=False, reason=str(failed.get("reason") or "Failed"), message=message,
                          progress=prog)

    def wait(self, name: str, *, timeout: float, poll: float = 5.0,
             on_progress: Callable[[CopyProgress], None] | None = None) -> JobOutcome:
        """Follow the Job until it finishes; report progress at most every `poll` seconds.

        Raises NotFound if the Job disappears, OperationPending at `timeout`.
        """
        deadline = time.monotonic() + timeout
        last: CopyProgress | None = None
        while True:
            job = self.get(name)
            if job is None:
                raise errors.NotFound(f"copy job {self._namespace}/{name} is gone")
            done = self.outcome(job)
            if done is not None:
                if on_progress is not None and done.progress is not None and done.progress != last:
                    on_progress(done.progress)
                return done
            prog = self.progress(name)
            if on_progress is not None and prog is not None and prog != last:
                on_progress(prog)
                last = prog
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.OperationPending(f"copy job {self._namespace}/{name} still running")
            self._wait_for_change(name, str(job["metadata"]["resourceVersion"]), min(poll, left))

    def _wait_for_change(self, name: str, rv: str, seconds: float) -> None:
        w = k8s_watch.Watch()
        try:
            for _ in w.stream(self._batch.list_namespaced_job, self._namespace,
                              field_selector=f"metadata.name={name}", resource_version=rv,
                              timeout_seconds=max(1, int(seconds)), _request_timeout=(self._timeout, seconds)):
                return
        except k8s.ApiException as e:
            if e.status == 410:
                return  # history gone: just read the Job again
            raise wrap_api_error(e, f"watch job {name}") from e
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError):
            return
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"watch job {name}") from e
        finally:
            w.stop()

    def delete(self, name: str) -> None:
        """Delete the Job and its pods (missing is fine)."""
        try:
            self._batch.delete_namespaced_job(name, self._namespace, propagation_policy="Background",
                                              _request_timeout=self._timeout)
        except k8s.ApiException as e:
            if e.status != 404:
                raise wrap_api_error(e, f"delete job {name}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"delete job {name}") from e
