"""The fake API server's RBAC mode (fakerbac.py) answers as kube-apiserver does."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubernetes.client as k8s
import pytest

from fakeapi import FakeApiServer
from fakerbac import RbacAuthorizer

NS = "csi-virtvol"
ROLES: list[dict[str, Any]] = [
    {"kind": "ClusterRole", "metadata": {"name": "reader"}, "rules": [
        {"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshots"], "verbs": ["get", "list"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get"],
         "resourceNames": ["mine"]}]},
    {"kind": "ClusterRoleBinding", "metadata": {"name": "reader"},
     "subjects": [{"kind": "ServiceAccount", "name": "ctl", "namespace": NS}],
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "reader"}},
    {"kind": "Role", "metadata": {"name": "jobs", "namespace": NS}, "rules": [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}]},
    {"kind": "RoleBinding", "metadata": {"name": "jobs", "namespace": NS},
     "subjects": [{"kind": "ServiceAccount", "name": "ctl", "namespace": NS}],
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "jobs"}},
]
JOB = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": {"template": {"spec": {
    "restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}}


@pytest.fixture
def rbac(fake_api: FakeApiServer) -> Iterator[tuple[FakeApiServer, RbacAuthorizer]]:
    authz = RbacAuthorizer(ROLES)
    fake_api.enforce_rbac(authz)
    yield fake_api, authz


def _client(api: FakeApiServer, token: str | None) -> k8s.ApiClient:
    cfg = k8s.Configuration(host=api.url)
    if token is not None:
        cfg.api_key = {"authorization": token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
    return k8s.ApiClient(cfg)


def _status(call: Any) -> tuple[int, dict[str, Any]]:
    import json
    with pytest.raises(k8s.ApiException) as e:
        call()
    return int(e.value.status), json.loads(e.value.body)


def test_a_missing_verb_is_forbidden_as_kube_apiserver_says_it(rbac: tuple[FakeApiServer, RbacAuthorizer]) -> None:
    """The message issue 11 saw from a real kube-apiserver, word for word."""
    api, authz = rbac
    c = _client(api, authz.token_for(NS, "ctl"))
    custom = k8s.CustomObjectsApi(c)
    assert custom.list_cluster_custom_object("snapshot.storage.k8s.io", "v1", "volumesnapshots")["items"] == []
    code, body = _status(lambda: custom.list_cluster_custom_object(
        "snapshot.storage.k8s.io", "v1", "volumesnapshots", watch=True, _preload_content=False))
    assert code == 403
    assert body == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Forbidden",
                    "code": 403, "details": {"group": "snapshot.storage.k8s.io", "kind": "volumesnapshots"},
                    "message": 'volumesnapshots.snapshot.storage.k8s.io is forbidden: User '
                               '"system:serviceaccount:csi-virtvol:ctl" cannot watch resource "volumesnapshots" '
                               'in API group "snapshot.storage.k8s.io" at the cluster scope'}
    assert [a.verb for a in authz.denied()] == ["watch"]


def test_a_role_binding_grants_only_in_its_namespace(rbac: tuple[FakeApiServer, RbacAuthorizer]) -> None:
    api, authz = rbac
    batch = k8s.BatchV1Api(_client(api, authz.token_for(NS, "ctl")))
    batch.create_namespaced_job(NS, JOB)
    assert batch.read_namespaced_job("j", NS).metadata.name == "j"
    code, body = _status(lambda: batch.create_namespaced_job("default", JOB))
    assert code == 403 and body["message"] == (
        'jobs.batch is forbidden: User "system:serviceaccount:csi-virtvol:ctl" cannot create resource "jobs" '
        'in API group "batch" in the namespace "default"')
    code, body = _status(lambda: batch.delete_namespaced_job("j", NS))
    assert code == 403 and body["details"] == {"name": "j", "group": "batch", "kind": "jobs"}
    assert api.find("batch", "jobs", "j", NS) is not None, "a refused request changes nothing"


def test_subresources_names_and_other_accounts(rbac: tuple[FakeApiServer, RbacAuthorizer]) -> None:
    api, authz = rbac
    core = k8s.CoreV1Api(_client(api, authz.token_for(NS, "ctl")))
    code, body = _status(lambda: core.read_namespaced_pod("p", NS))   # pods/log is not pods
    assert code == 403 and 'cannot get resource "pods"' in body["message"]
    code, _ = _status(lambda: core.read_namespaced_pod_log("p", NS))  # allowed; the pod is missing
    assert code == 404
    leases = k8s.CoordinationV1Api(_client(api, authz.token_for(NS, "ctl")))
    assert _status(lambda: leases.read_namespaced_lease("mine", NS))[0] == 404      # resourceNames: allowed
    assert _status(lambda: leases.read_namespaced_lease("theirs", NS))[0] == 403
    other = k8s.BatchV1Api(_client(api, authz.token_for(NS, "node")))
    code, body = _status(lambda: other.list_namespaced_job(NS))
    assert code == 403 and '"system:serviceaccount:csi-virtvol:node" cannot list' in body["message"]
    assert authz.used("system:serviceaccount:csi-virtvol:ctl") >= {("", "pods/log", "get"),
                                                                   ("coordination.k8s.io", "leases", "get")}


def test_unknown_tokens_and_anonymous_requests(rbac: tuple[FakeApiServer, RbacAuthorizer]) -> None:
    api, _ = rbac
    code, body = _status(lambda: k8s.BatchV1Api(_client(api, "forged")).list_namespaced_job(NS))
    assert code == 401 and body["reason"] == "Unauthorized"
    code, body = _status(lambda: k8s.BatchV1Api(_client(api, None)).list_namespaced_job(NS))
    assert code == 403 and 'User "system:anonymous" cannot list' in body["message"]


def test_without_an_authorizer_everything_is_served(fake_api: FakeApiServer, client: Any) -> None:
    """The other kube tests talk to the server without credentials: nothing changes for them."""
    k8s.BatchV1Api(client).create_namespaced_job(NS, JOB)
    assert fake_api.find("batch", "jobs", "j", NS) is not None
