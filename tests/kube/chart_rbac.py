"""The chart's RBAC in the kube tests: the fake API server enforces the Roles,
ClusterRoles and bindings of deploy/20-csi-virtvol.yaml (the chart rendered with
default values by scripts/render-deploy; tests/k8s_packaging/test_k8s_deploy.py
keeps it equal to a fresh render), and the driver talks to it with the token of
the ServiceAccount that runs it in the chart."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fakeapi import FakeApiServer
from fakerbac import RbacAuthorizer, service_account_user

ROOT = Path(__file__).resolve().parents[2]
RENDERED = ROOT / "deploy" / "20-csi-virtvol.yaml"
NS = "csi-virtvol"
CONTROLLER_SA = "csi-virtvol-controller"
NODE_SA = "csi-virtvol-node"
COPY_SA = "csi-virtvol-copy"
CONTROLLER = service_account_user(NS, CONTROLLER_SA)
NODE = service_account_user(NS, NODE_SA)


def chart_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(RENDERED.read_text()) if isinstance(d, dict)]


def enforce_chart_rbac(api: FakeApiServer) -> RbacAuthorizer:
    """From now on `api` answers only what the chart's RBAC allows."""
    authz = RbacAuthorizer(chart_docs())
    api.enforce_rbac(authz)
    return authz


def kubeconfig(path: Path, *, server: str, token: str, user: str) -> Path:
    """A kubeconfig for `server` with a ServiceAccount's bearer token (what the pod's mounted
    token gives the driver in a cluster)."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "ctx",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "fake", "user": user, "namespace": NS}}]}))
    return path


def service_account_kubeconfig(api: FakeApiServer, authz: RbacAuthorizer, sa: str, path: Path) -> Path:
    return kubeconfig(path, server=api.url, token=authz.token_for(NS, sa), user=sa)


def admin_client(api: FakeApiServer, authz: RbacAuthorizer) -> Any:
    """A client allowed everything (what a test does in the cluster's place: kubectl as admin)."""
    import kubernetes.client as k8s

    authz.cluster_roles["test-admin"] = {"kind": "ClusterRole", "metadata": {"name": "test-admin"}, "rules": [
        {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}
    authz.bindings.append({"kind": "ClusterRoleBinding", "metadata": {"name": "test-admin"},
                           "subjects": [{"kind": "ServiceAccount", "name": "test-admin", "namespace": "kube-system"}],
                           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                       "name": "test-admin"}})
    cfg = k8s.Configuration(host=api.url)
    cfg.api_key = {"authorization": authz.token_for("kube-system", "test-admin")}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    return k8s.ApiClient(cfg)


def granted(sa: str, role: str) -> set[tuple[str, str, str]]:
    """(group, resource, verb) the chart's role `role`, bound to `sa`, grants."""
    docs = chart_docs()
    names = {b["roleRef"]["name"] for b in docs if b.get("kind") in ("RoleBinding", "ClusterRoleBinding")
             and any(s.get("name") == sa and s.get("namespace") == NS for s in b.get("subjects") or [])}
    assert role in names, f"{role} is not bound to {sa}"
    return {(g, r, v) for d in docs if d.get("kind") in ("Role", "ClusterRole") and d["metadata"]["name"] == role
            for rule in d["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
