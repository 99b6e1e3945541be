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
from csi_virtvol.kube import informer
from csi_virtvol.kube.crdstore import API_VERSION, GROUP, VERSION, label_value, object_name, wrap_api_error

Obj = dict[str, Any]
k8s_watch: Any = _k8s_watch

logger = logging.getLogger(__name__)

COMPONENT = "copy"
PAIR_LABEL = f"{GROUP}/pair"
TARGET_LABEL = f"{GROUP}/target"
EXTENT_LABEL = f"{GROUP}/extent"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
STATE_DIR = "/var/lib/csi-virtvol/copy"
TERMINATION_LOG = "/dev/termination-log"
CHECKPOINT_ANNOTATION = f"{GROUP}/checkpoint"  # which attempt (copy/checkpoint.py) the Job copies
CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"

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
    checkpoint_id: str = "",
    tolerations: Sequence[Mapping[str, Any]] | None = None,
    image_pull_secrets: Sequence[Mapping[str, Any] | str] = (),
    owner: Mapping[str, Any] | None = None,
) -> Obj:
    """The batch/v1 Job copying `src` (PATH[:OFFSET[:LENGTH]]) to `dst`
    (PATH[:OFFSET]) on `node`, for extent `extent_index` of `target` in pair `pair_id`.

    `host_paths` are host directories the copy needs (block devices, the file
    pools); each is mounted at the same path.  `resume_from` is a byte count
    or "auto" (continue from the checkpoint in `state_dir` after a retry).
    `owner` (`owner_reference`) makes the Job a dependent of its VolumePair.
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
            "--progress", "--progress-file", f"{state_dir}/{name}.json",
            # the closing event becomes the container's termination message: read from the pod's
            # status (which the controller watches anyway), never from its log
            "--result-file", TERMINATION_LOG]
    if checkpoint_id:
        args += ["--checkpoint-id", checkpoint_id]
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
        "tolerations": [dict(t) for t in tolerations] if tolerations is not None
        else [{"operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{
            "name": "copy",
            "image": image,
            "imagePullPolicy": image_pull_policy,
            "command": ["csi-virtvol"],
            "args": args,
            "securityContext": {"privileged": True, "allowPrivilegeEscalation": True, "runAsUser": 0},
            "resources": {"requests": {"cpu": cpu_request, "memory": memory_request},
                          "limits": {"cpu": cpu_limit, "memory": memory_limit}},
            "terminationMessagePath": TERMINATION_LOG,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    }
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if priority_class:
        pod_spec["priorityClassName"] = priority_class
    if image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": x} if isinstance(x, str) else dict(x) for x in image_pull_secrets]
    metadata: Obj = {
        "name": name,
        "namespace": namespace,
        "labels": meta_labels,
        "annotations": {PAIR_LABEL: pair_id, TARGET_LABEL: target, f"{GROUP}/src": src,
                        f"{GROUP}/dst": dst, CHECKPOINT_ANNOTATION: checkpoint_id},
    }
    if owner is not None:
        metadata["ownerReferences"] = [dict(owner)]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
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


def owner_reference(pair: Obj) -> Obj:
    """The ownerReference that makes a copy Job a dependent of its VolumePair object.

    A cluster-scoped owner of a namespaced dependent is allowed.  Deleting the pair lets the
    garbage collector delete the Job (and so its pods), e.g. when a clone is deleted mid-copy
    and the controller does not get to it.  No blockOwnerDeletion: the driver deletes pairs
    in the background (no foreground deletion waits for the Jobs), and setting it would need
    update on volumepairs/finalizers (OwnerReferencesPermissionEnforcement).
    """
    meta = pair.get("metadata") or {}
    if not meta.get("uid") or not meta.get("name"):
        raise errors.InvalidRequest("an owner needs the VolumePair's name and uid")
    return {"apiVersion": API_VERSION, "kind": "VolumePair", "name": str(meta["name"]), "uid": str(meta["uid"]),
            "controller": True, "blockOwnerDeletion": False}


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
    """Creates copy Jobs in `namespace`, follows them and reads their progress.

    Every request is retried with backoff while the API server answers 5xx or
    429 or cannot be reached (kube/informer.py): such an answer is never a
    copy's result.  `follow()` starts one watch on copy Jobs and one on copy
    pods for the whole process; while it runs, reads come from those caches.
    """

    def __init__(self, api_client: k8s.ApiClient, *, namespace: str, request_timeout: float = 30.0,
                 delays: Sequence[float] = informer.DELAYS) -> None:
        self._client: Any = api_client
        self._batch = k8s.BatchV1Api(api_client)
        self._core = k8s.CoreV1Api(api_client)
        self._custom = k8s.CustomObjectsApi(api_client)
        self._namespace = namespace
        self._timeout = request_timeout
        self._delays = delays
        self.jobs: informer.Informer | None = None
        self.pods: informer.Informer | None = None

    def _call(self, call: Callable[[], Any], what: str) -> Any:
        return informer.retrying(call, what=what, delays=self._delays)

    def follow(self) -> None:
        """Start following copy Jobs and pods with one watch each (idempotent)."""
        if self.jobs is None:
            sel = f"app.kubernetes.io/component={COMPONENT}"
            self.jobs = informer.Informer(self._batch.list_namespaced_job, self._client, namespace=self._namespace,
                                          label_selector=sel, what="copy jobs", request_timeout=self._timeout,
                                          delays=self._delays)
            self.pods = informer.Informer(self._core.list_namespaced_pod, self._client, namespace=self._namespace,
                                          label_selector=sel, what="copy pods", request_timeout=self._timeout,
                                          delays=self._delays)
            self.jobs.start()
            self.pods.start()

    def close(self) -> None:
        for inf in (self.jobs, self.pods):
            if inf is not None:
                inf.stop()

    def start(self, job: Obj) -> str:
        """Create the Job; an existing Job of the same name and pair is taken as ours when it
        copies the same attempt and has not failed, and replaced when it is a previous attempt's
        or failed (its pods' retries spent: the new one's pods resume from the checkpoint)."""
        name = str(job["metadata"]["name"])
        want_ckpt = str((job["metadata"].get("annotations") or {}).get(CHECKPOINT_ANNOTATION, ""))
        for _ in range(20):
            try:
                self._call(lambda: self._batch.create_namespaced_job(
                    self._namespace, cast(Any, job), _request_timeout=self._timeout), f"create job {name}")
                logger.info("started copy job %s/%s", self._namespace, name)
                return name
            except k8s.ApiException as e:
                if e.status != 409:
                    raise wrap_api_error(e, f"create job {name}") from e
                have = self.get(name)
                if have is None:
                    continue  # it went meanwhile: create it again
                meta = have.get("metadata") or {}
                if (meta.get("labels") or {}).get(PAIR_LABEL) != job["metadata"]["labels"].get(PAIR_LABEL):
                    raise errors.Conflict(f"job {self._namespace}/{name} exists and belongs to another pair") from e
                failed = _condition(have, "Failed") or _condition(have, "FailureTarget")
                if str((meta.get("annotations") or {}).get(CHECKPOINT_ANNOTATION, "")) == want_ckpt \
                        and not meta.get("deletionTimestamp") and failed is None:
                    return name
                logger.info("copy job %s/%s %s; replacing it", self._namespace, name,
                            "failed" if failed is not None else "is of another attempt")
                self.delete(name, uid=str(meta.get("uid") or ""))
                time.sleep(0.2)
            except (urllib3.exceptions.HTTPError, OSError) as e:
                raise wrap_api_error(e, f"create job {name}") from e
        raise errors.OperationPending(f"copy job {self._namespace}/{name} of a previous attempt is still going")

    def pair_owner(self, pair_id: str) -> Obj:
        """The ownerReference to VolumePair `pair_id` (its object, read for its uid).

        NotFound if the pair is gone: a copy whose pair is gone must not start."""
        name = object_name(pair_id)
        try:
            pair = self._call(lambda: self._custom.get_cluster_custom_object(
                GROUP, VERSION, "volumepairs", name, _request_timeout=self._timeout), f"get volumepair {name}")
        except (k8s.ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"get volumepair {name}") from e
        return owner_reference(cast(Obj, pair))

    def get(self, name: str) -> Obj | None:
        try:
            job = self._call(lambda: self._batch.read_namespaced_job(
                name, self._namespace, _request_timeout=self._timeout), f"get job {name}")
        except k8s.ApiException as e:
            if e.status == 404:
                return None
            raise wrap_api_error(e, f"get job {name}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"get job {name}") from e
        return cast(Obj, self._client.sanitize_for_serialization(job))

    def list_pods(self, name: str) -> list[Obj]:
        try:
            out = self._call(lambda: self._core.list_namespaced_pod(
                self._namespace, label_selector=f"{JOB_NAME_LABEL}={name}", _request_timeout=self._timeout),
                f"list pods of job {name}")
        except (k8s.ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"list pods of job {name}") from e
        return list(cast(Obj, self._client.sanitize_for_serialization(out)).get("items") or [])

    def last_line(self, pod: str, *, lines: int = 1) -> str:
        """The last `lines` lines of a copy pod's log (a small read: tailLines, limitBytes); "" if none yet."""
        try:
            text = self._call(lambda: self._core.read_namespaced_pod_log(
                pod, self._namespace, container="copy", tail_lines=lines, limit_bytes=1024 * lines,
                _request_timeout=self._timeout), f"read log of pod {pod}")
        except k8s.ApiException as e:
            if e.status in (400, 404):  # pod gone or not started yet: no log to read
                return ""
            raise wrap_api_error(e, f"read log of pod {pod}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"read log of pod {pod}") from e
        return str(text or "")

    def progress(self, name: str, *, job: Obj | None = None) -> CopyProgress | None:
        """Progress of the Job's newest pod: its result when it ended, else its last log line."""
        pods = own_pods(job, self.list_pods(name)) if job is not None else self.list_pods(name)
        pod = newest(pods)
        if pod is None:
            return None
        ev = pod_result(pod)
        if ev is not None:
            return parse_progress(json.dumps(ev))
        return parse_progress(self.last_line(str(pod["metadata"]["name"]), lines=8))

    def outcome(self, job: Obj) -> JobOutcome | None:
        """The finished Job's outcome, or None while it runs."""
        name = str(job["metadata"]["name"])
        if _condition(job, "Complete") is not None or _condition(job, "SuccessCriteriaMet") is not None:
            return JobOutcome(succeeded=True, reason="Complete", progress=self.progress(name, job=job))
        failed = _condition(job, "Failed") or _condition(job, "FailureTarget")
        if failed is None:
            return None
        prog = self.progress(name, job=job)
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
            prog = self.progress(name, job=job)
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
            if e.status == 410 or informer.transient(e):
                return  # history gone, or a passing fault: just read the Job again
            raise wrap_api_error(e, f"watch job {name}") from e
        except (urllib3.exceptions.HTTPError, OSError):
            time.sleep(min(seconds, 1.0))  # the API server is unreachable for now: read again soon
        finally:
            w.stop()

    def delete(self, name: str, *, uid: str = "") -> None:
        """Delete the Job and its pods (missing is fine); with `uid`, only that incarnation of it."""
        body: Obj = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self._call(lambda: self._batch.delete_namespaced_job(name, self._namespace, body=cast(Any, body),
                                                                 _request_timeout=self._timeout),
                       f"delete job {name}")
        except k8s.ApiException as e:
            if e.status == 409 and uid:
                return  # already replaced by another incarnation
            if e.status != 404:
                raise wrap_api_error(e, f"delete job {name}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"delete job {name}") from e
        for inf in (self.jobs,):
            if inf is not None:
                inf.forget(name)


def own_pods(job: Obj, pods: Sequence[Obj]) -> list[Obj]:
    """The pods of this incarnation of `job`: a Job deleted and made again under the same
    name has a new uid, and the old one's pods may still be around."""
    uid = (job.get("metadata") or {}).get("uid")
    out = []
    for p in pods:
        meta = p.get("metadata") or {}
        labels = meta.get("labels") or {}
        owners = [o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("kind") == "Job"]
        if (CONTROLLER_UID_LABEL in labels and labels[CONTROLLER_UID_LABEL] != uid) or (owners and uid not in owners):
            continue
        if labels.get(JOB_NAME_LABEL) != (job.get("metadata") or {}).get("name"):
            continue
        out.append(p)
    return out


def newest(pods: Sequence[Obj]) -> Obj | None:
    if not pods:
        return None
    return max(pods, key=lambda p: (str(p["metadata"].get("creationTimestamp") or ""), str(p["metadata"]["name"])))


def copy_container(pod: Obj) -> Obj | None:
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        if c.get("name") == "copy":
            return cast(Obj, c)
    return None


def pod_exit(pod: Obj) -> int | None:
    """The copy container's exit code once it ended, else None."""
    c = copy_container(pod)
    term = ((c or {}).get("state") or {}).get("terminated")
    if term is None:
        return None
    return int(term.get("exitCode", 1))


def pod_result(pod: Obj) -> Obj | None:
    """The copy's closing event, from the container's termination message (--result-file)."""
    c = copy_container(pod)
    term = ((c or {}).get("state") or {}).get("terminated") or {}
    msg = str(term.get("message") or "").strip()
    if not msg:
        return None
    try:
        ev = json.loads(msg.splitlines()[-1])
    except ValueError:
        return None
    return cast(Obj, ev) if isinstance(ev, dict) and "event" in ev else None
